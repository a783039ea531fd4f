"""`cm-nightly`: the nightly labeling batch: embed, cluster (once), select.

    cm-nightly --pool 'gs://b/pool/*.tfrecord' --model gs://b/models/today.keras \\
        --work_dir gs://b/cm-work --exclude 'gs://b/labeled/*.parquet' \\
        --batch_size 100000 --distance_threshold 0.3 \\
        --runner DataflowRunner --project P --region R --temp_location gs://b/tmp

    cm-nightly --demo --work_dir demo_output/work     # everything generated locally

One run:

1. embed: cm-embed scores and embeds the pool with today's model into
   <work_dir>/embeddings/<key>/; skipped when a complete output for the same pool
   content, model file and parameters exists (a rerun after a failure);
2. cluster: cm-cluster over those embeddings into <work_dir>/clusters/<pool>/<key>/,
   only when the work dir holds no clustering of this pool or with --recluster; when
   the pool grew since the newest clustering, `cm-cluster --extend` adds the new
   examples to it (or, above --recluster_fraction of the pool, a new clustering is
   built); the summary says which and why (stages.cluster.decision);
3. select: cm-select into <work_dir>/batches/<batch_name>/, excluding the --exclude
   lists and every earlier complete batch that no --exclude entry covers, so no
   image goes to labelers twice;
4. with --report (default with --demo): PNG plots next to the batch.

Before anything is written, the run takes <work_dir>/nightly.lease (one run per
work dir, cm_beam/nightly/lease.py): a second run refuses at once, naming the holder.

Every stage's options (EmbedOptions, ClusterOptions, SelectOptions, with the raw
--embed_arg/--cluster_arg/--select_arg flags read by that stage's own parser) are
built and checked before the lease is taken: a bad value fails at once, naming
the flag. Each stage then runs from its options (run_embed, run_cluster,
run_select) as its own Beam job on the runner given by the standard Beam options
(the job waits for each). The batch is complete when cm-select wrote its
manifest, which happens only after every earlier stage succeeded; a run that dies
leaves no complete batch, and the rerun reuses what finished and gives the same
batch. nightly.json and the report name the sha256 of the batch's manifest; a run
killed after cm-select leaves them absent (never stale), and the next run
regenerates them. `run(argv)` returns the summary dict (also written to
<batch_dir>/nightly.json, with paths inside the work dir relative to it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from cm_beam.clustering.hac_kernels import METRICS
from cm_beam.clustering.options import ClusterOptions
from cm_beam.embedding.image_sources import POOL_FORMATS
from cm_beam.embedding.keras_model_handler import MARGIN_REDUCES
from cm_beam.embedding.options import EmbedOptions
from cm_beam.errors import InputError
from cm_beam.io import artifacts
from cm_beam.nightly import lease as lease_mod
from cm_beam.nightly import work_dir as nw
from cm_beam.runtime import runner as cm_runner
from cm_beam.selection.options import STRATEGIES, SelectOptions
from cm_beam.selection.uncertainty import UNCERTAINTIES

_LOG = logging.getLogger("cm_beam.nightly")

# The stages' command lines, whose parsers read the raw --embed_arg/--cluster_arg/--select_arg flags.
STAGE_COMMANDS = {"embed": "pipelines.embed_pool", "cluster": "pipelines.build_clusters", "select": "pipelines.select_batch"}

# The demo's defaults: a pool that embeds, clusters and selects in about a minute.
DEMO_POOL_SIZE = 3000
DEMO_IMAGE_SIZE = 32
DEMO_BATCH_SIZE = 200
DEMO_SEED_SET = 300
DEMO_DISTANCE_THRESHOLD = 0.085  # cosine; about 30 images per cluster on the demo pool (the settings study's granularity)
# Above this share of new examples a grown pool is reclustered rather than extended: an
# extension never splits an existing cluster, so it drifts from a reclustering as the new
# share grows (benchmarks/README.md, "Growing pools": ARI against a reclustering 0.83 at
# 10% new, 0.78 at 25%, 0.70 at 50% on the demo pool).
DEFAULT_RECLUSTER_FRACTION = 0.25

EMBEDDING_SHARDS = "embeddings-*.parquet"
CLUSTER_SHARDS = "clusters-*.parquet"  # not rejected-*.parquet, which sits beside them

# Flags of cm-nightly that set a stage's option of the same name.
EMBED_FLAGS = ("pool_format", "image_size", "embedding_layer", "multilabel", "margin_reduce", "keep_probs",
               "inference_batch_size", "unsafe_model", "image_column", "image_key", "id_key", "max_image_pixels")
CLUSTER_FLAGS = ("distance_threshold", "metric", "num_neighbors")
SELECT_FLAGS = ("batch_size", "margin_pool_size", "margin_pool_factor", "strategy", "uncertainty", "seed")
# Options the nightly sets itself for each stage (paths inside the work dir); a raw
# stage flag may not set them.
STAGE_PATHS = {"embed": ("pool", "model", "output_dir", "overwrite"),
               "cluster": ("embeddings", "output_dir", "overwrite", "recut_from"),
               "select": ("scores", "clusters", "exclude", "output_dir", "overwrite", "demo", "demo_size")}
# Until a stage runs, its paths are not known; the options are checked with these.
_PENDING_PATH = "(set by cm-nightly)"


# Switches accept `--flag` and `--flag=true|false`: Flex Templates, Airflow and
# Kubernetes manifests pass every parameter as --name=value.
_BOOL = dict(nargs="?", const=True, default=False, type=cm_runner.str2bool, metavar="BOOL")


def build_parser() -> argparse.ArgumentParser:
    p = cm_runner.new_parser("cm-nightly", __doc__.split("\n\n")[0])
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--pool", help="Glob of the image pool (manifest Parquet/CSV of example_id+uri, TFRecord, or Parquet with image bytes).")
    io.add_argument("--model", help="Today's model: a .keras file (local or gs://).")
    io.add_argument("--work_dir", required=True, help="Directory (local or gs://) holding cached embeddings, clusters and the batches.")
    io.add_argument("--exclude", action="append", default=[],
                    help="Glob of Parquet/CSV files with example_id that are labeled or queued. Repeatable, or "
                         "comma-separated (templates pass one value). Earlier batches in <work_dir>/batches are "
                         "excluded automatically until an --exclude entry names them.")
    io.add_argument("--batch_name", default=None, help="Name of today's batch directory (default: today's date, UTC, YYYY-MM-DD).")
    io.add_argument("--replace_batch", **_BOOL, help="Recompute a batch that is already complete under this name.")
    sel = p.add_argument_group("selection (cm-select)")
    sel.add_argument("--batch_size", type=cm_runner.positive_int, help="k_t: examples in the batch.")
    pool = sel.add_mutually_exclusive_group()
    pool.add_argument("--margin_pool_factor", type=cm_runner.positive_float, default=None, help="k_m = factor x k_t (cm-select default 1.25, from the settings study).")
    pool.add_argument("--margin_pool_size", type=cm_runner.positive_int, default=None, help="k_m: size of the margin pool.")
    sel.add_argument("--strategy", choices=STRATEGIES, default=None, help="Selection strategy (default cluster_margin).")
    sel.add_argument("--uncertainty", choices=UNCERTAINTIES, default=None, help="Score to rank by (default margin).")
    sel.add_argument("--seed", type=int, default=0, help="Seed of the selection's tie-breaks and within-cluster picks (and of the demo).")
    clu = p.add_argument_group("clustering (cm-cluster)")
    clu.add_argument("--distance_threshold", type=cm_runner.positive_float, default=None, help="HAC cut eps (average linkage).")
    clu.add_argument("--metric", choices=METRICS, default=None, help="Distance of the clustering (cm-cluster default cosine).")
    clu.add_argument("--num_neighbors", type=cm_runner.positive_int, default=None, help="k of the candidate kNN graph.")
    clu.add_argument("--recluster", **_BOOL, help="Build new clusters from today's embeddings even if the work dir has some.")
    clu.add_argument("--recluster_fraction", type=cm_runner.positive_float, default=DEFAULT_RECLUSTER_FRACTION,
                     help="When the pool grew since the cached clustering, extend it (cm-cluster --extend) unless the "
                          "new examples are more than this fraction of today's pool; then recluster.")
    emb = p.add_argument_group("embedding (cm-embed)")
    emb.add_argument("--pool_format", choices=POOL_FORMATS, default=None, help="Layout of --pool (inferred when unambiguous).")
    emb.add_argument("--image_size", type=cm_runner.positive_int, default=None, help="Images are resized to this square size (cm-embed default 224).")
    emb.add_argument("--embedding_layer", default=None, help="Layer whose output is the embedding (plain classifiers).")
    emb.add_argument("--multilabel", **_BOOL, help="The model's outputs are independent sigmoids (multi-label margin).")
    emb.add_argument("--margin_reduce", choices=MARGIN_REDUCES, default=None, help="With --multilabel: reduce per-class margins by min or mean.")
    emb.add_argument("--keep_probs", **_BOOL, help="Keep the probability vectors in the embeddings.")
    emb.add_argument("--inference_batch_size", type=cm_runner.positive_int, default=None, help="Images per model call.")
    emb.add_argument("--unsafe_model", **_BOOL, help="Load the model without Keras safe_mode (trusted files only).")
    emb.add_argument("--image_column", default=None, help="Parquet pools: the image bytes column.")
    emb.add_argument("--image_key", default=None, help="TFRecord pools: the image bytes feature.")
    emb.add_argument("--id_key", default=None, help="TFRecord pools: the example id feature.")
    emb.add_argument("--max_image_pixels", type=cm_runner.positive_int, default=None,
                     help="Images whose header declares more pixels are rejected before decoding (cm-embed default).")
    raw = p.add_argument_group("any other stage flag")
    raw.add_argument("--embed_arg", action="append", default=[], help="A raw flag for cm-embed, e.g. --embed_arg=--fetch_threads=32 (checked by cm-embed's parser before "
                          "the first stage; not the paths cm-nightly sets). Repeatable.")
    raw.add_argument("--cluster_arg", action="append", default=[], help="A raw flag for cm-cluster. Repeatable.")
    raw.add_argument("--select_arg", action="append", default=[], help="A raw flag for cm-select. Repeatable.")
    io.add_argument("--keep_embeddings", type=cm_runner.non_negative_int, default=7,
                    help="After a complete batch, delete all but the newest N nights' embeddings (0 keeps all).")
    io.add_argument("--progress_seconds", type=cm_runner.positive_float, default=60.0,
                    help="While a stage's job runs, print a progress line this often.")
    io.add_argument("--lease_timeout", type=cm_runner.positive_float, default=lease_mod.DEFAULT_TIMEOUT_SECONDS,
                    help="One run per work dir: a run holds <work_dir>/nightly.lease and renews it while it runs; a "
                         "lease not renewed for this many seconds (its run died) is taken over (default %(default)s).")
    io.add_argument("--take_over_lease", **_BOOL,
                    help="Take the work dir's lease now even if it looks alive (only when its run is known to be gone).")
    io.add_argument("--verbose", **_BOOL,
                    help="Also print third-party logs (TensorFlow, Beam) and full tracebacks.")
    out = p.add_argument_group("report and demo")
    out.add_argument("--report", type=cm_runner.str2bool, default=None,
                     help="Write PNG plots (margins, cluster sizes, class mix) to <batch>/report (default: true with --demo).")
    out.add_argument("--demo", **_BOOL,
                     help="Generate an image pool and train a small model under <work_dir>/demo, then run the job on them.")
    out.add_argument("--demo_size", type=cm_runner.positive_int, default=DEMO_POOL_SIZE, help="Images in the --demo pool.")
    return p


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def _validate(args, parser, beam_args: Sequence[str]) -> None:
    if not args.demo:
        for flag in ("pool", "model", "batch_size"):
            if getattr(args, flag) is None:
                parser.error(f"--{flag} is required (or use --demo)")
    # The stages write their manifest when the runner says DONE. A dry run or a
    # template build says DONE without running anything: the nightly would record
    # embeddings and a batch that do not exist.
    from apache_beam.options.pipeline_options import PipelineOptions

    flag = cm_runner.translation_only_flag(PipelineOptions(list(beam_args)))
    if flag:
        raise InputError(f"{flag}: cm-nightly runs its stages one after another on real outputs; build a single "
                         f"stage (cm-embed, cm-cluster, cm-select) with {flag} instead")
    args.batch_name = nw.check_batch_name(args.batch_name or _today())
    args.exclude = [part.strip() for entry in args.exclude for part in entry.split(",") if part.strip()]
    if args.demo:
        _demo_defaults(args)


class StageOptions(NamedTuple):
    """Each stage's options as far as they are known before the run (the paths inside
    the work dir are set when the stage runs), and the Beam flags among its raw
    --<stage>_arg flags. `cluster` is None when no cut is given (the work dir's
    clusters are reused, or the run fails asking for --distance_threshold)."""

    embed: EmbedOptions
    cluster: Optional[ClusterOptions]
    select: SelectOptions
    beam_args: Dict[str, List[str]]
    cluster_values: Dict[str, Any]  # the clustering's flag values, for `cluster_options`


def cluster_options(stages: StageOptions, **values) -> ClusterOptions:
    """The clustering's options from the nightly's flags and `values` (the run's paths, or
    a cut decided during the run), checked again; InputError names the flag at fault."""
    try:
        return _options(ClusterOptions, {**stages.cluster_values, **values})
    except InputError as e:
        raise e.for_flag(lambda parameter: _stage_flag("cluster", parameter)) from None


def _given(args, names: Sequence[str]) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _stage_flag(stage: str, parameter: str) -> str:
    """The cm-nightly flag that sets a stage's option."""
    forwarded = {"embed": EMBED_FLAGS, "cluster": CLUSTER_FLAGS, "select": SELECT_FLAGS + ("exclude", "multilabel")}
    if parameter in forwarded[stage]:
        return f"--{parameter}"
    if stage == "select" and parameter == "multilabel_reduce":
        return "--margin_reduce"
    return f"--{stage}_arg=--{parameter}"


