"""Pipeline options and running, shared by every entry point in `pipelines/`.

* `--runner` names in RUNNER_ALIASES are expanded (`DaskRunner`), in every command.
* `split_beam_args`: the flags a command did not parse must be Beam pipeline options;
  any other flag fails naming it (Beam itself would only warn and drop it).
* With no `--runner`, pipelines run on the FnApiRunner: it is what the DirectRunner
  falls back to anyway, but without first trying to download the Prism binary (which
  fails offline) and with `--direct_num_workers` honoured.
* `run_pipeline` waits for the job and raises if it did not finish DONE, so callers
  write their manifest only after a successful run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from cm_beam.runtime import malloc_tuning
from cm_beam.runtime import worker_threads

_LOG = logging.getLogger("cm_beam")

CM_DASK_RUNNER = "cm_beam.runtime.dask_runner.DaskRunner"
# The one table of runner names cm-beam resolves itself (every command, and each
# stage of cm-nightly). Beam 2.77's own DaskRunner mixes a ParDo's tagged outputs
# and computes only the last sink; cm_beam.runtime.dask_runner fixes both (see its
# docstring), so Beam's name for it means ours too.
RUNNER_ALIASES = {
    "DaskRunner": CM_DASK_RUNNER,
    "apache_beam.runners.dask.dask_runner.DaskRunner": CM_DASK_RUNNER,
}
DEFAULT_RUNNER = "FnApiRunner"


def resolve_runner(name: str) -> str:
    return RUNNER_ALIASES.get(name, name)


def rewrite_runner(args: Sequence[str], default: Optional[str] = None) -> List[str]:
    """`args` with `--runner X` / `--runner=X` as `--runner=<resolved X>` (and
    `--runner=<default>` appended when there is none and `default` is given)."""
    out, has_runner = [], False
    it = iter(args)
    for arg in it:
        if arg == "--runner":
            arg = f"--runner={next(it, '')}"
        if arg.startswith("--runner="):
            out.append(f"--runner={resolve_runner(arg.split('=', 1)[1])}")
            has_runner = True
        else:
            out.append(arg)
    if not has_runner and default:
        out.append(f"--runner={default}")
    return out


def _register_runner_options(args: Sequence[str]) -> None:
    """Imports the module of a runner given by its full path, so that the pipeline
    options it defines (DaskRunner's --dask_client_address) are known to Beam's parser."""
    import importlib

    for arg in rewrite_runner(args):
        if arg.startswith("--runner=") and "." in arg:
            module = arg.split("=", 1)[1].rsplit(".", 1)[0]
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # Beam reports a runner it cannot import when it creates the runner


def unknown_beam_args(args: Sequence[str]) -> List[str]:
    """The items of `args` that no Beam pipeline option accepts.

    Parsed the way `PipelineOptions.get_all_options` parses (with every registered
    PipelineOptions subclass), where Beam would only log "Discarding unparseable
    args" and run with the defaults.
    """
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    _register_runner_options(args)
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    _, unknown = parser.parse_known_args(list(args))
    return unknown


def split_beam_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], help_command: str = ""):
    """(the command's parsed flags, the Beam pipeline options), or a parser error
    naming the first flag that is neither (a typo like --batch_sise must not run
    with the default). `help_command`: the command whose --help lists the flags."""
    args, rest = parser.parse_known_args(argv)
    unknown = unknown_beam_args(rest)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        what = "flag" if flag.startswith("-") else "argument"
        parser.error(f"unrecognized {what} {flag.split('=', 1)[0]}: neither a {parser.prog} flag nor a Beam "
                     f"pipeline option (see {help_command or parser.prog} --help)")
    return args, list(rest)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written, and every flag's default (or that it is required)."""

    def _get_help_string(self, action):
        if action.required:
            return (action.help or "") + " (required)"
        return super()._get_help_string(action)


BEAM_OPTIONS_EPILOG = textwrap.fill("Any other --flag must be an Apache Beam pipeline option (--runner, --direct_num_workers, "
                       "--direct_running_mode, Dataflow, Flink, portable, Dask options); anything else fails, "
                       "naming it. --runner=DaskRunner means " + CM_DASK_RUNNER + "; with no --runner, "
                       + DEFAULT_RUNNER + ".", 88)


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of a cm-beam command: flags spelled in full (an abbreviation
    could silently take a Beam option's place), every default in --help."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=BEAM_OPTIONS_EPILOG,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """PipelineOptions from the flags an entry point did not parse itself."""
    args = rewrite_runner(beam_args, DEFAULT_RUNNER)
    options = PipelineOptions(args)
    runner = options.view_as(StandardOptions).runner or ""
    if runner.endswith("DaskRunner") and "--dask_client_address" not in " ".join(args):
        _LOG.warning("DaskRunner without --dask_client_address starts a local dask cluster")
    return options


BeamOptions = Union[PipelineOptions, Sequence[str], None]


def as_pipeline_options(beam_options: BeamOptions) -> Tuple[PipelineOptions, List[str]]:
    """(PipelineOptions, the flags they were made from) for a stage's `beam_options`:
    Beam flags (`["--runner=DataflowRunner", ...]`) or PipelineOptions. Flags go
    through `pipeline_options` (runner aliases, the default runner); PipelineOptions
    get the default runner if they name none."""
    if isinstance(beam_options, PipelineOptions):
        standard = beam_options.view_as(StandardOptions)
        if not standard.runner:
            standard.runner = DEFAULT_RUNNER
        flags = [f"--{k}={v}" for k, v in sorted(beam_options.get_all_options(drop_default=True).items())]
        return beam_options, flags
    flags = list(beam_options or ())
    return pipeline_options(flags), flags


class JobNotExecuted(RuntimeError):
    """The runner built the job without running it (`--dry_run`, `--template_location`).

    Such a run reports DONE, but its outputs do not exist: callers must not write a
    manifest, so `run_pipeline` raises this instead of returning.
    """


def translation_only_flag(options: PipelineOptions) -> Optional[str]:
    """The option that makes a runner only build the job (--dry_run, --template_location), or None."""
    all_options = options.get_all_options(drop_default=True)
    if all_options.get("dry_run"):
        return "--dry_run"
    if all_options.get("template_location"):
        return "--template_location"
    return None


def run_pipeline(pipeline: beam.Pipeline, what: str = "pipeline", return_result: bool = False):
    """Runs `pipeline` to completion; returns its wall time in seconds (and the
    PipelineResult, for its metrics, with `return_result`).

    Raises RuntimeError if the job ends in any state but DONE (e.g. a Dataflow job
    that was cancelled), so that no caller marks a failed run's output complete, and
    JobNotExecuted if the options only build the job.
    """
    start = time.time()
    # Local runners move every stage's data through this process and its workers:
    # keep glibc from hoarding the freed buffers (cm_beam/runtime/malloc_tuning.py).
    malloc_tuning.tune_malloc()
    # Local worker processes share the cores: one BLAS thread pool each of the whole
    # machine would oversubscribe them (cm_beam/runtime/worker_threads.py).
    with worker_threads.local_worker_blas_threads(pipeline._options):
        result = pipeline.run()
        state = result.wait_until_finish()
    if state is not None and state != PipelineState.DONE:
        raise RuntimeError(f"{what} ended in state {state}, not DONE")
    flag = translation_only_flag(pipeline._options)
    if flag:
        raise JobNotExecuted(f"{what}: the job was built but not run ({flag}); no output, no manifest")
    seconds = time.time() - start
    return (seconds, result) if return_result else seconds


# argparse helpers: argparse names the flag in its error, we say what is wrong.
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def str2bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="Directory (local or gs://) for the output shards and manifest.json.")
    parser.add_argument("--overwrite", action="store_true", help="Replace the contents of a non-empty --output_dir.")


def verbose_requested(argv: Sequence[str]) -> bool:
    """Whether argv asks for --verbose (read before parsing: logging is set up first)."""
    for arg in argv:
        if arg == "--verbose":
            return True
        if arg.startswith("--verbose="):
            try:
                return str2bool(arg.split("=", 1)[1])
            except argparse.ArgumentTypeError:
                return False
    return False


class _OwnRecordsOnly(logging.Filter):
    """Keeps cm-beam's own log records; third-party ones (Beam's worker tracebacks, its
    'Resource module is not available' warning, TensorFlow/absl) only with --verbose.

    A failure reaches the user anyway: as the exception the command raises, or as
    its one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(("cm_beam", "pipelines", "__main__"))


def configure_logging(verbose: bool = False) -> None:
    import os

    before = list(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = [h for h in logging.getLogger().handlers if h not in before]  # not a host's (pytest's) handlers
    if verbose:
        for noisy in ("apache_beam", "absl"):
            logging.getLogger(noisy).setLevel(logging.INFO)
        return
    # TensorFlow's C++ logging (the E0000/W0000 lines about CUDA, cuDNN, XLA) reads this
    # when TensorFlow is first imported, which happens after this point.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for noisy in ("apache_beam", "absl", "tensorflow", "keras"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for handler in ours:
        if not any(isinstance(f, _OwnRecordsOnly) for f in handler.filters):
            handler.addFilter(_OwnRecordsOnly())


def import_quietly(module: str) -> None:
    """Imports `module` with the process's stderr (fd 2) captured, shown only if the import fails.

    TensorFlow's C++ runtime writes its start-up lines (`I0000`/`E0000` from absl, about
    oneDNN, CUDA, cuDNN) straight to fd 2 before any Python logging setting applies,
    and TF_CPP_MIN_LOG_LEVEL does not reach them.
    """
    import importlib
    import os
    import tempfile

    if module in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            importlib.import_module(module)
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                capture.seek(0)
                sys.stderr.write(capture.read().decode("utf-8", "replace"))


def run_main(prog: str, run: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]],
             summarize: Callable[[Any], None], verbose: bool = False, quiet_imports: Sequence[str] = ()) -> None:
    """The body of every command's `main`: logging, run, one error line for bad input.

    Bad input (InputError) prints `<prog>: error: ...` and exits 2, with no traceback:
    the message already names the flag, file or row. A job that was only built
    (--dry_run, --template_location) says so and writes nothing.
    """
    from cm_beam.errors import InputError

    configure_logging(verbose)
    if not verbose:
        for module in quiet_imports:
            try:
                import_quietly(module)
            except ImportError:
                pass  # the command reports a missing dependency where it needs it
    try:
        result = run(argv)
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobNotExecuted as e:
        print(f"{prog}: {e}")
        return
    summarize(result)
