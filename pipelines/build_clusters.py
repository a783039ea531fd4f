"""`cm-cluster`: average-linkage HAC of a pool's embeddings, cut at a distance, on Beam.

Reads Parquet with `example_id` and `embedding` and writes `clusters-*.parquet`
(example_id, cluster_id int64 >= 0, cluster_size int64, leaf_id int64), `merges-*.parquet`
(every merge: cluster_a, cluster_b, merged, height, size, round; see
cm_beam/clustering/hierarchy_kernels.py), `rejected-*.parquet` (example_id, reason: non_finite,
zero_vector, null_embedding, empty_embedding) and `manifest.json` last (parameters, the
cut, counts, size histogram, rounds, kNN recall, timings, input fingerprint).

The cut: exactly one of --distance_threshold E (the rounds run to --max_distance, default
E, and the clusters are cut at E), --target_mean_cluster_size S or --num_clusters C (the
rounds run to --max_distance D, required, then the cut is the achievable one whose mean
cluster size, resp. cluster count, is nearest the target; ties to the finer cut).

Re-cut an existing clustering without reclustering (reads its clusters and merges,
writes the same files and a manifest whose `cut` names the source):

    cm-cluster --recut_from work/clusters --output_dir work/clusters-10 --target_mean_cluster_size 10

    cm-cluster --embeddings 'gs://b/emb/embeddings-*.parquet' --output_dir gs://b/clusters \
        --distance_threshold 0.2 --runner DataflowRunner --project ... --temp_location ...

    cm-cluster --embeddings 'emb/*.parquet' --output_dir clusters --distance_threshold 0.2 \
        --direct_num_workers 2 --direct_running_mode multi_processing
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from cm_beam.io import artifacts
from cm_beam.clustering import hierarchy
from cm_beam.io import table_io
from cm_beam.clustering import build_clusters as cl
from cm_beam.runtime import runner as cm_runner
from cm_beam.clustering.hac_kernels import METRICS
from cm_beam.clustering.options import KNN_MODES, ClusterOptions
from cm_beam.errors import InputError

_LOG = logging.getLogger("cm_beam.clustering.build_clusters")
SUMMARY_NAME = "_summary.json"
# Rows per Beam element when reading: big blocks amortise per-element overhead.
BLOCK_ROWS = 32_768


def build_parser() -> argparse.ArgumentParser:
    p = cm_runner.new_parser("cm-cluster", __doc__.split("\n\n")[0])
    p.add_argument("--embeddings", help="Glob of Parquet files with example_id and embedding (list of floats).")
    cut = p.add_argument_group("cut (exactly one of --distance_threshold, --target_mean_cluster_size, --num_clusters)")
    cut.add_argument("--distance_threshold", type=cm_runner.positive_float, default=None,
                     help="eps: the average-linkage distance at which the dendrogram is cut (scipy fcluster 'distance').")
    cut.add_argument("--target_mean_cluster_size", type=cm_runner.positive_float, default=None,
                     help="Cut where the mean cluster size (points / clusters) is nearest this; needs --max_distance.")
    cut.add_argument("--num_clusters", type=cm_runner.positive_int, default=None,
                     help="Cut where the number of clusters is nearest this; needs --max_distance.")
    cut.add_argument("--max_distance", type=cm_runner.positive_float, default=None,
                     help="eps the merge rounds run to (the hierarchy in merges-*.parquet covers it); default "
                          "--distance_threshold, required with the other two rules. Not with --recut_from.")
    cut.add_argument("--recut_from", default=None,
                     help="Output directory of an earlier cm-cluster run: cut its hierarchy again (no --embeddings).")
    p.add_argument("--metric", choices=METRICS, default="cosine",
                   help="cosine (vectors L2-normalised on input) or sqeuclidean (squared Euclidean).")
    p.add_argument("--num_neighbors", type=cm_runner.positive_int, default=cl.DEFAULT_NUM_NEIGHBORS,
                   help="k of the kNN graph that chooses candidate pairs (edges above eps are not needed).")
    p.add_argument("--knn_mode", choices=KNN_MODES, default="auto",
                   help="exact (blockwise brute force), ivf (k-means partitions), or auto: exact up to "
                        "--exact_max_points points.")
    p.add_argument("--exact_max_points", type=cm_runner.non_negative_int, default=cl.DEFAULT_EXACT_MAX_POINTS,
                   help="Largest pool that --knn_mode auto clusters with exact kNN.")
    p.add_argument("--num_partitions", type=cm_runner.non_negative_int, default=0,
                   help=f"IVF partitions (0: one per {cl.DEFAULT_POINTS_PER_PARTITION} points).")
    p.add_argument("--num_probes", type=cm_runner.positive_int, default=cl.DEFAULT_NUM_PROBES,
                   help="ivf: most partitions a point searches: its own, then those across its nearest "
                        "partition boundaries, only while a boundary is nearer than the k-th neighbour "
                        "found in its own partition (farther ones cannot hold a nearer point).")
    p.add_argument("--num_shards", type=cm_runner.positive_int, default=cl.DEFAULT_NUM_SHARDS,
                   help="Spatial shards of the cluster state (and exact-kNN blocks).")
    p.add_argument("--max_rounds", type=cm_runner.non_negative_int, default=cl.DEFAULT_MAX_ROUNDS,
                   help="Distributed merge rounds unrolled in the pipeline before the in-memory finish.")
    p.add_argument("--max_inmemory_edges", type=cm_runner.non_negative_int, default=cl.DEFAULT_MAX_INMEMORY_EDGES,
                   help="Candidate edges under which the remaining clustering finishes on one worker.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the k-means initialisations.")
    ext = p.add_argument_group("extension (pipelines/extend_clusters.py)")
    ext.add_argument("--extend", default=None,
                     help="Output directory of an earlier cm-cluster run: extend its clusters by the examples of "
                          "--embeddings (the whole current pool) it does not hold, at its eps and metric.")
    ext.add_argument("--extend_cluster_neighbors", type=cm_runner.positive_int, default=10,
                     help="With --extend: existing clusters (smallest exact linkage within eps) each new example "
                          "is a candidate of.")
    ext.add_argument("--extend_recompute_state", type=cm_runner.str2bool, nargs="?", const=True, default=False,
                     help="With --extend: recompute every existing cluster's state from its members' current "
                          "embeddings (e.g. after a new embedding model), not only of clusters that lost members.")
    cm_runner.add_output_flags(p)
    return p


class _WriteSummaryFn(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, summary):
        artifacts.write_json(self._path, summary)


def _stage_seconds(result) -> Dict[str, float]:
    """Time spent inside each stage's DoFns, summed over workers (Beam counters ms_*)."""
    out: Dict[str, float] = {}
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners do not report metrics
        return out
    for c in counters:
        name = c.key.metric.name
        if c.key.metric.namespace == "cm_cluster" and name.startswith("ms_"):
            value = c.committed if c.committed is not None else c.attempted
            out[name[3:]] = round(out.get(name[3:], 0.0) + value / 1000.0, 3)
    return out


