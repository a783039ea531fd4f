"""The product's stages as the label-efficiency simulation calls them.

Each function runs one cm-beam entry point in this process through its public
`run(argv)` (exactly the flags a user would type after `cm-embed`, `cm-cluster`,
`cm-select`) on the FnApiRunner, and reads back what it wrote. Nothing here
re-implements a stage: if a stage is missing or fails, the strategy fails.

* `embed_pool`: cm-embed over the pool Parquet (example_id + PNG) with a `.keras`
  model -> {example_id: margin} and the embeddings table (for cm-cluster).
* `build_clusters`: cm-cluster over cm-embed's output -> cluster stats (the output
  dir also holds the merge hierarchy up to the distance threshold).
* `recut`: `cm-cluster --recut_from` that hierarchy at a target mean cluster size.
* `select_batch`: cm-select with the labeled set as --exclude -> the chosen ids in
  the order cm-select ranked them.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BEAM_ARGS = ["--runner=FnApiRunner"]


def _read_dir(directory: str, prefix: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    paths = sorted(glob.glob(os.path.join(directory, f"{prefix}-*.parquet")))
    if not paths:
        raise RuntimeError(f"{directory}: no {prefix}-*.parquet written")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])


def _outputs(directory: str) -> List[str]:
    """The data shards of a stage's output dir (not the rejected-* dead letters)."""
    return sorted(p for p in glob.glob(os.path.join(directory, "*.parquet"))
                  if not os.path.basename(p).startswith("rejected"))


def embed_pool(pool_parquet: str, model_path: str, output_dir: str, image_size: int = 28) -> dict:
    """Runs cm-embed; returns its summary plus the path glob of its scores."""
    from pipelines import embed_pool as stage

    summary = stage.run([
        "--pool", pool_parquet, "--pool_format", "parquet", "--model", model_path,
        "--output_dir", output_dir, "--overwrite", "--image_size", str(image_size),
        *BEAM_ARGS,
    ])
    return dict(summary or {})


def read_scores(output_dir: str) -> Dict[str, np.ndarray]:
    """cm-embed's output as arrays: example_id (str), margin, embedding [n, d]."""
    table = pa.concat_tables([pq.read_table(p, columns=["example_id", "margin", "embedding"]) for p in _outputs(output_dir)])
    emb = table.column("embedding").combine_chunks()
    dim = len(emb[0]) if len(emb) else 0
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return {
        "example_id": np.asarray(table.column("example_id").to_pylist(), dtype=object),
        "margin": table.column("margin").to_numpy().astype(np.float64),
        "embedding": flat.reshape(-1, dim),
    }


def build_clusters(embeddings_dir: str, output_dir: str, distance_threshold: float,
                   num_neighbors: Optional[int] = None, metric: str = "cosine", knn_mode: Optional[str] = None) -> dict:
    """Runs cm-cluster on cm-embed's output; returns summary + cluster size stats."""
    from pipelines import build_clusters as stage

    argv = ["--embeddings", os.path.join(embeddings_dir, "embeddings-*.parquet"), "--output_dir", output_dir, "--overwrite",
            "--distance_threshold", repr(float(distance_threshold)), "--metric", metric, *BEAM_ARGS]
    if num_neighbors:
        argv += ["--num_neighbors", str(num_neighbors)]
    if knn_mode:
        argv += ["--knn_mode", knn_mode]
    summary = dict(stage.run(argv) or {})
    summary.update(cluster_stats(output_dir))
    return summary


def recut(hierarchy_dir: str, output_dir: str, target_mean_cluster_size: float) -> dict:
    """Cuts cm-cluster's hierarchy at the achievable mean cluster size nearest the target."""
    from pipelines import build_clusters as stage

    summary = dict(stage.run(["--recut_from", hierarchy_dir, "--output_dir", output_dir, "--overwrite",
                              "--target_mean_cluster_size", repr(float(target_mean_cluster_size)), *BEAM_ARGS]) or {})
    stats = cluster_stats(output_dir)
    return {"distance_threshold": summary.get("distance_threshold"), "target_mean_cluster_size": target_mean_cluster_size,
            **stats}


def cluster_stats(output_dir: str) -> dict:
    """Cluster count and sizes of a cm-cluster output dir (as the clusters the selection sees)."""
    table = _read_dir(output_dir, "clusters", ["example_id", "cluster_id"])
    _, sizes = np.unique(table.column("cluster_id").to_numpy(), return_counts=True)
    rejected = sum(pq.ParquetFile(p).metadata.num_rows for p in glob.glob(os.path.join(output_dir, "rejected-*.parquet")))
    return {
        "num_examples": int(table.num_rows), "num_clusters": int(sizes.size),
        "mean_cluster_size": float(table.num_rows / max(1, sizes.size)),
        "max_cluster_size": int(sizes.max()) if sizes.size else 0,
        "singletons": int(np.sum(sizes == 1)), "rejected": int(rejected),
    }


def write_exclude(example_ids: Sequence[str], path: str) -> str:
    pq.write_table(pa.table({"example_id": pa.array(list(example_ids), pa.string())}), path)
    return path


def select_batch(scores_dir: str, clusters_dir: Optional[str], exclude_path: str, output_dir: str, batch_size: int,
                 strategy: str, seed: int, margin_pool_factor: Optional[float] = None) -> Dict[str, object]:
    """Runs cm-select; returns {'summary', 'example_id' (ranked), 'round', 'cluster_id'}."""
    from pipelines import select_batch as stage

    argv = ["--scores", os.path.join(scores_dir, "embeddings-*.parquet"), "--exclude", exclude_path,
            "--batch_size", str(batch_size), "--strategy", strategy, "--seed", str(seed),
            "--output_dir", output_dir, "--overwrite", *BEAM_ARGS]
    if clusters_dir:
        argv += ["--clusters", os.path.join(clusters_dir, "clusters-*.parquet")]
    if margin_pool_factor:
        argv += ["--margin_pool_factor", repr(float(margin_pool_factor))]
    summary = dict(stage.run(argv) or {})
    table = _read_dir(output_dir, "selection")
    order = np.argsort(table.column("rank").to_numpy(), kind="stable")
    return {
        "summary": summary,
        "example_id": [table.column("example_id")[int(i)].as_py() for i in order],
        "round": table.column("round").to_numpy()[order],
        "cluster_id": table.column("cluster_id").to_numpy()[order],
    }
