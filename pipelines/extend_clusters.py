"""`cm-cluster --extend DIR`: an earlier clustering extended by the examples that joined the pool.

    cm-cluster --extend work/clusters --embeddings 'emb/today-*.parquet' --output_dir work/clusters-today

--embeddings is the whole current pool. Its examples that the clustering in DIR does not
hold are clustered together with DIR's clusters as starting nodes (their count, sum and
sum of squared norms from DIR/state-*.parquet) by cm-cluster's exact-linkage rounds, at
DIR's eps and metric; examples of DIR that left the pool are removed from their clusters.
The output is a full clustering in cm-cluster's files (clusters, merges, state, rejected,
manifest.json with an `extension` record); clusters that gained and lost nothing keep
their ids (cm_beam/clustering/extend.py; docs/design.md, "Growing pools").
"""

from __future__ import annotations

from typing import Dict

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from cm_beam.clustering import build_clusters as cl
from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering.extend import ExtendClusters
from cm_beam.clustering.state import STATE_SCHEMA
from cm_beam.errors import InputError
from cm_beam.io import artifacts, table_io
from cm_beam.runtime import runner as cm_runner

# Flags that choose how a clustering is made: the extension takes them from DIR.
_NOT_WITH_EXTEND = ("distance_threshold", "target_mean_cluster_size", "num_clusters", "max_distance", "recut_from")


def check_source(source: str) -> Dict:
    """DIR's manifest, or InputError saying why DIR cannot be extended."""
    src = artifacts.read_manifest(source)
    if src is None:
        raise InputError(f"--extend: {source} has no manifest.json (not a complete cm-cluster output)")
    if src.get("stage") != "cluster" or "state" not in src.get("outputs", {}):
        raise InputError(f"--extend: {source} holds no cluster state (state-*.parquet): not a cm-cluster output, or "
                         "one made before cm-cluster wrote it; recluster the pool")
    cut = src.get("cut", {})
    if cut.get("rule") != "distance" or cut.get("distance_threshold") != src.get("max_distance"):
        raise InputError(f"--extend: {source} is cut below its max_distance ({cut.get('rule')} "
                         f"{cut.get('requested')}); only a clustering cut at its max_distance can be extended")
    return src