# The files of a clustering (cm-cluster, its --extend), each `<name>-*.parquet`.
OUTPUTS = {name: f"{name}-*.parquet" for name in ("clusters", "rejected", "merges", "state")}


def write_clustering(out, output_dir: str) -> None:
    """Writes the clusters, rejected rows, merges and cluster state of a BuildClusters
    (or ExtendClusters) output under `output_dir`."""
    schemas = {"clusters": cl.CLUSTERS_SCHEMA, "rejected": cl.REJECTED_SCHEMA, "merges": cl.MERGES_SCHEMA,
               "state": cl.STATE_SCHEMA}
    for name, schema in schemas.items():
        out[name] | f"Write{name.capitalize()}" >> table_io.WriteTableBlocks(artifacts.join(output_dir, name), schema)


def manifest_timings(result, pipeline_seconds: float, start: float) -> Dict:
    """The manifest's `timings`: the Beam job, the whole command, and each stage's DoFns."""
    return {
        "pipeline_seconds": round(pipeline_seconds, 3),
        "wall_seconds": round(time.time() - start, 3),
        "stage_seconds": _stage_seconds(result),
        "stage_seconds_note": "time inside each stage's DoFns, summed over workers",
    }


# Errors raised inside the pipeline that name a flag; workers in other processes wrap them.
_FLAG_ERROR = re.compile(r"InputError: ((?:--embeddings|--target_mean_cluster_size|--num_clusters|--distance_threshold)"
                         r"[: ].*?)(?: \[while running|\n|$)")


def _unwrap_input_error(e: Exception) -> None:
    found = _FLAG_ERROR.search(str(e))
    if found:
        raise InputError(found.group(1)) from e


def options_from_args(args: argparse.Namespace) -> ClusterOptions:
    """ClusterOptions from parsed flags (each option is the flag of the same name); a
    bad combination raises InputError naming the flag."""
    return ClusterOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterOptions)})


