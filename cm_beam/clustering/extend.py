"""ExtendClusters: an existing clustering extended by the examples that joined the pool.

docs/design.md, "Growing pools". Inputs: the current pool's embeddings (all of it), the
old clustering's `clusters-*.parquet` rows and `state-*.parquet` (each cluster's count,
sum and sum of squared norms at the old `max_distance`). Output: a full clustering of the
current pool in cm-cluster's files.

    out = {"embeddings": batches, "old_clusters": old_rows, "old_state": old_state,
           "old_merges": old_merge_batches} | ExtendClusters(eps=0.05, metric="cosine", center=None)
    out["clusters"], out["merges"], out["state"], out["rejected"], out["summary"]

Stages:

1. Validate the pool (as cm-cluster); Match: the pool's rows and the old rows meet by
   example-id hash bucket; a pool row with an old row is kept (it stays in its old
   cluster), one without is new, an old row without a pool row was removed;
2. Update the existing clusters: per old cluster the kept rows are counted; a cluster
   that lost members has its state recomputed from its kept members' vectors (so the
   removed examples leave its sums exactly; `recompute_state` does it for every
   cluster, e.g. when the embedding model changed); one with none left is gone;
3. Candidates (extend_kernels): kNN among the new points (KnnGraph, exact) and each new
   point's nearest existing clusters by exact linkage (the existing clusters' state is
   a side input; above PARTITION_MIN_CLUSTERS clusters each point compares only with
   the clusters of its `num_probes` nearest k-means partitions of the cluster means);
4. HacRounds (the same rounds as cm-cluster) from the touched existing clusters as
   weighted nodes plus the new points, at the old eps;
5. Relabel: every pool row gets its final cluster from a table of the nodes whose label
   or size changed (a bounded gather: 24 bytes per new point or changed cluster);
   untouched clusters keep their ids and rows.

The merge hierarchy is the old one plus this run's merges (rounds numbered after
`round_offset`), so the output can be extended again.
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa

from cm_beam.array_ops import unique_sorted
from cm_beam.clustering import extend_kernels as ek
from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.clustering import knn_kernels as kk
from cm_beam.clustering.build_clusters import CLUSTERS_SCHEMA, _SALT_ID, _Validate
from cm_beam.clustering.hac import HacRounds
from cm_beam.clustering.hac_kernels import Clusters
from cm_beam.clustering.hierarchy import merges_to_batch
from cm_beam.clustering.knn_graph import KnnGraph
from cm_beam.runtime.stage_timer import StageTimer
from cm_beam.clustering.state import batch_state, state_batch
from cm_beam.errors import InputError
from cm_beam.hashing import hash_ids

NUM_BUCKETS = 64  # example-id hash buckets of the match
DEFAULT_CLUSTER_NEIGHBORS = 10


def _column(batch, name):
    return batch.column(batch.schema.get_field_index(name)).to_numpy(zero_copy_only=False)


# --- 1. Match pool rows with the old rows ---------------------------------------

def _bucket_pool(block):
    if not len(block["hashes"]):
        return
    buckets = (block["hashes"] % np.uint64(NUM_BUCKETS)).astype(np.int64)
    for b in unique_sorted(buckets):
        m = np.flatnonzero(buckets == b)
        yield int(b), ("pool", {"hashes": block["hashes"][m], "names": block["names"].take(pa.array(m)),
                                "vecs": block["vecs"][m]})


def _bucket_old(batch):
    if not batch.num_rows:
        return
    names = batch.column(batch.schema.get_field_index("example_id"))
    hashes = hash_ids(names, seed=0, salt=_SALT_ID)
    buckets = (hashes % np.uint64(NUM_BUCKETS)).astype(np.int64)
    cluster, size, leaf = (_column(batch, c).astype(np.int64) for c in ("cluster_id", "cluster_size", "leaf_id"))
    for b in unique_sorted(buckets):
        m = np.flatnonzero(buckets == b)
        yield int(b), ("old", {"hashes": hashes[m], "names": names.take(pa.array(m)), "cluster": cluster[m],
                               "size": size[m], "leaf": leaf[m]})


def _first_duplicate(hashes, names):
    order = np.argsort(hashes, kind="stable")
    h = hashes[order]
    dup = np.flatnonzero(h[1:] == h[:-1])
    if not len(dup):
        return None
    return names[int(order[dup[0]])].as_py(), names[int(order[dup[0] + 1])].as_py()


def _match(kv, num_shards, metric, center, dimension):
    """One bucket: pool rows -> kept / new; old rows without a pool row -> removed."""
    _, items = kv
    pool = [v for t, v in items if t == "pool"]
    old = [v for t, v in items if t == "old"]
    with StageTimer("extend_match"):
        if pool:
            p_hash = np.concatenate([p["hashes"] for p in pool])
            p_names = pa.concat_arrays([p["names"] for p in pool])
            p_vecs = np.concatenate([p["vecs"] for p in pool])
            if dimension is not None and p_vecs.shape[1] != dimension:
                raise InputError(f"--embeddings: example_id {p_names[0].as_py()!r} has an embedding of length "
                                 f"{p_vecs.shape[1]}, but --extend's clustering was built from embeddings of "
                                 f"length {dimension}")
        else:
            p_hash, p_names, p_vecs = np.zeros(0, np.uint64), pa.array([], pa.string()), None
        dup = _first_duplicate(p_hash, p_names)
        if dup:
            if dup[0] == dup[1]:
                raise InputError(f"--embeddings: duplicate example_id {dup[0]!r}: every example_id must appear once")
            raise RuntimeError(f"64-bit hash collision between example_ids {dup[0]!r} and {dup[1]!r}")
        if old:
            o_hash = np.concatenate([o["hashes"] for o in old])
            o_names = pa.concat_arrays([o["names"] for o in old])
            o_cluster, o_size, o_leaf = (np.concatenate([o[c] for o in old]) for c in ("cluster", "size", "leaf"))
        else:
            o_hash, o_names = np.zeros(0, np.uint64), pa.array([], pa.string())
            o_cluster = o_size = o_leaf = np.zeros(0, np.int64)
        dup = _first_duplicate(o_hash, o_names)
        if dup:
            raise InputError(f"--extend: example_id {dup[0]!r} has two rows in the old clustering's clusters-*.parquet")
        order = np.argsort(o_hash.view(np.int64), kind="stable")  # `lookup` compares the int64 view
        o_hash, o_cluster, o_size, o_leaf = o_hash[order], o_cluster[order], o_size[order], o_leaf[order]
        pos = hk.lookup(o_hash.view(np.int64), p_hash.view(np.int64)) if len(o_hash) else np.full(len(p_hash), -1)
        kept = pos >= 0
        removed = len(o_hash) - int(kept.sum())
        yield beam.pvalue.TaggedOutput("stats", ("removed", removed))
        if removed:
            gone = np.ones(len(o_hash), bool)
            gone[pos[kept]] = False
            yield beam.pvalue.TaggedOutput("removed_clusters", o_cluster[gone])
        if not len(p_hash):
            return
        labels_new = hk.public_labels(p_hash[~kept])
        k_pos = pos[kept]
        # Rows of the output: each pool row names the node it belongs to (its old cluster,
        # or itself if new), the size it has if that node is unchanged, and its leaf id.
        key = np.empty(len(p_hash), np.int64)
        size = np.ones(len(p_hash), np.int64)
        leaf = np.empty(len(p_hash), np.int64)
        key[kept], size[kept], leaf[kept] = o_cluster[k_pos], o_size[k_pos], o_leaf[k_pos]
        key[~kept], leaf[~kept] = labels_new, labels_new
        yield {"names": p_names, "key": key, "size": size, "leaf": leaf, "new": ~kept}
        if kept.any():
            yield beam.pvalue.TaggedOutput("kept", {"cluster": o_cluster[k_pos], "hashes": p_hash[kept],
                                                    "vecs": p_vecs[kept]})
        if (~kept).any():
            ids = ek.node_ids(labels_new, num_shards)
            shards = hk.shard_of(ids)
            m_new = np.flatnonzero(~kept)
            for s in unique_sorted(shards):
                m = shards == s
                yield beam.pvalue.TaggedOutput("new", (int(s), {
                    "ids": ids[m], "labels": labels_new[m], "vecs": p_vecs[m_new[m]],
                    "normalise": metric == "cosine", "center": center}))


def _merge_point_blocks(kv):
    shard, blocks = kv
    blocks = list(blocks)
    ids = np.concatenate([b["ids"] for b in blocks])
    order = np.argsort(ids, kind="stable")
    if len(ids) > 1 and (ids[order][1:] == ids[order][:-1]).any():
        raise RuntimeError(f"shard {shard}: two new points have the same 53-bit node id (hash collision)")
    return shard, {"ids": ids[order], "labels": np.concatenate([b["labels"] for b in blocks])[order],
                   "vecs": np.concatenate([b["vecs"] for b in blocks])[order],
                   "normalise": blocks[0]["normalise"], "center": blocks[0]["center"]}


# --- 2. The existing clusters after removals ------------------------------------

class _CountKept(beam.CombineFn):
    """(old cluster ids sorted, kept rows) over all buckets: 16 bytes per old cluster."""

    def create_accumulator(self):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add_input(self, acc, block):
        ids, counts = np.unique(block["cluster"], return_counts=True)
        return self.merge_accumulators([acc, (ids, counts.astype(np.int64))])

    def merge_accumulators(self, accs):
        ids = np.concatenate([a[0] for a in accs])
        counts = np.concatenate([a[1] for a in accs])
        u, inv = np.unique(ids, return_inverse=True)
        out = np.zeros(len(u), np.int64)
        np.add.at(out, inv, counts)
        return u, out

    def extract_output(self, acc):
        return acc


def _state_nodes(batch, kept, recompute_all, num_shards, d):
    """Stored state rows -> unchanged nodes (main) and the ids to recompute ("changed")."""
    labels, counts, sums, sq = batch_state(batch)
    if not len(labels):
        return
    if sums.shape[1] != d and d is not None:
        raise InputError(f"--embeddings: embeddings have length {d}, but --extend's clusters were built from "
                         f"embeddings of length {sums.shape[1]}")
    k_ids, k_counts = kept
    pos = hk.lookup(k_ids, labels)
    now = np.where(pos >= 0, k_counts[np.maximum(pos, 0)] if len(k_ids) else 0, 0)
    if (now > counts).any():
        i = int(np.argmax(now > counts))
        raise InputError(f"--extend: cluster {int(labels[i])} has {int(now[i])} rows in clusters-*.parquet but a "
                         f"count of {int(counts[i])} in state-*.parquet (not one clustering's files)")
    yield beam.pvalue.TaggedOutput("stats", ("emptied_clusters", int((now == 0).sum())))
    changed = (now != counts) & (now > 0)
    if recompute_all:
        changed = now > 0
    if changed.any():
        yield beam.pvalue.TaggedOutput("changed", labels[changed])
    same = (now == counts) & ~changed
    if same.any():
        yield Clusters(ek.node_ids(labels[same], num_shards), counts[same], sums[same], sq[same], labels[same])


def _concat_ids(parts):
    parts = [np.asarray(p, np.int64) for p in parts]
    return unique_sorted(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _kept_of_changed(block, changed):
    m = np.isin(block["cluster"], changed)
    if not m.any():
        return
    cluster = block["cluster"][m]
    b = (cluster % NUM_BUCKETS).astype(np.int64)
    for q in unique_sorted(b):
        mm = b == q
        yield int(q), (cluster[mm], block["hashes"][m][mm], block["vecs"][m][mm])


def _recompute(kv, metric, center, num_shards):
    _, parts = kv
    parts = list(parts)
    cluster = np.concatenate([p[0] for p in parts])
    hashes = np.concatenate([p[1] for p in parts])
    x = _prepared(np.concatenate([p[2] for p in parts]), metric, center)
    with StageTimer("extend_state"):
        labels, counts, sums, sq = ek.group_state(cluster, hashes, x, metric)
    return Clusters(ek.node_ids(labels, num_shards), counts, sums, sq, labels)


def _prepared(vecs, metric, center):
    """The float64 vectors cm-cluster clusters (unit rows, or rows minus the old centre)."""
    return kk.prepared_vectors({"vecs": vecs, "normalise": metric == "cosine", "center": center}, np.float64)


class _ConcatClusters(beam.CombineFn):
    def __init__(self, d):
        self._d = d

    def create_accumulator(self):
        return []

    def add_input(self, acc, c):
        acc.append(c)
        return acc

    def merge_accumulators(self, accs):
        return [c for a in accs for c in a]

    def extract_output(self, acc):
        return Clusters.concat(acc, self._d) if acc else None


# --- 3. Candidates new point -> existing clusters --------------------------------

def _index_nodes(nodes, metric, num_probes):
    """The candidate search's side input: every existing cluster, and k-means partitions
    of them when there are many (extend_kernels.PARTITION_MIN_CLUSTERS)."""
    if nodes is None or len(nodes) <= ek.PARTITION_MIN_CLUSTERS:
        return {"nodes": nodes, "partitions": None, "num_probes": num_probes}
    with StageTimer("extend_candidates"):
        parts = ek.partition_clusters(nodes, metric, max(1, len(nodes) // ek.CLUSTERS_PER_PARTITION))
    return {"nodes": nodes, "partitions": parts, "num_probes": num_probes}


def _cluster_edges(kv, index, k, metric, eps):
    shard, block = kv
    nodes = index["nodes"]
    if nodes is None or not len(nodes) or not len(block["ids"]):
        return
    with StageTimer("extend_candidates"):
        x = _prepared(block["vecs"], metric, block["center"])
        if index["partitions"] is None:
            src, dst = ek.cluster_candidates(x, block["ids"], nodes, k, metric, eps)
        else:
            src, dst = ek.cluster_candidates_partitioned(x, block["ids"], nodes, index["partitions"], k, metric, eps,
                                                         index["num_probes"])
    if len(src):
        yield shard, {"src": src, "dst": dst}
        yield beam.pvalue.TaggedOutput("touched", unique_sorted(dst))


def _split_nodes(c: Clusters, touched):
    """Existing clusters with a candidate edge go to the HAC (keyed by their shard); the
    others are final as they are."""
    hit = np.isin(c.ids, touched)
    if hit.any():
        t = c.take(hit)
        shards = hk.shard_of(t.ids)
        for s in unique_sorted(shards):
            yield int(s), {"nodes": t.take(shards == s)}
    if (~hit).any():
        yield beam.pvalue.TaggedOutput("untouched", c.take(~hit))


# --- 5. Relabel the rows -----------------------------------------------------------

def _table(_, assignments, untouched_changed, touched):
    """{node ids sorted, final labels, sizes} of every node whose label or size may have
    changed, and the extension's counts."""
    with StageTimer("extend_relabel"):
        ids = [a["points"] for a in assignments]
        labels = [a["labels"] for a in assignments]
        sizes = [a["sizes"] for a in assignments]
        hac_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        hac_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        touched = np.asarray(touched, np.int64)
        is_old = np.isin(hac_ids, touched)
        counts = ek.extension_counts(hac_labels, is_old, np.ones(len(hac_ids), np.int64))
        for c in untouched_changed:
            ids.append(c.ids); labels.append(c.labels); sizes.append(c.counts)
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        all_ids = all_ids[order]
        if len(all_ids) > 1 and (all_ids[1:] == all_ids[:-1]).any():
            dup = all_ids[1:][all_ids[1:] == all_ids[:-1]]
            raise RuntimeError(f"extension: node id {int(dup[0])} is both an existing cluster and a new point "
                               "(53-bit hash collision)")
        return {"ids": all_ids,
                "labels": (np.concatenate(labels) if labels else np.zeros(0, np.int64))[order],
                "sizes": (np.concatenate(sizes) if sizes else np.zeros(0, np.int64))[order],
                "counts": counts, "old_nodes_in_hac": int(is_old.sum())}