def _with_raw_flags(stage: str, known: Dict[str, Any], raw: Sequence[str]):
    """(the stage's option values: `known` overridden by the raw --<stage>_arg flags,
    the Beam flags among them). The stage's own parser reads them, so an unknown raw
    flag fails naming it, as it would on that command."""
    import importlib

    parser = importlib.import_module(STAGE_COMMANDS[stage]).build_parser()
    command, parser.prog = parser.prog, f"cm-nightly --{stage}_arg"
    for action in parser._actions:
        action.required = False  # the nightly gives those itself
        if action.dest in STAGE_PATHS[stage] and any(r == f"--{action.dest}" or r.startswith(f"--{action.dest}=")
                                                     for r in raw):
            parser.error(f"--{action.dest} is set by cm-nightly for each run, not by --{stage}_arg")
    parser.set_defaults(**known)
    args, beam_args = cm_runner.split_beam_args(parser, list(raw), help_command=command)
    return vars(args), beam_args


def _options(cls, values: Dict[str, Any]):
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def stage_options(args, parser: argparse.ArgumentParser) -> StageOptions:
    """Every stage's options from the nightly's flags, checked before the first stage
    starts: a bad value fails now, naming the cm-nightly flag, not after hours of
    embedding."""
    pending = {"output_dir": _PENDING_PATH, "overwrite": True}
    beam_args = {}
    stage = "embed"
    try:
        embed, beam_args["embed"] = _with_raw_flags("embed", {
            **pending, "pool": args.pool or _PENDING_PATH, "model": args.model or _PENDING_PATH,
            **_given(args, EMBED_FLAGS)}, args.embed_arg)
        embed_options = _options(EmbedOptions, embed)

        stage = "select"
        select_known = {**pending, "scores": _PENDING_PATH, "clusters": _PENDING_PATH, "exclude": list(args.exclude),
                        "multilabel": bool(args.multilabel), **_given(args, SELECT_FLAGS)}
        if args.multilabel and args.margin_reduce:
            select_known["multilabel_reduce"] = args.margin_reduce
        select, beam_args["select"] = _with_raw_flags("select", select_known, args.select_arg)
        select_options = _options(SelectOptions, select)

        stage = "cluster"
        cluster_values, beam_args["cluster"] = _with_raw_flags("cluster", {
            **pending, "embeddings": _PENDING_PATH, **_given(args, CLUSTER_FLAGS)}, args.cluster_arg)
        has_cut = any(cluster_values.get(k) is not None
                      for k in ("distance_threshold", "target_mean_cluster_size", "num_clusters"))
        cluster = _options(ClusterOptions, cluster_values) if has_cut else None
    except InputError as e:
        parser.error(str(e.for_flag(lambda parameter: _stage_flag(stage, parameter))))
    return StageOptions(embed_options, cluster, select_options, beam_args, cluster_values)