def run_extend(args, beam_args, start) -> Dict:
    from pipelines.build_clusters import (BLOCK_ROWS, OUTPUTS, SUMMARY_NAME, _WriteSummaryFn, _unwrap_input_error,
                                          manifest_timings, write_clustering)

    source = args.extend
    for name in _NOT_WITH_EXTEND:
        if getattr(args, name) is not None:
            raise InputError(f"--{name}: not used with --extend (the extension runs at the eps and metric of "
                             f"--extend {source})")
    if args.embeddings is None:
        raise InputError("--embeddings is required with --extend: the whole current pool")
    if args.output_dir.rstrip("/") == source.rstrip("/"):
        raise InputError("--output_dir must differ from --extend")
    src = check_source(source)
    eps = float(src["max_distance"])
    metric = src["parameters"].get("metric", "cosine")
    center = src.get("state_center")
    files = table_io.inspect_inputs([args.embeddings], "--embeddings", {"example_id": "id", "embedding": "vector"})
    old_files = table_io.inspect_inputs([artifacts.join(source, "clusters-*.parquet")], "--extend",
                                        {"example_id": "id", "cluster_id": "int", "cluster_size": "int",
                                         "leaf_id": "int"})
    state_files = table_io.inspect_inputs([artifacts.join(source, "state-*.parquet")], "--extend",
                                          {name: "any" for name in STATE_SCHEMA.names})
    merges_files = table_io.inspect_inputs([artifacts.join(source, "merges-*.parquet")], "--extend",
                                           {name: "any" for name in cl.MERGES_SCHEMA.names})
    rows = sum(f.num_rows for f in files)
    # Small extensions skip the unrolled distributed rounds (their candidate edges fit one worker).
    max_rounds = 0 if rows * (args.num_neighbors + args.extend_cluster_neighbors) <= args.max_inmemory_edges \
        else args.max_rounds
    transform = ExtendClusters(
        eps, metric, None if center is None else np.asarray(center, np.float64), src.get("dimension"),
        args.num_neighbors, args.extend_cluster_neighbors, args.num_shards, max_rounds, args.max_inmemory_edges,
        int(src.get("rounds") or 0), args.extend_recompute_state, args.num_probes)
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)
    summary_path = artifacts.join(args.output_dir, SUMMARY_NAME)

    pipeline = beam.Pipeline(options=cm_runner.pipeline_options(beam_args))
    out = {
        "embeddings": pipeline | "ReadEmbeddings" >> table_io.ReadTableBlocks(files, ["example_id", "embedding"],
                                                                             BLOCK_ROWS),
        "old_clusters": pipeline | "ReadOldClusters" >> table_io.ReadTableBlocks(
            old_files, ["example_id", "cluster_id", "cluster_size", "leaf_id"], BLOCK_ROWS),
        "old_state": pipeline | "ReadOldState" >> table_io.ReadTableBlocks(state_files, list(STATE_SCHEMA.names), 4096),
        "old_merges": pipeline | "ReadOldMerges" >> table_io.ReadTableBlocks(merges_files, list(cl.MERGES_SCHEMA.names),
                                                                            BLOCK_ROWS),
    } | "ExtendClusters" >> transform
    write_clustering(out, args.output_dir)
    out["summary"] | "Jsonable" >> beam.Map(_jsonable) | "WriteSummary" >> beam.ParDo(_WriteSummaryFn(summary_path))
    try:
        pipeline_seconds, result = cm_runner.run_pipeline(pipeline, "cm-cluster", return_result=True)
    except (InputError, cm_runner.JobNotExecuted):
        raise
    except Exception as e:
        _unwrap_input_error(e)
        raise
    s = artifacts.read_json(summary_path)
    FileSystems.delete([summary_path])
    sizes = np.asarray(s.pop("cluster_sizes"), np.int64)
    clusters = int(len(sizes))
    n = int(s["n"])
    if int(sizes.sum()) != n:
        raise RuntimeError(f"extension: {n} points but the clusters hold {int(sizes.sum())}")
    histogram = hk.size_histogram(sizes)
    old_merges = int(src.get("hierarchy", {}).get("merges") or 0)
    params = dict(src["parameters"], embeddings=args.embeddings, extend=source, num_neighbors=args.num_neighbors,
                  extend_cluster_neighbors=args.extend_cluster_neighbors, num_shards=args.num_shards,
                  max_rounds=args.max_rounds, max_inmemory_edges=args.max_inmemory_edges,
                  extend_recompute_state=args.extend_recompute_state, num_probes=args.num_probes)
    rejected = int(s["input_rows"]) - n
    extension = {k: s[k] for k in ("new_examples", "joined_existing", "new_clusters", "existing_merged", "merges",
                                   "removed", "emptied_clusters", "clusters_changed_by_removals",
                                   "touched_clusters", "rounds")}
    extension["source"] = source
    extension["source_fingerprint"] = (src.get("input_fingerprint") or {}).get("digest")
    cut = {"source": None, "rule": "distance", "requested": eps, "distance_threshold": eps, "num_clusters": clusters,
           "mean_cluster_size": n / clusters if clusters else 0.0}
    manifest = {
        "stage": "cluster",
        "parameters": params,
        "counts": {"examples": int(s["input_rows"]), "points": n, "rejected": rejected, "clusters": clusters,
                   "singletons": int(histogram.get("1", 0))},
        "n": n,
        "input_rows": int(s["input_rows"]),
        "rejected": rejected,
        "dimension": src.get("dimension"),
        "clusters": clusters,
        "clustered_points": int(sizes.sum()),
        "largest_cluster": int(sizes.max()) if clusters else 0,
        "size_histogram": histogram,
        "cut": cut,
        "distance_threshold": eps,
        "num_clusters": clusters,
        "mean_cluster_size": cut["mean_cluster_size"],
        "max_distance": eps,
        "hierarchy": {"merges": old_merges + extension["merges"], "clusters_at_max_distance": clusters,
                      "inversions": None},
        # Rounds of the whole hierarchy: the merge rows of this run are numbered after DIR's.
        "rounds": int(src.get("rounds") or 0) + extension["rounds"],
        "extension": extension,
        "input_fingerprint": {"digest": s["input_fingerprint"], "method": cl.FINGERPRINT_METHOD,
                              "rows": int(s["input_rows"])},
        "state_center": center,
        "outputs": OUTPUTS,
        "timings": manifest_timings(result, pipeline_seconds, start),
    }
    artifacts.write_manifest(args.output_dir, manifest)
    return manifest


def _jsonable(summary):
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in summary.items()}


def print_summary(manifest) -> None:
    e = manifest["extension"]
    c = manifest["counts"]
    print(f"cm-cluster: extended {e['source']} by {e['new_examples']} new examples ({e['joined_existing']} joined "
          f"existing clusters, {e['new_clusters']} new clusters, {e['existing_merged']} existing clusters merged; "
          f"{e['removed']} removed): {c['points']} points in {c['clusters']} clusters; "
          f"{manifest['timings']['wall_seconds']:.1f}s")