def _relabel_rows(block, table, num_shards):
    with StageTimer("extend_relabel"):
        node = ek.node_ids(block["key"], num_shards)
        pos = hk.lookup(table["ids"], node)
        hit = pos >= 0
        p = np.maximum(pos, 0)
        labels = np.where(hit, table["labels"][p] if len(table["ids"]) else 0, block["key"])
        sizes = np.where(hit, table["sizes"][p] if len(table["ids"]) else 0, block["size"])
        # Every new point went through the HAC; a kept row absent from the table belongs
        # to a cluster that had no candidate and lost no member: unchanged.
        if (block["new"] & ~hit).any():
            i = int(np.flatnonzero(block["new"] & ~hit)[0])
            raise RuntimeError(f"extension: new example {block['names'][i].as_py()!r} got no cluster")
        return pa.RecordBatch.from_arrays(
            [block["names"], pa.array(labels.astype(np.int64)), pa.array(sizes.astype(np.int64)),
             pa.array(block["leaf"], pa.int64())], schema=CLUSTERS_SCHEMA)


def _offset_rounds(m: hik.Merges, offset: int) -> hik.Merges:
    return hik.Merges(m.a, m.b, m.height, m.size, (m.round + offset).astype(np.int32))


def _sum_fingerprints(parts):
    fp, rows, points = 0, 0, 0
    for f, r, n in parts:
        fp, rows, points = (fp + f) & 0xFFFFFFFFFFFFFFFF, rows + r, points + n
    return fp, rows, points