class _Progress:
    """Progress lines on stderr and the per-stage summaries of this run.

    While a stage's job runs (hours, on a large pool) a line every `heartbeat`
    seconds says which stage is still running and for how long.
    """

    def __init__(self, total: int, heartbeat: float = 60.0):
        self.total, self.index, self.started, self.heartbeat = total, 0, time.time(), heartbeat
        self.stages: Dict[str, Dict[str, Any]] = {}
        self._stop: Optional[threading.Event] = None

    def begin(self, name: str, what: str) -> float:
        self.index += 1
        print(f"cm-nightly [{self.index}/{self.total}] {name}: {what} ...", file=sys.stderr, flush=True)
        begun = time.time()
        self._stop_heartbeat()
        if self.heartbeat > 0:
            self._stop = stop = threading.Event()
            label = f"cm-nightly [{self.index}/{self.total}] {name}"

            def beat():
                while not stop.wait(self.heartbeat):
                    print(f"{label}: still running ({time.time() - begun:.0f} s)", file=sys.stderr, flush=True)

            threading.Thread(target=beat, name=f"cm-nightly-{name}-heartbeat", daemon=True).start()
        return begun

    def _stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def end(self, name: str, begun: float, status: str, line: str, **info) -> None:
        self._stop_heartbeat()
        seconds = round(time.time() - begun, 3)
        self.stages[name] = {"status": status, "seconds": seconds, **info}
        print(f"cm-nightly [{self.index}/{self.total}] {name}: {status}, {line} ({seconds:.1f} s)", file=sys.stderr, flush=True)


