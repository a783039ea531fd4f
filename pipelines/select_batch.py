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
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from cm_beam.errors import InputError
from cm_beam.runtime import runner as cm_runner
from cm_beam.selection import uncertainty as unc
from cm_beam.selection.options import MULTILABEL_REDUCES, STRATEGIES, SelectOptions

DEMO_SIZE = 50_000


def build_parser() -> argparse.ArgumentParser:
    p = cm_runner.new_parser("cm-select", __doc__.split("\n\n")[0])
    p.add_argument("--scores", help="Glob of Parquet files with example_id and the score column (or probs).")
    p.add_argument("--clusters", help="Glob of Parquet files with example_id, cluster_id (cluster_size optional).")
    p.add_argument("--exclude", action="append", default=[],
                   help="Glob of Parquet or CSV files with example_id to exclude (labeled, queued). Repeatable.")
    p.add_argument("--uncertainty", choices=unc.UNCERTAINTIES, default="margin",
                   help="Score to rank by: read from the column of that name, else computed from probs.")
    p.add_argument("--multilabel", action="store_true",
                   help="probs are independent sigmoids: per-class binary margin |2p-1| reduced over classes.")
    p.add_argument("--multilabel_reduce", choices=MULTILABEL_REDUCES, default="min",
                   help="With --multilabel: reduce the per-class margins by min or mean.")
    p.add_argument("--batch_size", type=cm_runner.positive_int, help="k_t: examples to select.")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--margin_pool_size", type=cm_runner.positive_int, help="k_m: size of the margin pool M.")
    pool.add_argument("--margin_pool_factor", type=cm_runner.positive_float, default=None,
                      help="k_m = factor x k_t (default 1.25: the settings study's choice, docs/design.md).")
    p.add_argument("--strategy", choices=STRATEGIES, default="cluster_margin", help="Selection strategy.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the tie-breaks and the within-cluster picks.")
    p.add_argument("--demo", action="store_true",
                   help="Generate a demo pool (scores + clusters) next to --output_dir and select from it.")
    p.add_argument("--demo_size", type=cm_runner.positive_int, default=DEMO_SIZE, help="Examples in the --demo pool.")
    cm_runner.add_output_flags(p)
    return p


def _demo_dir(output_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output_dir.rstrip("/"))), "demo_pool")


def options_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SelectOptions:
    """SelectOptions from parsed flags (each option is the flag of the same name); a
    bad value is a parser error naming the flag. With --demo, the demo pool's paths
    and batch size stand in for the flags not given."""
    scores, clusters, batch_size = args.scores, args.clusters, args.batch_size
    if args.demo:
        demo_dir = _demo_dir(args.output_dir)
        scores = os.path.join(demo_dir, "scores-*.parquet")
        clusters = os.path.join(demo_dir, "clusters-*.parquet")
        batch_size = batch_size or max(1, args.demo_size // 50)
    else:
        for flag in ("scores", "batch_size"):
            if getattr(args, flag) is None:
                parser.error(f"--{flag} is required (or use --demo)")
    try:
        return SelectOptions(
            scores=scores, clusters=clusters, exclude=tuple(args.exclude), batch_size=batch_size,
            margin_pool_size=args.margin_pool_size, margin_pool_factor=args.margin_pool_factor,
            strategy=args.strategy, uncertainty=args.uncertainty, multilabel=args.multilabel,
            multilabel_reduce=args.multilabel_reduce, seed=args.seed, output_dir=args.output_dir,
            overwrite=args.overwrite)
    except InputError as e:
        parser.error(str(e))


def parse(argv: Optional[Sequence[str]] = None) -> Tuple[SelectOptions, List[str], argparse.Namespace]:
    """(the options, the Beam pipeline flags, the parsed flags) of a cm-select command line."""
    parser = build_parser()
    args, beam_args = cm_runner.split_beam_args(parser, argv)
    return options_from_args(args, parser), beam_args, args


def _write_demo(args, options: SelectOptions) -> None:
    from cm_beam.testing import synthetic_pool

    demo_dir = _demo_dir(args.output_dir)
    n = args.demo_size
    tables = synthetic_pool.make_pool(n, max(1, n // 5), seed=args.seed)
    synthetic_pool.write_sharded(tables["scores"], demo_dir, "scores")
    synthetic_pool.write_sharded(tables["clusters"], demo_dir, "clusters")
    print(f"demo pool: {n} examples in {demo_dir}; selecting {options.batch_size}", file=sys.stderr)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Runs cm-select; returns the manifest it wrote."""
    from cm_beam.selection.stage import run_select

    options, beam_args, args = parse(argv)
    if args.demo:
        _write_demo(args, options)
    return run_select(options, beam_args)


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
