"""`cm-cluster`: average-linkage HAC of a pool's embeddings, cut at a distance, on Beam.

Reads Parquet with `example_id` and `embedding` and writes `clusters-*.parquet`
(example_id, cluster_id int64 >= 0, cluster_size int64), `rejected-*.parquet`
(example_id, reason: non_finite, zero_vector, null_embedding, empty_embedding) and
`manifest.json` last (parameters, counts, size histogram, rounds, kNN recall, timings,
input fingerprint).

    cm-cluster --embeddings 'gs://b/emb/embeddings-*.parquet' --output_dir gs://b/clusters \
        --distance_threshold 0.2 --runner DataflowRunner --project ... --temp_location ...

    cm-cluster --embeddings 'emb/*.parquet' --output_dir clusters --distance_threshold 0.2 \
        --direct_num_workers 2 --direct_running_mode multi_processing
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from typing import Dict, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from cm_beam import artifacts, table_io
from cm_beam import cluster as cl
from cm_beam import runner as cm_runner
from cm_beam.errors import InputError

_LOG = logging.getLogger("cm_beam.cluster")
SUMMARY_NAME = "_summary.json"
# Rows per Beam element when reading: big blocks amortise per-element overhead.
BLOCK_ROWS = 32_768


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cm-cluster", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, help="Glob of Parquet files with example_id and embedding (list of floats).")
    p.add_argument("--distance_threshold", required=True, type=cm_runner.positive_float,
                   help="eps: the average-linkage distance at which the dendrogram is cut (scipy fcluster 'distance').")
    p.add_argument("--metric", choices=("cosine", "sqeuclidean"), default="cosine",
                   help="cosine (vectors L2-normalised on input) or sqeuclidean (squared Euclidean).")
    p.add_argument("--num_neighbors", type=cm_runner.positive_int, default=cl.DEFAULT_NUM_NEIGHBORS,
                   help="k of the kNN graph that chooses candidate pairs (edges above eps are not needed).")
    p.add_argument("--knn_mode", choices=cl.KNN_MODES, default="auto",
                   help="exact (blockwise brute force), ivf (k-means partitions), or auto: exact up to "
                        "--exact_max_points points.")
    p.add_argument("--exact_max_points", type=cm_runner.non_negative_int, default=cl.DEFAULT_EXACT_MAX_POINTS,
                   help="Largest pool that --knn_mode auto clusters with exact kNN.")
    p.add_argument("--num_partitions", type=cm_runner.non_negative_int, default=0,
                   help=f"IVF partitions (0: one per {cl.DEFAULT_POINTS_PER_PARTITION} points).")
    p.add_argument("--num_probes", type=cm_runner.positive_int, default=cl.DEFAULT_NUM_PROBES,
                   help="IVF partitions each point joins (its nearest ones).")
    p.add_argument("--num_shards", type=cm_runner.positive_int, default=cl.DEFAULT_NUM_SHARDS,
                   help="Spatial shards of the cluster state (and exact-kNN blocks).")
    p.add_argument("--max_rounds", type=cm_runner.non_negative_int, default=cl.DEFAULT_MAX_ROUNDS,
                   help="Distributed merge rounds unrolled in the pipeline before the in-memory finish.")
    p.add_argument("--max_inmemory_edges", type=cm_runner.non_negative_int, default=cl.DEFAULT_MAX_INMEMORY_EDGES,
                   help="Candidate edges under which the remaining clustering finishes on one worker.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the k-means initialisations.")
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


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Runs cm-cluster; returns the manifest it wrote."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    start = time.time()
    transform = cl.BuildClusters(
        distance_threshold=args.distance_threshold, metric=args.metric, num_neighbors=args.num_neighbors,
        knn_mode=args.knn_mode, exact_max_points=args.exact_max_points, num_partitions=args.num_partitions,
        num_probes=args.num_probes, num_shards=args.num_shards, max_rounds=args.max_rounds,
        max_inmemory_edges=args.max_inmemory_edges, seed=args.seed)
    # Everything that can fail on bad input is checked before any work is done.
    files = table_io.inspect_inputs([args.embeddings], "--embeddings", {"example_id": "id", "embedding": "vector"})
    transform = cl.BuildClusters(**{k: v for k, v in transform.params.items()
                                    if k not in ()}, max_points=sum(f.num_rows for f in files))
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)
    summary_path = artifacts.join(args.output_dir, SUMMARY_NAME)

    pipeline = beam.Pipeline(options=cm_runner.pipeline_options(beam_args))
    batches = pipeline | "ReadEmbeddings" >> table_io.ReadTableBlocks(files, ["example_id", "embedding"], BLOCK_ROWS)
    out = batches | "BuildClusters" >> transform
    out["clusters"] | "WriteClusters" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, "clusters"), cl.CLUSTERS_SCHEMA)
    out["rejected"] | "WriteRejected" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, "rejected"), cl.REJECTED_SCHEMA)
    out["summary"] | "WriteSummary" >> beam.ParDo(_WriteSummaryFn(summary_path))
    rows = sum(f.num_rows for f in files)
    _LOG.info("cm-cluster: %d rows in %d files, eps %s (%s)", rows, len(files), args.distance_threshold, args.metric)

    try:
        pipeline_seconds, result = cm_runner.run_pipeline(pipeline, "cm-cluster", return_result=True)
    except (InputError, cm_runner.JobNotExecuted):
        raise
    except Exception as e:
        # Bad rows found inside the pipeline (ragged or duplicate ids) reach us wrapped
        # in the runner's error when workers are separate processes: unwrap them.
        found = re.search(r"InputError: (--embeddings:.*?)(?: \[while running|\n|$)", str(e))
        if found:
            raise InputError(found.group(1)) from e
        raise

    summary = artifacts.read_json(summary_path)
    FileSystems.delete([summary_path])
    params = dict(summary.pop("parameters"), embeddings=args.embeddings)
    fingerprint = {"digest": summary.pop("input_fingerprint"), "method": summary.pop("input_fingerprint_method"),
                   "rows": summary["input_rows"]}
    singletons = summary["size_histogram"].get("1", 0)
    manifest = {
        "stage": "cluster",
        "parameters": params,
        "counts": {"examples": summary["input_rows"], "points": summary["n"], "rejected": summary["rejected"],
                   "clusters": summary["clusters"], "singletons": singletons},
        **summary,
        "input_fingerprint": fingerprint,
        "outputs": {"clusters": "clusters-*.parquet", "rejected": "rejected-*.parquet"},
        "timings": {
            "pipeline_seconds": round(pipeline_seconds, 3),
            "wall_seconds": round(time.time() - start, 3),
            "stage_seconds": _stage_seconds(result),
            "stage_seconds_note": "time inside each stage's DoFns, summed over workers",
        },
    }
    artifacts.write_manifest(args.output_dir, manifest)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    cm_runner.run_main("cm-cluster", run, argv, _print_summary)


def _print_summary(manifest) -> None:
    c = manifest["counts"]
    recall = manifest.get("knn_recall") or {}
    recall_text = f", kNN recall@k {recall['recall_at_k']:.3f}" if recall.get("recall_at_k") is not None else ""
    print(
        f"cm-cluster: {c['points']} points in {c['clusters']} clusters ({c['singletons']} singletons, largest "
        f"{manifest['largest_cluster']}); {manifest['rounds']} rounds ({manifest['parameters']['knn_mode_used']} kNN"
        f"{recall_text}); rejected {c['rejected']}; {manifest['timings']['wall_seconds']:.1f}s"
    )


if __name__ == "__main__":
    main()
