"""`cm-select`: pick the next labeling batch by Cluster-Margin, as a Beam pipeline.

Reads per-example uncertainty scores, cluster assignments and exclusion lists
(labeled and already-queued examples), and writes `selection-*.parquet`
(example_id, cluster_id, margin, round, rank), `rejected-*.parquet` (scores rows
that are not valid, with a reason) and `manifest.json` last.

    cm-select --scores 'gs://b/scores/*.parquet' --clusters 'gs://b/clusters/*.parquet' \
        --exclude 'gs://b/labeled/*.parquet' --batch_size 100000 --output_dir gs://b/batch-01 \
        --runner DataflowRunner --project ... --region ... --temp_location gs://b/tmp

    cm-select --demo --output_dir demo_output/selection     # a generated pool, locally
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from cm_beam.io import artifacts
from cm_beam.io import table_io
from cm_beam.runtime import runner as cm_runner
from cm_beam.selection import uncertainty as unc
from cm_beam.errors import InputError
from cm_beam.selection.select_batch import REJECTED_SCHEMA, SELECTION_SCHEMA, STRATEGIES, SelectBatch

_LOG = logging.getLogger("cm_beam.selection.select_batch")
STATS_NAME = "_stats.json"
ROWS_PER_JOIN_BUCKET = 200_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cm-select", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", help="Glob of Parquet files with example_id and the score column (or probs).")
    p.add_argument("--clusters", help="Glob of Parquet files with example_id, cluster_id (cluster_size optional).")
    p.add_argument("--exclude", action="append", default=[],
                   help="Glob of Parquet or CSV files with example_id to exclude (labeled, queued). Repeatable.")
    p.add_argument("--uncertainty", choices=unc.UNCERTAINTIES, default="margin",
                   help="Score to rank by: read from the column of that name, else computed from probs.")
    p.add_argument("--multilabel", action="store_true",
                   help="probs are independent sigmoids: per-class binary margin |2p-1| reduced over classes.")
    p.add_argument("--multilabel_reduce", choices=("min", "mean"), default="min")
    p.add_argument("--batch_size", type=cm_runner.positive_int, help="k_t: examples to select.")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--margin_pool_size", type=cm_runner.positive_int, help="k_m: size of the margin pool M.")
    pool.add_argument("--margin_pool_factor", type=cm_runner.positive_float, default=None,
                      help="k_m = factor x k_t (default 10, the paper's recipe).")
    p.add_argument("--strategy", choices=STRATEGIES, default="cluster_margin")
    p.add_argument("--seed", type=int, default=0, help="Seed of the tie-breaks and the within-cluster picks.")
    p.add_argument("--demo", action="store_true",
                   help="Generate a demo pool (scores + clusters) next to --output_dir and select from it.")
    p.add_argument("--demo_size", type=cm_runner.positive_int, default=50_000, help="Examples in the --demo pool.")
    cm_runner.add_output_flags(p)
    return p


def _validate(args, parser) -> None:
    if not args.demo:
        for flag in ("scores", "batch_size"):
            if getattr(args, flag) is None:
                parser.error(f"--{flag} is required (or use --demo)")
    if args.strategy == "cluster_margin" and not args.clusters and not args.demo:
        parser.error("--clusters is required with --strategy cluster_margin")
    if args.margin_pool_factor is not None and args.margin_pool_factor < 1:
        parser.error(f"--margin_pool_factor must be >= 1 (k_m >= k_t), got {args.margin_pool_factor}")
    if args.batch_size and args.margin_pool_size and args.margin_pool_size < args.batch_size:
        parser.error(f"--margin_pool_size ({args.margin_pool_size}) must be >= --batch_size ({args.batch_size})")


def _make_demo(args) -> None:
    from cm_beam.testing import synthetic_pool

    demo_dir = os.path.join(os.path.dirname(os.path.abspath(args.output_dir.rstrip("/"))), "demo_pool")
    n = args.demo_size
    tables = synthetic_pool.make_pool(n, max(1, n // 5), seed=args.seed)
    args.scores = synthetic_pool.write_sharded(tables["scores"], demo_dir, "scores")
    args.clusters = synthetic_pool.write_sharded(tables["clusters"], demo_dir, "clusters")
    args.batch_size = args.batch_size or max(1, n // 50)
    print(f"demo pool: {n} examples in {demo_dir}; selecting {args.batch_size}", file=sys.stderr)


def _score_source(files: List[table_io.InputFile], uncertainty: str) -> Dict:
    """Which column the scores come from: the uncertainty's own column, else probs."""
    if all(uncertainty in f.columns for f in files):
        table_io.check_columns(files, "--scores", {uncertainty: "float"})
        return {"score_column": uncertainty, "num_classes": None}
    if all("probs" in f.columns for f in files):
        table_io.check_columns(files, "--scores", {"probs": "vector"})
        first = next((f for f in files if f.num_rows), None)
        num_classes = None
        if first is not None:
            table = table_io.read_table(first.path, "--scores", columns=["probs"]).slice(0, 1)
            num_classes = len(table.column("probs")[0].as_py() or [])
        return {"score_column": None, "num_classes": num_classes or 1}
    bad = next((f for f in files if uncertainty not in f.columns and "probs" not in f.columns), files[0])
    raise InputError(
        f"--scores: {bad.path} has neither column '{uncertainty}' nor 'probs' "
        f"(columns: {', '.join(bad.columns)}); all files must carry the same one")


