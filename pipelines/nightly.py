"""`cm-nightly`: the nightly labeling batch: embed, cluster (once), select.

    cm-nightly --pool 'gs://b/pool/*.tfrecord' --model gs://b/models/today.keras \\
        --work_dir gs://b/cm-work --exclude 'gs://b/labeled/*.parquet' \\
        --batch_size 100000 --margin_pool_factor 10 --distance_threshold 0.3 \\
        --runner DataflowRunner --project P --region R --temp_location gs://b/tmp

    cm-nightly --demo --work_dir demo_output/work     # everything generated locally

One run:

1. embed: cm-embed scores and embeds the pool with today's model into
   <work_dir>/embeddings/<key>/; skipped when a complete output for the same pool
   content, model file and parameters exists (a rerun after a failure);
2. cluster: cm-cluster over those embeddings into <work_dir>/clusters/<pool>/<key>/,
   only when the work dir holds no clustering of this pool or with --recluster;
   examples added to the pool since are singletons (counted by cm-select);
3. select: cm-select into <work_dir>/batches/<batch_name>/, excluding the --exclude
   lists and every earlier complete batch that no --exclude entry covers, so no
   image goes to labelers twice;
4. with --report (default with --demo): PNG plots next to the batch.

Each stage is its own Beam job on the runner given by the standard Beam options
(the job waits for each). The batch is complete when cm-select wrote its
manifest, which happens only after every earlier stage succeeded; a run that dies
leaves no complete batch, and the rerun reuses what finished and gives the same
batch. `run(argv)` returns the summary dict (also written to
<batch_dir>/nightly.json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from cm_beam import artifacts
from cm_beam import nightly as nw
from cm_beam import runner as cm_runner
from cm_beam.errors import InputError

_LOG = logging.getLogger("cm_beam.nightly")

# The stage entry points, resolved when used (tests replace them to inject failures).
STAGE_MODULES = {"embed": "pipelines.embed_pool", "cluster": "pipelines.build_clusters", "select": "pipelines.select_batch"}

# The demo's defaults: a pool that embeds, clusters and selects in about a minute.
DEMO_POOL_SIZE = 3000
DEMO_IMAGE_SIZE = 32
DEMO_BATCH_SIZE = 200
DEMO_SEED_SET = 300
DEMO_DISTANCE_THRESHOLD = 0.05  # cosine; about 10 images per cluster on the demo pool, the paper's recipe

EMBEDDING_SHARDS = "embeddings-*.parquet"
CLUSTER_SHARDS = "clusters-*.parquet"  # not rejected-*.parquet, which sits beside them

# Flags of cm-nightly that are forwarded to a stage under the same name.
EMBED_FLAGS = ("pool_format", "image_size", "embedding_layer", "multilabel", "margin_reduce", "keep_probs",
               "inference_batch_size", "unsafe_model", "image_column", "image_key", "id_key")
CLUSTER_FLAGS = ("distance_threshold", "metric", "num_neighbors")
SELECT_FLAGS = ("batch_size", "margin_pool_size", "margin_pool_factor", "strategy", "uncertainty", "seed")


# Switches accept `--flag` and `--flag=true|false`: Flex Templates, Airflow and
# Kubernetes manifests pass every parameter as --name=value.
_BOOL = dict(nargs="?", const=True, default=False, type=cm_runner.str2bool, metavar="BOOL")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cm-nightly", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    pool.add_argument("--margin_pool_factor", type=cm_runner.positive_float, default=None, help="k_m = factor x k_t (cm-select default 10).")
    pool.add_argument("--margin_pool_size", type=cm_runner.positive_int, default=None, help="k_m: size of the margin pool.")
    sel.add_argument("--strategy", choices=("cluster_margin", "margin", "random"), default=None, help="Selection strategy (default cluster_margin).")
    sel.add_argument("--uncertainty", choices=("margin", "entropy", "least_confidence"), default=None, help="Score to rank by (default margin).")
    sel.add_argument("--seed", type=int, default=0, help="Seed of the selection's tie-breaks and within-cluster picks (and of the demo).")
    clu = p.add_argument_group("clustering (cm-cluster)")
    clu.add_argument("--distance_threshold", type=cm_runner.positive_float, default=None, help="HAC cut eps (average linkage).")
    clu.add_argument("--metric", default=None, help="Distance of the clustering (cm-cluster's choices; default cosine).")
    clu.add_argument("--num_neighbors", type=cm_runner.positive_int, default=None, help="k of the candidate kNN graph.")
    clu.add_argument("--recluster", **_BOOL, help="Build new clusters from today's embeddings even if the work dir has some.")
    emb = p.add_argument_group("embedding (cm-embed)")
    emb.add_argument("--pool_format", choices=("manifest", "tfrecord", "parquet"), default=None, help="Layout of --pool (inferred when unambiguous).")
    emb.add_argument("--image_size", type=cm_runner.positive_int, default=None, help="Images are resized to this square size (cm-embed default 224).")
    emb.add_argument("--embedding_layer", default=None, help="Layer whose output is the embedding (plain classifiers).")
    emb.add_argument("--multilabel", **_BOOL, help="The model's outputs are independent sigmoids (multi-label margin).")
    emb.add_argument("--margin_reduce", choices=("min", "mean"), default=None, help="With --multilabel: reduce per-class margins by min or mean.")
    emb.add_argument("--keep_probs", **_BOOL, help="Keep the probability vectors in the embeddings.")
    emb.add_argument("--inference_batch_size", type=cm_runner.positive_int, default=None, help="Images per model call.")
    emb.add_argument("--unsafe_model", **_BOOL, help="Load the model without Keras safe_mode (trusted files only).")
    emb.add_argument("--image_column", default=None, help="Parquet pools: the image bytes column.")
    emb.add_argument("--image_key", default=None, help="TFRecord pools: the image bytes feature.")
    emb.add_argument("--id_key", default=None, help="TFRecord pools: the example id feature.")
    raw = p.add_argument_group("any other stage flag")
    raw.add_argument("--embed_arg", action="append", default=[], help="A raw flag for cm-embed, e.g. --embed_arg=--fetch_threads=32. Repeatable.")
    raw.add_argument("--cluster_arg", action="append", default=[], help="A raw flag for cm-cluster. Repeatable.")
    raw.add_argument("--select_arg", action="append", default=[], help="A raw flag for cm-select. Repeatable.")
    io.add_argument("--keep_embeddings", type=cm_runner.non_negative_int, default=7,
                    help="After a complete batch, delete all but the newest N nights' embeddings (0 keeps all).")
    io.add_argument("--progress_seconds", type=cm_runner.positive_float, default=60.0,
                    help="While a stage's job runs, print a progress line this often.")
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
    if args.margin_pool_factor is not None and args.margin_pool_factor < 1:
        parser.error(f"--margin_pool_factor must be >= 1 (k_m >= k_t), got {args.margin_pool_factor}")
    if args.batch_size and args.margin_pool_size and args.margin_pool_size < args.batch_size:
        parser.error(f"--margin_pool_size ({args.margin_pool_size}) must be >= --batch_size ({args.batch_size})")
    joined = " ".join(beam_args)
    # The stages write their manifest when the runner says DONE. A dry run or a
    # template build says DONE without running anything: the nightly would record
    # embeddings and a batch that do not exist.
    for flag in ("--dry_run", "--template_location"):
        if flag in joined and not (flag == "--dry_run" and ("--dry_run=False" in joined or "--dry_run=false" in joined)):
            raise InputError(f"{flag}: cm-nightly runs its stages one after another on real outputs; build a single "
                             f"stage (cm-embed, cm-cluster, cm-select) with {flag} instead")
    args.batch_name = nw.check_batch_name(args.batch_name or _today())
    args.exclude = [part.strip() for entry in args.exclude for part in entry.split(",") if part.strip()]


def _stage(name: str) -> Callable[[List[str]], Dict[str, Any]]:
    module = importlib.import_module(STAGE_MODULES[name])
    return module.run


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


def _prepare_demo(args) -> Dict[str, Any]:
    """Generates (or reuses) the demo pool, model and labeled seed set under <work_dir>/demo."""
    from cm_beam import demo_pool

    demo_dir = artifacts.join(args.work_dir, "demo")
    if "://" in demo_dir:
        raise InputError("--work_dir: --demo writes the demo pool locally; give a local --work_dir")
    spec = {"num_images": args.demo_size, "seed": args.seed, "image_size": DEMO_IMAGE_SIZE, "seed_set": DEMO_SEED_SET, "version": 2}
    done = os.path.join(demo_dir, "demo.json")
    if os.path.exists(done) and artifacts.read_json(done).get("spec") == spec:
        info = artifacts.read_json(done)
        print(f"cm-nightly demo: reusing the pool and model in {demo_dir}", file=sys.stderr)
    else:
        t0 = time.time()
        made = demo_pool.make_demo_inputs(demo_dir, args.demo_size, seed=args.seed, seed_set_size=DEMO_SEED_SET,
                                          image_size=DEMO_IMAGE_SIZE)
        print(f"cm-nightly demo: drew {made['num_images']} images ({made['num_originals']} originals, the rest "
              f"near-duplicates) and trained the model on {made['seed_set']} labeled ones (train accuracy "
              f"{made['train_accuracy']:.2f}) in {time.time() - t0:.1f} s", file=sys.stderr)
        info = {"spec": spec, **made}
        artifacts.write_json(done, info)  # last: the demo inputs are complete
    args.pool, args.model = info["pool"], info["model"]
    args.pool_format = args.pool_format or "manifest"
    args.image_size = args.image_size or DEMO_IMAGE_SIZE
    args.batch_size = args.batch_size or max(1, min(DEMO_BATCH_SIZE, args.demo_size // 15))
    args.distance_threshold = args.distance_threshold or DEMO_DISTANCE_THRESHOLD
    if info["labeled"] not in args.exclude:
        args.exclude = [info["labeled"]] + list(args.exclude)
    if args.report is None:
        args.report = True
    return info


def _embed(args, work: nw.WorkDir, beam_args, progress: _Progress) -> nw.CompleteDir:
    from cm_beam import image_sources
    from cm_beam.keras_model_handler import file_sha256

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
    argv = ["--pool", args.pool, "--model", args.model, "--output_dir", directory, "--overwrite"]
    argv += nw.flags_to_argv(flags) + list(args.embed_arg) + nw.stage_beam_args(beam_args, "embed")
    print(f"cm-nightly [{progress.index}/{progress.total}] embed: running cm-embed -> {directory}", file=sys.stderr, flush=True)
    manifest = _stage("embed")(argv)
    c = manifest.get("counts", {})
    progress.end("embed", begun, "ran", f"{c.get('embedded')} embedded, {c.get('rejected')} rejected of {c.get('read')} read",
                 output=directory, counts=c, key=key)
    return nw.CompleteDir(directory, manifest)


def _cluster(args, work: nw.WorkDir, embeddings: nw.CompleteDir, beam_args, progress: _Progress) -> nw.CompleteDir:
    pool_key = nw.pool_key(args.pool, args.pool_format)
    flags = {k: getattr(args, k) for k in CLUSTER_FLAGS}
    # Keyed by the embeddings it is built from (their directory name is their key).
    key = nw.stable_hash({"embeddings": nw.dir_name(embeddings.path), "flags": flags, "raw": args.cluster_arg})
    directory = work.clusters_dir(pool_key, key)
    existing = work.complete_clusters(pool_key)
    begun = progress.begin("cluster", f"looking for clusters of this pool under {work.clusters_root(pool_key)}")
    same = [d for d in existing if d.path.rstrip("/") == directory.rstrip("/")]
    reuse = same[-1] if same else (existing[-1] if existing and not args.recluster else None)
    if reuse is not None:
        c = reuse.manifest.get("counts", {})
        built_for = reuse.manifest.get("parameters", {})
        if not same and any(flags[k] is not None and built_for.get(k) not in (None, flags[k]) for k in flags):
            _LOG.warning("cached clusters %s were built with other parameters (%s); pass --recluster to rebuild",
                         reuse.path, {k: built_for.get(k) for k in flags})
        progress.end("cluster", begun, "cached", f"reusing {reuse.path} ({_cluster_counts_line(c)})",
                     output=reuse.path, counts=c)
        return reuse
    argv = ["--embeddings", artifacts.join(embeddings.path, EMBEDDING_SHARDS), "--output_dir", directory, "--overwrite"]
    argv += nw.flags_to_argv(flags) + list(args.cluster_arg) + nw.stage_beam_args(beam_args, "cluster")
    print(f"cm-nightly [{progress.index}/{progress.total}] cluster: running cm-cluster -> {directory}", file=sys.stderr, flush=True)
    manifest = _stage("cluster")(argv)
    c = manifest.get("counts", {})
    progress.end("cluster", begun, "ran", _cluster_counts_line(c), output=directory, counts=c, key=key)
    return nw.CompleteDir(directory, manifest)


def _cluster_counts_line(counts: Dict[str, Any]) -> str:
    parts = [f"{k} {counts[k]}" for k in ("points", "examples", "clusters", "singletons") if k in counts]
    return ", ".join(parts) or "counts in its manifest"


def _select(args, work: nw.WorkDir, embeddings, clusters, beam_args, progress: _Progress):
    batch_dir = work.batch_dir(args.batch_name)
    pending = nw.pending_batches(work, args.batch_name, args.exclude)
    begun = progress.begin("select", f"{args.batch_size} examples, excluding {len(args.exclude)} list(s) and "
                                     f"{len(pending)} earlier batch(es) not yet labeled")
    flags = {k: getattr(args, k) for k in SELECT_FLAGS}
    excludes = list(args.exclude) + [nw.selection_glob(b.path) for b in pending]
    argv = ["--scores", artifacts.join(embeddings.path, EMBEDDING_SHARDS),
            "--clusters", artifacts.join(clusters.path, CLUSTER_SHARDS), "--output_dir", batch_dir, "--overwrite"]
    argv += nw.flags_to_argv(flags) + nw.flags_to_argv({"exclude": excludes, "multilabel": args.multilabel})
    if args.multilabel and args.margin_reduce:
        argv += ["--multilabel_reduce", args.margin_reduce]
    argv += list(args.select_arg) + nw.stage_beam_args(beam_args, "select")
    manifest = _stage("select")(argv)
    c = manifest.get("counts", {})
    progress.end("select", begun, "ran",
                 f"selected {c.get('selected')} of {c.get('candidates')} candidates in {c.get('clusters_touched')} clusters; "
                 f"pool {c.get('pool')}, excluded {c.get('excluded')}, unclustered (singletons) {c.get('unclustered_eligible')}",
                 output=batch_dir, counts=c, auto_excluded=[nw.batch_name_of(b.path) for b in pending])
    return batch_dir, manifest


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs the nightly job; returns its summary (also in <batch_dir>/nightly.json)."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    _validate(args, parser, beam_args)
    started = time.time()
    demo = _prepare_demo(args) if args.demo else None
    work = nw.WorkDir(args.work_dir)
    batch_dir = work.batch_dir(args.batch_name)

    done = artifacts.read_manifest(batch_dir)
    if done is not None and done.get("stage") == "select" and not args.replace_batch:
        summary_path = artifacts.join(batch_dir, nw.NIGHTLY_SUMMARY)
        summary = artifacts.read_json(summary_path) if _exists(summary_path) else {"batch_dir": batch_dir, "select": done}
        summary["status"] = "already complete"
        print(f"cm-nightly: batch {args.batch_name} is already complete in {batch_dir} "
              f"(--replace_batch to recompute it, --batch_name for another)", file=sys.stderr)
        return summary

    if args.distance_threshold is None and (args.recluster or not work.complete_clusters(nw.pool_key(args.pool, args.pool_format))):
        raise InputError("--distance_threshold: required, since the work dir holds no clusters of this pool yet"
                         + (" (--recluster)" if args.recluster else ""))
    progress = _Progress(total=4 if args.report else 3, heartbeat=args.progress_seconds)
    try:
        embeddings = _embed(args, work, beam_args, progress)
        clusters = _cluster(args, work, embeddings, beam_args, progress)
        batch_dir, selection = _select(args, work, embeddings, clusters, beam_args, progress)
    finally:
        progress._stop_heartbeat()  # a failed stage must not leave its heartbeat printing

    summary: Dict[str, Any] = {
        "status": "complete",
        "batch_name": args.batch_name,
        "batch_dir": batch_dir,
        "selection": nw.selection_glob(batch_dir),
        "stages": progress.stages,
        "counts": selection.get("counts", {}),
        "batch_diagnostics": selection.get("batch_diagnostics"),
        "exclude": list(args.exclude),
        "auto_excluded_batches": progress.stages["select"]["auto_excluded"],
        "embeddings": embeddings.path,
        "clusters": clusters.path,
        "parameters": {k: v for k, v in vars(args).items()},
        "beam_args": list(beam_args),
    }
    if args.report:
        from cm_beam import report

        begun = progress.begin("report", "plotting margins, cluster sizes and the class mix")
        try:
            written = _write_report(report, args, embeddings, clusters, batch_dir, demo)
        finally:
            progress._stop_heartbeat()
        progress.end("report", begun, "ran", f"{len(written['plots'])} plots in {artifacts.join(batch_dir, nw.REPORT)}",
                     output=artifacts.join(batch_dir, nw.REPORT), plots=written["plots"])
        summary["report"] = written
    summary["pruned_embeddings"] = work.prune_embeddings(args.keep_embeddings, embeddings.path)
    summary["wall_seconds"] = round(time.time() - started, 3)
    # After the batch's manifest: a summary for people; the batch's completeness is cm-select's manifest.
    artifacts.write_json(artifacts.join(batch_dir, nw.NIGHTLY_SUMMARY), summary)
    return summary


def _write_report(report, args, embeddings, clusters, batch_dir, demo) -> Dict[str, Any]:
    return report.write_report(
        artifacts.join(batch_dir, nw.REPORT),
        embeddings=artifacts.join(embeddings.path, EMBEDDING_SHARDS),
        clusters=artifacts.join(clusters.path, CLUSTER_SHARDS),
        selection=nw.selection_glob(batch_dir),
        labels=demo["labels"] if demo else None,
    )


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cm_runner.run_main("cm-nightly", run, argv, _print_summary)


def _print_summary(summary) -> None:
    if summary.get("status") == "already complete":
        print(f"cm-nightly: batch already complete: {summary.get('batch_dir')}")
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