DEMO_PATHS = ("pool", "labels", "model", "labeled")


def _resolve_demo(stored: Dict[str, Any], demo_dir: str) -> Dict[str, Any]:
    return {**stored, **{k: os.path.join(demo_dir, stored[k]) for k in DEMO_PATHS}}


def read_demo_info(work_dir: str) -> Dict[str, Any]:
    """<work_dir>/demo/demo.json with its paths resolved against where the work dir is now."""
    demo_dir = os.path.join(work_dir, "demo")
    return _resolve_demo(artifacts.read_json(os.path.join(demo_dir, "demo.json")), demo_dir)


def _prepare_demo(args) -> Dict[str, Any]:
    """Generates (or reuses) the demo pool, model and labeled seed set under <work_dir>/demo.

    demo.json stores its paths relative to the demo directory (and the pool manifest's
    uris are relative to the manifest), so a work dir runs from any directory and a
    copy of it uses its own pool and model.
    """
    from cm_beam.testing import demo_pool

    demo_dir = artifacts.join(args.work_dir, "demo")
    if "://" in demo_dir:
        raise InputError("--work_dir: --demo writes the demo pool locally; give a local --work_dir")
    spec = {"num_images": args.demo_size, "seed": args.seed, "image_size": DEMO_IMAGE_SIZE, "seed_set": DEMO_SEED_SET, "version": 3}
    done = os.path.join(demo_dir, "demo.json")
    if os.path.exists(done) and artifacts.read_json(done).get("spec") == spec:
        stored = artifacts.read_json(done)
        print(f"cm-nightly demo: reusing the pool and model in {demo_dir}", file=sys.stderr)
    else:
        t0 = time.time()
        made = demo_pool.make_demo_inputs(demo_dir, args.demo_size, seed=args.seed, seed_set_size=DEMO_SEED_SET,
                                          image_size=DEMO_IMAGE_SIZE)
        print(f"cm-nightly demo: drew {made['num_images']} images ({made['num_originals']} originals, the rest "
              f"near-duplicates) and trained the model on {made['seed_set']} labeled ones (train accuracy "
              f"{made['train_accuracy']:.2f}) in {time.time() - t0:.1f} s", file=sys.stderr)
        stored = {"spec": spec, **made, **{k: os.path.relpath(made[k], demo_dir) for k in DEMO_PATHS}}
        artifacts.write_json(done, stored)  # last: the demo inputs are complete
    info = _resolve_demo(stored, demo_dir)
    args.pool, args.model = info["pool"], info["model"]
    if info["labeled"] not in args.exclude:
        args.exclude = [info["labeled"]] + list(args.exclude)
    return info