def _summary(_, stats, table, removed_clusters, sizes_hac, untouched_sizes, hac_stats, new_points, fingerprint):
    stats = dict(stats)
    c = table["counts"]
    sizes = np.concatenate(list(sizes_hac) + list(untouched_sizes)) if (sizes_hac or untouched_sizes) \
        else np.zeros(0, np.int64)
    beam_rounds = {k[0] for k, _ in hac_stats if k[0] != "inmemory"}
    mem_rounds = {k[1] for k, _ in hac_stats if k[0] == "inmemory"}
    merges = sum(v for k, v in hac_stats if k[-1] == "merges")
    fp, rows, points = fingerprint
    return {
        "input_fingerprint": f"{fp:016x}", "input_rows": int(rows), "n": int(points),
        "new_examples": int(new_points),
        "joined_existing": c["joined_existing"],
        "new_clusters": c["new_clusters"],
        "existing_merged": c["existing_merged"],
        "merges": int(merges),
        "removed": int(stats.get("removed", 0)),
        "emptied_clusters": int(stats.get("emptied_clusters", 0)),
        "clusters_changed_by_removals": int(len(removed_clusters)),
        "touched_clusters": table["old_nodes_in_hac"],
        "rounds": len(beam_rounds) + len(mem_rounds),
        "cluster_sizes": sizes,
    }


