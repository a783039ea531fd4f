"""Pipeline options and running, shared by every entry point in `pipelines/`.

* `--runner` short names Beam does not know are expanded (`DaskRunner`).
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
import time
from typing import Any, Callable, List, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from cm_beam.runtime import malloc_tuning
from cm_beam.runtime import worker_threads

_LOG = logging.getLogger("cm_beam")

RUNNER_ALIASES = {
    # Beam 2.77's own DaskRunner mixes a ParDo's tagged outputs and computes only the
    # last sink; cm_beam.runtime.dask_runner fixes both (see its docstring).
    "DaskRunner": "cm_beam.dask_runner.DaskRunner",
}
DEFAULT_RUNNER = "FnApiRunner"


def _rewrite_runner(args: Sequence[str]) -> List[str]:
    out, has_runner = [], False
    it = iter(args)
    for arg in it:
        if arg == "--runner":
            value = next(it, "")
            out.append(f"--runner={RUNNER_ALIASES.get(value, value)}")
            has_runner = True
        elif arg.startswith("--runner="):
            value = arg.split("=", 1)[1]
            out.append(f"--runner={RUNNER_ALIASES.get(value, value)}")
            has_runner = True
        else:
            out.append(arg)
    if not has_runner:
        out.append(f"--runner={DEFAULT_RUNNER}")
    return out


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """PipelineOptions from the flags an entry point did not parse itself."""
    args = _rewrite_runner(beam_args)
    options = PipelineOptions(args)
    runner = options.view_as(StandardOptions).runner or ""
    if runner.endswith("DaskRunner") and "--dask_client_address" not in " ".join(args):
        _LOG.warning("DaskRunner without --dask_client_address starts a local dask cluster")
    return options


class JobNotExecuted(RuntimeError):
    """The runner built the job without running it (`--dry_run`, `--template_location`).

    Such a run reports DONE, but its outputs do not exist: callers must not write a
    manifest, so `run_pipeline` raises this instead of returning.
    """


def _translation_only(options: PipelineOptions) -> Optional[str]:
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
    flag = _translation_only(pipeline._options)
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