class _WriteStatsFn(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, stats):
        artifacts.write_json(self._path, stats)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Runs cm-select; returns the manifest it wrote."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    _validate(args, parser)
    start = time.time()
    if args.demo:
        _make_demo(args)

    # Everything that can fail on bad input is checked before any work is done.
    score_files = table_io.inspect_inputs([args.scores], "--scores", {"example_id": "id"})
    source = _score_source(score_files, args.uncertainty)
    score_cols = ["example_id", source["score_column"] or "probs"]
    cluster_files = (table_io.inspect_inputs([args.clusters], "--clusters", {"example_id": "id", "cluster_id": "int"})
                     if args.clusters else [])
    exclude_files = table_io.inspect_inputs(args.exclude, "--exclude", {"example_id": "id"}) if args.exclude else []
    pool_rows = sum(f.num_rows for f in score_files)
    join_buckets = int(min(4096, max(1, math.ceil(pool_rows / ROWS_PER_JOIN_BUCKET))))
    transform = SelectBatch(
        batch_size=args.batch_size,
        margin_pool_size=args.margin_pool_size,
        margin_pool_factor=args.margin_pool_factor or 10.0,
        strategy=args.strategy,
        uncertainty=args.uncertainty,
        score_column=source["score_column"],
        num_classes=source["num_classes"],
        multilabel=args.multilabel,
        multilabel_reduce=args.multilabel_reduce,
        seed=args.seed,
        num_join_buckets=join_buckets,
    )
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)
    stats_path = artifacts.join(args.output_dir, STATS_NAME)

    options = cm_runner.pipeline_options(beam_args)
    pipeline = beam.Pipeline(options=options)
    inputs = {"scores": pipeline | "ReadScores" >> table_io.ReadTableBlocks(score_files, score_cols)}
    if cluster_files:
        inputs["clusters"] = pipeline | "ReadClusters" >> table_io.ReadTableBlocks(cluster_files, ["example_id", "cluster_id"])
    if exclude_files:
        inputs["exclude"] = pipeline | "ReadExclusions" >> table_io.ReadTableBlocks(exclude_files, ["example_id"])
    result = inputs | "SelectBatch" >> transform
    outputs = {"selection": SELECTION_SCHEMA, "rejected": REJECTED_SCHEMA}
    for name, schema in outputs.items():
        result[name] | f"Write{name.title()}" >> table_io.WriteBlockFiles(artifacts.join(args.output_dir, name), schema)
    result["stats"] | "WriteStats" >> beam.ParDo(_WriteStatsFn(stats_path))
    _LOG.info("cm-select: %d scores rows in %d files; selecting %d (%s)", pool_rows, len(score_files), args.batch_size, args.strategy)
    pipeline_seconds = cm_runner.run_pipeline(pipeline, "cm-select")

    for name, schema in outputs.items():
        table_io.ensure_output_file(artifacts.join(args.output_dir, name), schema)
    stats = artifacts.read_json(stats_path)
    FileSystems.delete([stats_path])
    manifest = {
        "stage": "select",
        "parameters": {
            "scores": args.scores, "clusters": args.clusters, "exclude": args.exclude,
            "uncertainty": args.uncertainty, "multilabel": args.multilabel, "multilabel_reduce": args.multilabel_reduce,
            "batch_size": args.batch_size, "margin_pool_size": transform.margin_pool_size,
            "margin_pool_factor": args.margin_pool_factor, "strategy": args.strategy, "seed": args.seed,
            "score_source": source["score_column"] or "probs",
        },
        "counts": stats["counts"],
        "rounds": stats["rounds"],
        "candidate_cluster_size_histogram": stats["candidate_cluster_size_histogram"],
        "batch_smaller_than_requested": stats["batch_smaller_than_requested"],
        "batch_diagnostics": stats["batch_diagnostics"],
        "notes": (["batch_size exceeds the candidates: all candidates were selected"]
                  if stats["batch_smaller_than_requested"] else []),
        "outputs": {"selection": "selection-*.parquet", "rejected": "rejected-*.parquet"},
        "timings": {"pipeline_seconds": round(pipeline_seconds, 3), "wall_seconds": round(time.time() - start, 3)},
    }
    artifacts.write_manifest(args.output_dir, manifest)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    cm_runner.run_main("cm-select", run, argv, _print_summary)


def _print_summary(manifest) -> None:
    c = manifest["counts"]
    clusters = c["clusters_touched"] if c["clusters_touched"] is not None else "-"
    print(
        f"cm-select: selected {c['selected']} of {c['candidates']} candidates ({clusters} clusters, "
        f"{manifest['rounds']} rounds); pool {c['pool']}, excluded {c['excluded']}, rejected {c['rejected']}, "
        f"unclustered candidates {c['unclustered']}; {manifest['timings']['wall_seconds']:.1f}s"
    )
    d = manifest.get("batch_diagnostics")
    if d and d["picks"]:
        print(f"cm-select: batch: {describe_diagnostics(d)}")
    for note in manifest["notes"]:
        print(f"cm-select: note: {note}")


def describe_diagnostics(d) -> str:
    """One line on how uncertain and how diverse a batch is (manifest's batch_diagnostics)."""
    parts = [f"picks per pass {d['picks_per_pass']}"]
    if d.get("singleton_share") is not None:
        parts.append(f"{100 * d['singleton_share']:.1f}% from clusters of size 1 in M")
    if d.get("median_uncertainty_rank") is not None:
        parts.append(f"median uncertainty rank {d['median_uncertainty_rank']:.0f} (M = {d['margin_pool_size']})")
    parts.append(f"{d['clusters_touched']} clusters touched, {d['clusters_with_multiple_picks']} with more than one pick")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