def parse(argv: Optional[Sequence[str]] = None) -> Tuple[ClusterOptions, List[str]]:
    """(the options, the Beam pipeline flags) of a cm-cluster command line."""
    parser = build_parser()
    args, beam_args = cm_runner.split_beam_args(parser, argv)
    return options_from_args(args), beam_args


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Runs cm-cluster; returns the manifest it wrote (with `distance_threshold`,
    `num_clusters`, `mean_cluster_size` of the cut at the top level)."""
    options, beam_args = parse(argv)
    return run_cluster(options, beam_args)


def run_cluster(options: ClusterOptions, beam_options: cm_runner.BeamOptions = None) -> Dict:
    """Runs the clustering stage from `options`; returns the manifest it wrote."""
    args = options  # the options carry the flags' names
    beam_args = beam_options
    start = time.time()
    if args.extend is not None:
        from pipelines import extend_clusters

        return extend_clusters.run_extend(args, beam_args, start)
    if args.recut_from is not None:
        return _recut(args, beam_args, start)
    # Everything that can fail on bad input is checked before any work is done.
    files = table_io.inspect_inputs([args.embeddings], "--embeddings", {"example_id": "id", "embedding": "vector"})
    transform = options.build_clusters(max_points=sum(f.num_rows for f in files))
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)
    summary_path = artifacts.join(args.output_dir, SUMMARY_NAME)

    pipeline = beam.Pipeline(options=cm_runner.as_pipeline_options(beam_args)[0])
    batches = pipeline | "ReadEmbeddings" >> table_io.ReadTableBlocks(files, ["example_id", "embedding"], BLOCK_ROWS)
    out = batches | "BuildClusters" >> transform
    write_clustering(out, args.output_dir)
    out["summary"] | "WriteSummary" >> beam.ParDo(_WriteSummaryFn(summary_path))
    rows = sum(f.num_rows for f in files)
    _LOG.info("cm-cluster: %d rows in %d files, eps %s (%s)", rows, len(files), transform.params["max_distance"],
              args.metric)

    try:
        pipeline_seconds, result = cm_runner.run_pipeline(pipeline, "cm-cluster", return_result=True)
    except (InputError, cm_runner.JobNotExecuted):
        raise
    except Exception as e:
        # Bad rows found inside the pipeline (ragged or duplicate ids) and unreachable
        # cut targets reach us wrapped in the runner's error when workers are separate
        # processes: unwrap them.
        _unwrap_input_error(e)
        raise

    summary = artifacts.read_json(summary_path)
    FileSystems.delete([summary_path])
    params = dict(summary.pop("parameters"), embeddings=args.embeddings)
    fingerprint = {"digest": summary.pop("input_fingerprint"), "method": summary.pop("input_fingerprint_method"),
                   "rows": summary["input_rows"]}
    singletons = summary["size_histogram"].get("1", 0)
    summary["cut"] = {"source": None, **summary["cut"]}
    manifest = {
        "stage": "cluster",
        "parameters": params,
        "counts": {"examples": summary["input_rows"], "points": summary["n"], "rejected": summary["rejected"],
                   "clusters": summary["clusters"], "singletons": singletons},
        **summary,
        "input_fingerprint": fingerprint,
        "outputs": OUTPUTS,
        "timings": manifest_timings(result, pipeline_seconds, start),
    }
    artifacts.write_manifest(args.output_dir, manifest)
    return manifest


def _recut(args, beam_args, start) -> Dict:
    """cm-cluster --recut_from DIR: the hierarchy of an earlier run, cut again."""
    source = args.recut_from  # the options checked the flags that do not need the source
    src = artifacts.read_manifest(source)
    if src is None:
        raise InputError(f"--recut_from: {source} has no manifest.json (not a complete cm-cluster output)")
    if src.get("stage") != "cluster" or src.get("max_distance") is None:
        raise InputError(f"--recut_from: {source} holds no merge hierarchy (not a cm-cluster output, or one made "
                         "before merges-*.parquet existed); run cm-cluster again")
    max_eps = float(src["max_distance"])
    if args.distance_threshold is not None and args.distance_threshold > max_eps:
        raise InputError(f"--distance_threshold {args.distance_threshold} is above the max_distance {max_eps} of "
                         f"--recut_from {source}: its hierarchy has no merges above that")
    metric = src["parameters"].get("metric", "cosine")
    rule, value, _ = cl.check_cut_flags(args.distance_threshold, args.target_mean_cluster_size, args.num_clusters,
                                        max_eps, metric)
    clusters_files = table_io.inspect_inputs([artifacts.join(source, "clusters-*.parquet")], "--recut_from",
                                             {"example_id": "id", "leaf_id": "int"})
    merges_files = table_io.inspect_inputs([artifacts.join(source, "merges-*.parquet")], "--recut_from",
                                           {name: "any" for name in cl.MERGES_SCHEMA.names})
    rejected_pattern = artifacts.join(source, "rejected-*.parquet")
    rejected_files = (table_io.inspect_inputs([rejected_pattern], "--recut_from", {"example_id": "id", "reason": "any"})
                      if FileSystems.match([rejected_pattern])[0].metadata_list else [])
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)
    summary_path = artifacts.join(args.output_dir, SUMMARY_NAME)

    pipeline = beam.Pipeline(options=cm_runner.as_pipeline_options(beam_args)[0])
    leaves = pipeline | "ReadClusters" >> table_io.ReadTableBlocks(clusters_files, ["example_id", "leaf_id"], BLOCK_ROWS)
    merge_batches = pipeline | "ReadMerges" >> table_io.ReadTableBlocks(merges_files, list(cl.MERGES_SCHEMA.names),
                                                                          BLOCK_ROWS)
    merges = merge_batches | "ToMerges" >> beam.Map(hierarchy.batch_to_merges)
    cut = {"clusters": leaves, "merges": merges} | "Cut" >> hierarchy.CutHierarchy(
        rule, value, max_eps, "the max_distance of --recut_from")
    cut["clusters"] | "WriteClusters" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, "clusters"), cl.CLUSTERS_SCHEMA)
    merge_batches | "WriteMerges" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, "merges"), cl.MERGES_SCHEMA)
    rejected = (pipeline | "ReadRejected" >> table_io.ReadTableBlocks(rejected_files, ["example_id", "reason"])
                if rejected_files else pipeline | "NoRejected" >> beam.Create([]))
    rejected | "WriteRejected" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, "rejected"), cl.REJECTED_SCHEMA)
    cut["cut"] | "WriteSummary" >> beam.ParDo(_WriteSummaryFn(summary_path))
    _LOG.info("cm-cluster: re-cut %s (%s %s)", source, rule, value)
    try:
        pipeline_seconds, result = cm_runner.run_pipeline(pipeline, "cm-cluster", return_result=True)
    except (InputError, cm_runner.JobNotExecuted):
        raise
    except Exception as e:
        _unwrap_input_error(e)
        raise
    summary = artifacts.read_json(summary_path)
    FileSystems.delete([summary_path])
    counts = dict(src.get("counts", {}))
    counts.update(clusters=summary["num_clusters"], singletons=summary["singletons"])
    if counts.get("points") not in (None, summary["num_clusters"] + summary["merges_applied"]):
        raise RuntimeError(f"--recut_from: {source}'s manifest counts {counts['points']} points, but its clusters and "
                           f"merges describe {summary['num_clusters'] + summary['merges_applied']}")
    params = dict(src["parameters"], distance_threshold=args.distance_threshold,
                  target_mean_cluster_size=args.target_mean_cluster_size, num_clusters=args.num_clusters,
                  recut_from=source)
    cut_record = {"source": source, **{k: summary[k] for k in (
        "rule", "requested", "distance_threshold", "num_clusters", "mean_cluster_size")}}
    manifest = {
        "stage": "cluster",
        "parameters": params,
        "counts": counts,
        "n": src.get("n"),
        "clusters": summary["num_clusters"],
        "largest_cluster": summary["largest_cluster"],
        "size_histogram": summary["size_histogram"],
        "cut": cut_record,
        "distance_threshold": summary["distance_threshold"],
        "num_clusters": summary["num_clusters"],
        "mean_cluster_size": summary["mean_cluster_size"],
        "max_distance": max_eps,
        "hierarchy": {"merges": summary["hierarchy_merges"], "clusters_at_max_distance":
                      src.get("hierarchy", {}).get("clusters_at_max_distance"), "inversions": summary["inversions"]},
        "input_fingerprint": src.get("input_fingerprint"),
        "outputs": {k: v for k, v in OUTPUTS.items() if k != "state"},  # a re-cut keeps no cluster state
        "timings": manifest_timings(result, pipeline_seconds, start),
    }
    artifacts.write_manifest(args.output_dir, manifest)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    cm_runner.run_main("cm-cluster", run, argv, _print_summary)


def _print_summary(manifest) -> None:
    if manifest.get("extension"):
        from pipelines import extend_clusters

        return extend_clusters.print_summary(manifest)
    c = manifest["counts"]
    cut = manifest["cut"]
    if cut.get("source"):
        print(f"cm-cluster: re-cut {cut['source']} at eps {cut['distance_threshold']:.6g} ({cut['rule']} "
              f"{cut['requested']}): {cut['num_clusters']} clusters, mean size {cut['mean_cluster_size']:.3f}; "
              f"{manifest['timings']['wall_seconds']:.1f}s")
        return
    recall = manifest.get("knn_recall") or {}
    recall_text = f", kNN recall@k {recall['recall_at_k']:.3f}" if recall.get("recall_at_k") is not None else ""
    print(
        f"cm-cluster: {c['points']} points in {c['clusters']} clusters ({c['singletons']} singletons, largest "
        f"{manifest['largest_cluster']}); {manifest['rounds']} rounds ({manifest['parameters']['knn_mode_used']} kNN"
        f"{recall_text}); rejected {c['rejected']}; {manifest['timings']['wall_seconds']:.1f}s"
    )


if __name__ == "__main__":
    main()