def _demo_defaults(args) -> None:
    """The demo's stage parameters, for the flags not given."""
    args.pool_format = args.pool_format or "manifest"
    args.image_size = args.image_size or DEMO_IMAGE_SIZE
    args.batch_size = args.batch_size or max(1, min(DEMO_BATCH_SIZE, args.demo_size // 15))
    args.distance_threshold = args.distance_threshold or DEMO_DISTANCE_THRESHOLD
    if args.report is None:
        args.report = True


def _embed(args, work: nw.WorkDir, stages: StageOptions, beam_args, progress: _Progress) -> nw.CompleteDir:
    from cm_beam.embedding import image_sources
    from cm_beam.embedding.stage import run_embed
    from cm_beam.embedding.keras_model_handler import file_sha256

    begun = progress.begin("embed", f"fingerprinting the pool {args.pool} and the model {args.model}")
    pool = image_sources.inspect_pool(args.pool, args.pool_format,
                                      **{k: getattr(args, k) for k in ("image_column", "image_key", "id_key") if getattr(args, k)})
    pool_fp = image_sources.input_fingerprint(pool)["sha256"]
    model_fp = file_sha256(args.model)
    flags = {k: getattr(args, k) for k in EMBED_FLAGS}
    key = nw.stable_hash({"pool": pool_fp, "model": model_fp, "flags": flags, "raw": args.embed_arg})
    cached = work.cached_embeddings(key, pool_fp, model_fp)
    if cached is not None:
        c = cached.manifest.get("counts", {})
        progress.end("embed", begun, "cached", f"{c.get('embedded')} embedded, {c.get('rejected')} rejected, "
                     f"same pool and model as {cached.path}", output=cached.path, counts=c, key=key)
        return cached
    directory = work.embeddings_dir(key)
    options = dataclasses.replace(stages.embed, pool=args.pool, model=args.model, output_dir=directory, overwrite=True)
    print(f"cm-nightly [{progress.index}/{progress.total}] embed: running cm-embed -> {directory}", file=sys.stderr, flush=True)
    manifest = run_embed(options, _stage_beam_args(stages, beam_args, "embed"))
    c = manifest.get("counts", {})
    progress.end("embed", begun, "ran", f"{c.get('embedded')} embedded, {c.get('rejected')} rejected of {c.get('read')} read",
                 output=directory, counts=c, key=key)
    return nw.CompleteDir(directory, manifest)


def _cluster(args, work: nw.WorkDir, embeddings: nw.CompleteDir, stages: StageOptions, beam_args,
             progress: _Progress) -> nw.CompleteDir:
    from pipelines.build_clusters import run_cluster

    pool_key = nw.pool_key(args.pool, args.pool_format, work.root)
    flags = {k: getattr(args, k) for k in CLUSTER_FLAGS}
    # Keyed by the embeddings it is built from (their directory name is their key).
    key = nw.stable_hash({"embeddings": nw.dir_name(embeddings.path), "flags": flags, "raw": args.cluster_arg})
    directory = work.clusters_dir(pool_key, key)
    existing = work.complete_clusters(pool_key)
    begun = progress.begin("cluster", f"looking for clusters of this pool under {work.clusters_root(pool_key)}")
    same = [d for d in existing if d.path.rstrip("/") == directory.rstrip("/")]
    reuse = same[-1] if same else (existing[-1] if existing and not args.recluster else None)
    decision = ("--recluster" if args.recluster else "no clustering of this pool in the work dir yet")
    if reuse is not None:
        c = reuse.manifest.get("counts", {})
        built_for = reuse.manifest.get("parameters", {})
        if not same and any(flags[k] is not None and built_for.get(k) not in (None, flags[k]) for k in flags):
            _LOG.warning("cached clusters %s were built with other parameters (%s); pass --recluster to rebuild",
                         reuse.path, {k: built_for.get(k) for k in flags})
        action, decision = ("cached", "built from today's embeddings") if same else _growth(args, reuse, embeddings)
        if action == "cached":
            progress.end("cluster", begun, "cached", f"reusing {reuse.path} ({_cluster_counts_line(c)}): {decision}",
                         output=reuse.path, counts=c, decision=decision)
            return reuse
        if action == "extend":
            return _extend(args, work, embeddings, reuse, pool_key, decision, stages, beam_args, progress, begun)
        # Recluster: at the cached clustering's eps and metric unless given.
        for k in ("distance_threshold", "metric"):
            if flags[k] is None:
                flags[k] = reuse.manifest.get(k) if k == "distance_threshold" else built_for.get(k)
        key = nw.stable_hash({"embeddings": nw.dir_name(embeddings.path), "flags": flags, "raw": args.cluster_arg})
        directory = work.clusters_dir(pool_key, key)
    options = cluster_options(stages, embeddings=artifacts.join(embeddings.path, EMBEDDING_SHARDS),
                              output_dir=directory, overwrite=True, **{k: v for k, v in flags.items() if v is not None})
    print(f"cm-nightly [{progress.index}/{progress.total}] cluster: running cm-cluster -> {directory}", file=sys.stderr, flush=True)
    manifest = run_cluster(options, _stage_beam_args(stages, beam_args, "cluster"))
    c = manifest.get("counts", {})
    status = "reclustered" if reuse is not None else "ran"
    progress.end("cluster", begun, status, f"{_cluster_counts_line(c)}: {decision}", output=directory, counts=c, key=key,
                 decision=decision)
    return nw.CompleteDir(directory, manifest)


def _growth(args, cached: nw.CompleteDir, embeddings: nw.CompleteDir):
    """("cached" | "extend" | "recluster", why) for a clustering built from other embeddings.

    The growth is counted, not matched: today's embedded rows minus the clustering's
    points (the extension itself counts the exact new and removed examples).
    """
    from pipelines import extend_clusters

    clustered = int(cached.manifest.get("counts", {}).get("points") or 0)
    today = int(embeddings.manifest.get("counts", {}).get("embedded") or 0)
    grown = today - clustered
    if grown <= 0:
        return "cached", f"the pool did not grow ({today} embedded today, {clustered} clustered)"
    share = grown / today
    if share > args.recluster_fraction:
        return "recluster", (f"{grown} new examples are {100 * share:.1f}% of today's pool, above "
                             f"--recluster_fraction {args.recluster_fraction}")
    try:
        extend_clusters.check_source(cached.path)
    except InputError as e:
        return "recluster", f"the pool grew by {grown} examples but the cached clustering cannot be extended ({e})"
    return "extend", (f"the pool grew by {grown} examples ({100 * share:.1f}% of today's pool, at most "
                      f"--recluster_fraction {args.recluster_fraction})")


def _extend(args, work, embeddings, cached, pool_key, decision, stages, beam_args, progress, begun) -> nw.CompleteDir:
    from pipelines.build_clusters import run_cluster

    key = nw.stable_hash({"embeddings": nw.dir_name(embeddings.path), "extend": nw.dir_name(cached.path),
                          "num_neighbors": args.num_neighbors})
    directory = work.clusters_dir(pool_key, key)
    # The stored cluster sums describe the embeddings the clustering was built from: with
    # another model (or when those embeddings are gone) they are recomputed from today's.
    source_embeddings = (cached.manifest.get("parameters") or {}).get("embeddings") or ""
    source = artifacts.read_manifest(source_embeddings.rsplit("/", 1)[0]) if source_embeddings else None
    same_model = bool(source) and source.get("model_fingerprint") == embeddings.manifest.get("model_fingerprint")
    options = ClusterOptions(extend=cached.path, embeddings=artifacts.join(embeddings.path, EMBEDDING_SHARDS),
                             output_dir=directory, overwrite=True, extend_recompute_state=not same_model,
                             **({"num_neighbors": args.num_neighbors} if args.num_neighbors is not None else {}))
    print(f"cm-nightly [{progress.index}/{progress.total}] cluster: extending {cached.path} -> {directory}",
          file=sys.stderr, flush=True)
    manifest = run_cluster(options, _stage_beam_args(stages, beam_args, "cluster"))
    c = manifest.get("counts", {})
    e = manifest.get("extension", {})
    decision += ("" if same_model else "; cluster sums recomputed from today's embeddings (another model)")
    progress.end("cluster", begun, "extended",
                 f"{_cluster_counts_line(c)}: {decision}; {e.get('new_examples')} new examples, "
                 f"{e.get('joined_existing')} joined existing clusters, {e.get('new_clusters')} new clusters",
                 output=directory, counts=c, key=key, decision=decision, extended_from=cached.path, extension=e)
    return nw.CompleteDir(directory, manifest)


def _stage_beam_args(stages: StageOptions, beam_args: Sequence[str], stage: str) -> List[str]:
    """A stage job's Beam flags: those among its raw --<stage>_arg flags, then the nightly's."""
    return list(stages.beam_args[stage]) + nw.stage_beam_args(beam_args, stage)


def _cluster_counts_line(counts: Dict[str, Any]) -> str:
    parts = [f"{k} {counts[k]}" for k in ("points", "examples", "clusters", "singletons") if k in counts]
    return ", ".join(parts) or "counts in its manifest"


def _select(args, work: nw.WorkDir, embeddings, clusters, stages: StageOptions, beam_args, progress: _Progress):
    from cm_beam.selection.stage import run_select

    batch_dir = work.batch_dir(args.batch_name)
    pending = nw.pending_batches(work, args.batch_name, args.exclude)
    begun = progress.begin("select", f"{args.batch_size} examples, excluding {len(args.exclude)} list(s) and "
                                     f"{len(pending)} earlier batch(es) not yet labeled")
    # The old batch stops being complete (its manifest goes first), then everything in
    # its directory that described it goes: a killed run can leave no nightly.json or
    # report of another batch beside a new one.
    nw.clear_batch_dir(batch_dir)
    excludes = list(args.exclude) + [nw.selection_glob(b.path) for b in pending]
    options = dataclasses.replace(
        stages.select, scores=artifacts.join(embeddings.path, EMBEDDING_SHARDS),
        clusters=artifacts.join(clusters.path, CLUSTER_SHARDS), exclude=excludes, output_dir=batch_dir, overwrite=True)
    manifest = run_select(options, _stage_beam_args(stages, beam_args, "select"))
    nw.remove_temp(batch_dir)
    c = manifest.get("counts", {})
    drew_from = nw.batch_clusters(batch_dir)
    margin_pool = (f" in {c.get('clusters_touched')} clusters" if c.get("clusters_touched") is not None else "")
    progress.end("select", begun, "ran",
                 f"selected {c.get('selected')} from a margin pool of {c.get('candidates')} candidates{margin_pool}; "
                 f"the batch draws from {drew_from} clusters; pool {c.get('pool')}, excluded {c.get('excluded')}, "
                 f"unclustered (singletons) {c.get('unclustered_eligible')}",
                 output=batch_dir, counts=c, batch_clusters=drew_from,
                 auto_excluded=[nw.batch_name_of(b.path) for b in pending])
    return batch_dir, manifest


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs the nightly job; returns its summary (also in <batch_dir>/nightly.json)."""
    parser = build_parser()
    args, beam_args = cm_runner.split_beam_args(parser, argv)
    _validate(args, parser, beam_args)
    stages = stage_options(args, parser)
    if "://" not in args.work_dir:
        # Every path the run derives is then independent of the directory it ran in.
        args.work_dir = os.path.abspath(args.work_dir)
    work = nw.WorkDir(args.work_dir)
    batch_dir = work.batch_dir(args.batch_name)
    done = artifacts.read_manifest(batch_dir)
    complete = done is not None and done.get("stage") == "select" and not args.replace_batch
    if not complete and not args.demo and args.distance_threshold is None and (
            args.recluster or not work.complete_clusters(nw.pool_key(args.pool, args.pool_format, work.root))):
        raise InputError("--distance_threshold: required, since the work dir holds no clusters of this pool yet"
                         + (" (--recluster)" if args.recluster else ""))

    # One run per work dir, before anything is written (the demo inputs included).
    lease = lease_mod.acquire(work.root, args.batch_name, timeout_seconds=args.lease_timeout,
                              take_over=args.take_over_lease)
    try:
        return _run_holding(args, stages, beam_args, work, lease)
    finally:
        lease.release()


def _run_holding(args, stages: StageOptions, beam_args, work: nw.WorkDir, lease) -> Dict[str, Any]:
    started = time.time()
    demo = _prepare_demo(args) if args.demo else None
    batch_dir = work.batch_dir(args.batch_name)

    done = artifacts.read_manifest(batch_dir)  # again: read under the lease
    if done is not None and done.get("stage") == "select" and not args.replace_batch:
        return _complete_batch(args, work, batch_dir, done, demo, lease)

    progress = _Progress(total=4 if args.report else 3, heartbeat=args.progress_seconds)
    try:
        embeddings = _embed(args, work, stages, beam_args, progress)
        nw.remove_temp(embeddings.path)
        lease.check()
        clusters = _cluster(args, work, embeddings, stages, beam_args, progress)
        nw.remove_temp(clusters.path)
        lease.check()
        batch_dir, selection = _select(args, work, embeddings, clusters, stages, beam_args, progress)
        lease.check()
    finally:
        progress._stop_heartbeat()  # a failed stage must not leave its heartbeat printing

    summary = _batch_summary(args, batch_dir, progress.stages, embeddings.path, clusters.path, beam_args)
    summary["auto_excluded_batches"] = progress.stages["select"]["auto_excluded"]
    if args.report:
        begun = progress.begin("report", "plotting margins, cluster sizes and the class mix")
        try:
            written = _write_report(args, embeddings.path, clusters.path, batch_dir, demo)
        finally:
            progress._stop_heartbeat()
        progress.end("report", begun, "ran", f"{len(written['plots'])} plots in {artifacts.join(batch_dir, nw.REPORT)}",
                     output=artifacts.join(batch_dir, nw.REPORT), plots=written["plots"])
        summary["report"] = written
    summary["pruned_embeddings"] = work.prune_embeddings(args.keep_embeddings, embeddings.path)
    summary["removed_incomplete"] = work.remove_incomplete(keep=[embeddings.path, clusters.path])
    summary["wall_seconds"] = round(time.time() - started, 3)
    lease.check()
    nw.write_nightly_summary(work, batch_dir, summary)
    return summary


def _batch_summary(args, batch_dir: str, stages, embeddings: Optional[str], clusters: Optional[str],
                   beam_args) -> Dict[str, Any]:
    """nightly.json's content; bound to the batch by its manifest's sha256."""
    manifest = artifacts.read_manifest(batch_dir) or {}
    return {
        "status": "complete",
        "batch_name": args.batch_name,
        "batch_dir": batch_dir,
        "batch_manifest_sha256": nw.batch_manifest_sha256(batch_dir),
        "selection": nw.selection_glob(batch_dir),
        "stages": stages,
        "counts": manifest.get("counts", {}),
        "batch_diagnostics": manifest.get("batch_diagnostics"),
        "exclude": list(args.exclude),
        "auto_excluded_batches": [],
        "embeddings": embeddings,
        "clusters": clusters,
        "parameters": {k: v for k, v in vars(args).items()},
        "beam_args": list(beam_args),
    }


def _complete_batch(args, work: nw.WorkDir, batch_dir: str, manifest, demo, lease) -> Dict[str, Any]:
    """A batch already complete: returned as is, or its nightly.json and report regenerated
    when they are missing or describe another batch (a run killed after cm-select)."""
    sha = nw.batch_manifest_sha256(batch_dir)
    summary = nw.read_nightly_summary(work, batch_dir)
    report_json = artifacts.join(batch_dir, nw.REPORT, "report.json")
    had_report = bool(summary and summary.get("report")) or _exists(report_json)
    want_report = bool(args.report) or had_report
    stale = []
    if summary is None or summary.get("batch_manifest_sha256") != sha:
        stale.append(nw.NIGHTLY_SUMMARY)
    if want_report and (not _exists(report_json) or artifacts.read_json(report_json).get("batch_manifest_sha256") != sha):
        stale.append("report")
    if not stale:
        summary["status"] = "already complete"
        print(f"cm-nightly: batch {args.batch_name} is already complete in {batch_dir} "
              f"(--replace_batch to recompute it, --batch_name for another)", file=sys.stderr)
        return summary

    print(f"cm-nightly: batch {args.batch_name} in {batch_dir} is complete but its {' and '.join(stale)} "
          f"{'is' if len(stale) == 1 else 'are'} missing or describe another batch: regenerating from its manifest",
          file=sys.stderr)
    embeddings, clusters = nw.batch_inputs(work, manifest)
    stages = {"select": {"status": "complete", "seconds": 0.0, "output": batch_dir, "counts": manifest.get("counts", {}),
                         "batch_clusters": nw.batch_clusters(batch_dir)}}
    out = _batch_summary(args, batch_dir, stages, embeddings, clusters, [])
    out["exclude"] = list(manifest.get("parameters", {}).get("exclude") or [])
    out["parameters"] = {"select": manifest.get("parameters", {})}
    artifacts.remove_tree(artifacts.join(batch_dir, nw.REPORT))
    if want_report:
        if embeddings and clusters and _exists(embeddings) and _exists(clusters):
            out["report"] = _write_report(args, embeddings, clusters, batch_dir, demo)
        else:
            out["report"] = None
            print(f"cm-nightly: the report of {args.batch_name} cannot be regenerated: its embeddings or clusters "
                  f"({embeddings}, {clusters}) are gone; nightly.json says so", file=sys.stderr)
            out["report_missing"] = "the batch's embeddings or clusters no longer exist"
    lease.check()
    nw.write_nightly_summary(work, batch_dir, out)
    out["status"] = "repaired"
    return out


def _write_report(args, embeddings: str, clusters: str, batch_dir: str, demo) -> Dict[str, Any]:
    from cm_beam.nightly import report

    out_dir = artifacts.join(batch_dir, nw.REPORT)
    artifacts.remove_tree(out_dir)  # no plot of an earlier batch survives beside this one's
    return report.write_report(
        out_dir,
        embeddings=artifacts.join(embeddings, EMBEDDING_SHARDS),
        clusters=artifacts.join(clusters, CLUSTER_SHARDS),
        selection=nw.selection_glob(batch_dir),
        labels=demo["labels"] if demo else None,
        stamp={"batch_name": args.batch_name, "batch_manifest_sha256": nw.batch_manifest_sha256(batch_dir)},
    )


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import signal

    verbose = cm_runner.verbose_requested(sys.argv[1:] if argv is None else argv)

    def terminate(signum, frame):  # SIGTERM (a scheduler's stop): unwind, so the lease is released
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    cm_runner.run_main("cm-nightly", run, argv, _print_summary, verbose=verbose, quiet_imports=("tensorflow",))


def _print_summary(summary) -> None:
    if summary.get("status") == "already complete":
        print(f"cm-nightly: batch already complete: {summary.get('batch_dir')}")
        return
    if summary.get("status") == "repaired":
        print(f"cm-nightly: batch {summary['batch_name']} was complete; its nightly.json"
              f"{' and report' if summary.get('report') else ''} regenerated: {summary.get('batch_dir')}")
        return
    for name, stage in summary["stages"].items():
        print(f"cm-nightly: {name:8s} {stage['status']:7s} {stage['seconds']:8.1f} s  {stage.get('output', '')}")
    c = summary["counts"]
    print(f"cm-nightly: batch {summary['batch_name']}: {c.get('selected')} examples -> {summary['selection']} "
          f"(pool {c.get('pool')}, excluded {c.get('excluded')}, earlier batches auto-excluded "
          f"{len(summary['auto_excluded_batches'])}); {summary['wall_seconds']:.1f} s")
    if summary.get("batch_diagnostics"):
        from pipelines.select_batch import describe_diagnostics

        print(f"cm-nightly: batch: {describe_diagnostics(summary['batch_diagnostics'])}")
    if summary.get("report"):
        print(f"cm-nightly: report: {', '.join(summary['report']['plots'])}")


if __name__ == "__main__":
    main()
