"""A synthetic scored and clustered pool, for the demo, tests and benchmarks.

Real pools have a long tail of cluster sizes (a few huge near-duplicate groups,
many singletons) and many exactly equal scores (quantised model outputs). The
generator reproduces both: cluster sizes are Zipf-like, margins come from a Beta
distribution rounded to `margin_decimals` so that ties are common.

Pure numpy/pyarrow: no Beam import.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_pool(n: int, num_clusters: int, seed: int = 0, zipf_a: float = 1.1,
              unclustered_fraction: float = 0.02, margin_decimals: Optional[int] = 3,
              id_prefix: str = "ex", singleton_fraction: float = 0.0) -> Dict[str, pa.Table]:
    """Returns {"scores": (example_id, margin), "clusters": (example_id, cluster_id, cluster_size)}.

    `singleton_fraction`: that share of the rows (drawn at random) leave their Zipf
    cluster for a cluster of their own (ids num_clusters, num_clusters + 1, ...), as a
    clustering at a tight distance threshold leaves about half of a real pool. Their
    margins are unchanged. At 0 the pool is the same as without the option.
    """
    rng = np.random.default_rng(seed)
    ids = np.array([f"{id_prefix}-{i:09d}" for i in range(n)], dtype=object)
    # Zipf-like cluster popularity; every cluster id is used at most as drawn.
    weights = 1.0 / np.arange(1, num_clusters + 1) ** zipf_a
    weights /= weights.sum()
    cluster = rng.choice(num_clusters, size=n, p=weights).astype(np.int64)
    # Shuffle cluster ids so that popularity is not ordered by id.
    cluster = rng.permutation(num_clusters)[cluster].astype(np.int64)
    # Uncertain clusters: margins correlate within a cluster, as near-duplicates do.
    cluster_level = rng.beta(2.0, 2.0, size=num_clusters)
    margin = np.clip(cluster_level[cluster] * 0.7 + rng.beta(1.2, 3.0, size=n) * 0.3, 0.0, 1.0)
    if margin_decimals is not None:
        margin = np.round(margin, margin_decimals)
    margin = margin.astype(np.float32)
    clustered = rng.random(n) >= unclustered_fraction
    if singleton_fraction > 0:
        # Drawn after everything else, so that the other columns do not change.
        alone = np.flatnonzero(rng.random(n) < singleton_fraction)
        cluster[alone] = num_clusters + np.arange(alone.size, dtype=np.int64)
        num_clusters += alone.size
    sizes = np.bincount(cluster[clustered], minlength=num_clusters)
    scores = pa.table({"example_id": pa.array(ids.tolist(), pa.string()), "margin": pa.array(margin)})
    clusters = pa.table(
        {
            "example_id": pa.array(ids[clustered].tolist(), pa.string()),
            "cluster_id": pa.array(cluster[clustered]),
            "cluster_size": pa.array(sizes[cluster[clustered]].astype(np.int64)),
        }
    )
    return {"scores": scores, "clusters": clusters}


def write_sharded(table: pa.Table, directory: str, prefix: str, num_shards: int = 4, row_group_size: int = 65536) -> str:
    """Writes `table` as `num_shards` Parquet files; returns the glob that matches them."""
    os.makedirs(directory, exist_ok=True)
    n = table.num_rows
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    for i in range(num_shards):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        pq.write_table(part, os.path.join(directory, f"{prefix}-{i:05d}-of-{num_shards:05d}.parquet"), row_group_size=row_group_size)
    return os.path.join(directory, f"{prefix}-*.parquet")
