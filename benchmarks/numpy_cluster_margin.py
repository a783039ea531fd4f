"""A plain in-memory numpy Cluster-Margin: the baseline cm-select is measured against.

Same semantics as cm-select (and the loop reference in tests/): the k_m lowest
(priority, tie-hash, example_id), clusters restricted to M ordered by (size,
cluster_id), members in seeded pick-hash order, and picks ordered by (pass, size,
cluster_id). It holds the whole pool in one process: what cm-select avoids.

    python benchmarks/numpy_cluster_margin.py --scores 'pool/scores-*.parquet' \
        --clusters 'pool/clusters-*.parquet' --batch_size 100000 --margin_pool_size 300000 --output out.parquet
"""

import argparse
import glob

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cm_beam.hashing import hash_ids
from cm_beam.selection.select_impl import PICK_SALT, TIE_SALT, UNCLUSTERED_SALT


def read(pattern, columns):
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in sorted(glob.glob(pattern))])


def select(scores: pa.Table, clusters: pa.Table, batch_size: int, margin_pool_size: int, seed: int = 0) -> pa.Table:
    ids = scores.column("example_id").combine_chunks()
    margin = scores.column("margin").to_numpy().astype(np.float32)
    tie = hash_ids(ids, seed, TIE_SALT) >> np.uint64(32)
    # Lowest (margin, tie hash, id): lexsort over a float32 key is exact.
    id_rank = np.empty(len(ids), dtype=np.int64)
    id_rank[pc.sort_indices(ids).to_numpy()] = np.arange(len(ids))
    order = np.lexsort((id_rank, tie, margin + np.float32(0.0)))[:margin_pool_size]
    m_ids = ids.take(pa.array(order))
    pos = pc.index_in(m_ids, value_set=clusters.column("example_id").combine_chunks())
    cid_all = clusters.column("cluster_id").to_numpy()
    valid = pos.is_valid().to_numpy(zero_copy_only=False)
    cid = np.empty(len(order), dtype=np.int64)
    cid[valid] = cid_all[pc.drop_null(pos).to_numpy()]
    if (~valid).any():
        cid[~valid] = -1 - (hash_ids(m_ids.filter(pa.array(~valid)), 0, UNCLUSTERED_SALT) >> np.uint64(2)).astype(np.int64)
    pick = hash_ids(m_ids, seed, PICK_SALT)
    m_rank = id_rank[order]
    by_cluster = np.lexsort((m_rank, pick, cid))
    c_sorted = cid[by_cluster]
    starts = np.flatnonzero(np.concatenate([[True], c_sorted[1:] != c_sorted[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(c_sorted)]]))
    group = np.repeat(np.arange(starts.size), sizes)
    j = np.arange(len(c_sorted)) - starts[group]
    size = sizes[group]
    picks = np.lexsort((c_sorted, size, j))[:batch_size]
    rows = by_cluster[picks]
    return pa.table({
        "example_id": m_ids.take(pa.array(rows)),
        "cluster_id": pa.array(c_sorted[picks]),
        "margin": pa.array(margin[order][rows]),
        "round": pa.array(j[picks].astype(np.int32)),
        "rank": pa.array(np.arange(len(picks), dtype=np.int64)),
    })


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scores", required=True)
    p.add_argument("--clusters", required=True)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--margin_pool_size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    table = select(read(a.scores, ["example_id", "margin"]), read(a.clusters, ["example_id", "cluster_id"]),
                   a.batch_size, a.margin_pool_size, a.seed)
    pq.write_table(table, a.output)


if __name__ == "__main__":
    main()