class ExtendClusters(beam.PTransform):
    """Extends a clustering by the new rows of the pool (module docstring).

    Input: {"embeddings": pa.RecordBatch (example_id, embedding) of the whole current pool,
            "old_clusters": pa.RecordBatch (example_id, cluster_id, cluster_size, leaf_id),
            "old_state": pa.RecordBatch (state.STATE_SCHEMA), "old_merges": pa.RecordBatch (MERGES_SCHEMA)}.
    Output: {"clusters", "merges", "state", "rejected": pa.RecordBatch; "summary": one dict}.
    """

    def __init__(self, eps: float, metric: str, center: Optional[np.ndarray], dimension: Optional[int],
                 num_neighbors: int, cluster_neighbors: int, num_shards: int, max_rounds: int,
                 max_inmemory_edges: int, round_offset: int, recompute_state: bool = False, num_probes: int = 2):
        super().__init__()
        self._eps, self._metric = float(eps), metric
        self._center = None if center is None else np.asarray(center, np.float64)
        self._d = dimension
        self._k, self._kc = int(num_neighbors), int(cluster_neighbors)
        self._shards, self._rounds, self._inmem = int(num_shards), int(max_rounds), int(max_inmemory_edges)
        self._offset, self._recompute = int(round_offset), bool(recompute_state)
        self._probes = int(num_probes)

    def expand(self, inputs):
        eps, metric, center, shards = self._eps, self._metric, self._center, self._shards
        p = inputs["embeddings"].pipeline
        valid = inputs["embeddings"] | "Validate" >> beam.ParDo(_Validate(metric)).with_outputs("rejected", main="points")
        matched = (
            (valid.points | "BucketPool" >> beam.FlatMap(_bucket_pool),
             inputs["old_clusters"] | "BucketOld" >> beam.FlatMap(_bucket_old))
            | "FlattenBuckets" >> beam.Flatten()
            | "GroupBuckets" >> beam.GroupByKey()
            | "Match" >> beam.FlatMap(_match, shards, metric, center, self._d).with_outputs(
                "kept", "new", "stats", "removed_clusters", main="rows")
        )
        # 2. Existing clusters after removals.
        kept_counts = matched.kept | "CountKept" >> beam.CombineGlobally(_CountKept())
        stored = inputs["old_state"] | "StateNodes" >> beam.FlatMap(
            _state_nodes, beam.pvalue.AsSingleton(kept_counts), self._recompute, shards, self._d
        ).with_outputs("changed", "stats", main="nodes")
        changed = stored.changed | "ChangedIds" >> beam.CombineGlobally(_concat_ids)
        recomputed = (
            matched.kept
            | "KeptOfChanged" >> beam.FlatMap(_kept_of_changed, beam.pvalue.AsSingleton(changed))
            | "GroupChanged" >> beam.GroupByKey()
            | "Recompute" >> beam.Map(_recompute, metric, center, shards)
        )
        nodes = (stored.nodes, recomputed) | "FlattenNodes" >> beam.Flatten()
        all_nodes = (nodes | "GatherNodes" >> beam.CombineGlobally(_ConcatClusters(self._d or 0))
                     | "IndexNodes" >> beam.Map(_index_nodes, metric, self._probes))

        # 3. Candidates.
        new_points = matched.new | "GroupNew" >> beam.GroupByKey() | "MergeNew" >> beam.Map(_merge_point_blocks)
        knn = new_points | "NewKnn" >> KnnGraph(self._k, metric, "exact", shards, max_dist=eps)
        to_clusters = new_points | "ClusterCandidates" >> beam.FlatMap(
            _cluster_edges, beam.pvalue.AsSingleton(all_nodes), self._kc, metric, eps).with_outputs(
            "touched", main="edges")
        touched = to_clusters.touched | "TouchedIds" >> beam.CombineGlobally(_concat_ids)
        split = nodes | "SplitNodes" >> beam.FlatMap(_split_nodes, beam.pvalue.AsSingleton(touched)).with_outputs(
            "untouched", main="hac")

        # 4. The HAC rounds from the touched clusters and the new points.
        hac = {"points": (new_points, split.hac) | "FlattenHacNodes" >> beam.Flatten(),
               "edges": (knn["edges"], to_clusters.edges) | "FlattenEdges" >> beam.Flatten()} | "Hac" >> HacRounds(
            eps, metric, self._rounds, self._inmem)

        # 5. Relabel.
        # Recomputed clusters (they lost members) that the HAC did not see: new sizes.
        untouched_changed = recomputed | "RecomputedUntouched" >> beam.Map(
            lambda c, t: c.take(~np.isin(c.ids, t)), beam.pvalue.AsSingleton(touched))
        table = (
            p | "TableSeed" >> beam.Create([None])
            | "Table" >> beam.Map(_table, beam.pvalue.AsList(hac["assignments"] | "AssignedBlocks" >> beam.Values()),
                                  beam.pvalue.AsList(untouched_changed), beam.pvalue.AsSingleton(touched))
        )
        clusters = matched.rows | "Relabel" >> beam.Map(_relabel_rows, beam.pvalue.AsSingleton(table), shards)
        offset = self._offset
        new_merges = hac["merges"] | "OffsetRounds" >> beam.Map(_offset_rounds, offset) | "NewMergeBatches" >> beam.Map(
            merges_to_batch)
        merges = (inputs["old_merges"], new_merges) | "FlattenMerges" >> beam.Flatten()
        state = ((split.untouched, hac["final_state"]) | "FlattenState" >> beam.Flatten()
                 | "StateBatches" >> beam.Map(lambda c: state_batch(c.labels, c.counts, c.sums, c.sq)))
        new_count = (matched.new | "CountNew" >> beam.Map(lambda kv: len(kv[1]["ids"]))
                     | "SumNew" >> beam.CombineGlobally(sum))
        fingerprint = (valid.points | "BlockFingerprints" >> beam.Map(lambda b: (b["fingerprint"], b["rows"], len(b["hashes"])))
                       | "PoolFingerprint" >> beam.CombineGlobally(_sum_fingerprints))
        stats = ((matched.stats, stored.stats) | "FlattenStats" >> beam.Flatten()
                 | "SumStats" >> beam.CombinePerKey(sum))
        summary = (
            p | "SummarySeed" >> beam.Create([None])
            | "Summary" >> beam.Map(
                _summary, beam.pvalue.AsList(stats), beam.pvalue.AsSingleton(table),
                beam.pvalue.AsSingleton(matched.removed_clusters | "RemovedIds" >> beam.CombineGlobally(_concat_ids)),
                beam.pvalue.AsList(hac["sizes"]),
                beam.pvalue.AsList(split.untouched | "UntouchedSizes" >> beam.Map(lambda c: c.counts)),
                beam.pvalue.AsList(hac["stats"]), beam.pvalue.AsSingleton(new_count),
                beam.pvalue.AsSingleton(fingerprint))
        )
        return {"clusters": clusters, "merges": merges, "state": state, "rejected": valid.rejected,
                "summary": summary, "hac_stats": hac["stats"]}
