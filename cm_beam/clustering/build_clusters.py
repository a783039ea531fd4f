"""BuildClusters: average-linkage HAC of a pool of embeddings, cut at a distance, a target
mean cluster size or a number of clusters.

The Cluster-Margin clustering step (docs/design.md, "Clustering: average-linkage
HAC at scale") as one Beam PTransform, in the style of TFDV's stats_api:

    clusters = (
        pipeline
        | ReadTableBlocks(files, columns=["example_id", "embedding"])
        | BuildClusters(distance_threshold=0.2, metric="cosine"))
    clusters["clusters"]   # pa.RecordBatch: example_id, cluster_id (int64 >= 0), cluster_size, leaf_id
    clusters["merges"]     # pa.RecordBatch: every merge (hierarchy.MERGES_SCHEMA)
    clusters["state"]      # pa.RecordBatch: each cluster's linkage state at max_distance (state.STATE_SCHEMA)
    clusters["rejected"]   # pa.RecordBatch: example_id, reason (NaN/inf, zero vector, ...)
    clusters["summary"]    # one dict: n, clusters, size histogram, rounds, recall, fingerprint

Semantics: the flat clusters of scipy's
`fcluster(linkage(X, "average", metric), eps, "distance")`, computed with exact
average linkage from cluster sums (`hac_kernels`) on candidate pairs from a sharded
kNN graph (`knn_graph`), merged in reciprocal-nearest-neighbour rounds (`hac`).
With every pair a candidate (k = n - 1, exact kNN) the partition is scipy's.

Stages: Validate (per block: ragged embeddings fail naming an example_id; non-finite
rows and, under cosine, zero vectors go to `rejected`) -> PoolStats (one global
combine: count, dimension, fingerprint, a bottom-hash sample) -> Plan (k-means on the
sample: spatial shards and IVF partitions; exact or ivf) -> ShardPoints -> KnnGraph
-> HacRounds (to max_distance) -> Join with the example ids [-> CutHierarchy, when the cut
is below max_distance: by target mean size, cluster count, or an eps < max_distance].

The merges (hierarchy_kernels: cluster_a < cluster_b, merged = cluster_a, height, size,
round) name nodes by public cluster id; each example's `leaf_id` is its singleton cluster
id, so any cut at eps' <= max_distance is a relabelling of the leaves by the merges with
height <= eps' (hierarchy.CutHierarchy), without reclustering.

Cluster ids are deterministic: the smallest 63-bit hash of a member's example_id, so
the same pool gives the same ids whatever the sharding and the number of workers.
"""

from __future__ import annotations

from typing import Dict, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cm_beam.clustering import duplicates_kernels as dk
from cm_beam.clustering import hac_kernels as hk
from cm_beam.clustering import knn_kernels as kk
from cm_beam.array_ops import unique_sorted
from cm_beam.errors import InputError
from cm_beam.clustering.hac import HacRounds
from cm_beam.clustering.hierarchy import CUT_CLUSTERS_SCHEMA, MERGES_SCHEMA, CutHierarchy, merges_to_batch  # noqa: F401
from cm_beam.clustering.state import STATE_SCHEMA, state_batch  # noqa: F401
from cm_beam.hashing import splitmix64, hash_ids
from cm_beam.clustering.knn_graph import KnnGraph
from cm_beam.runtime.stage_timer import StageTimer

# leaf_id: the example's singleton cluster id, which names it in merges-*.parquet.
CLUSTERS_SCHEMA = CUT_CLUSTERS_SCHEMA
REJECTED_SCHEMA = pa.schema([("example_id", pa.string()), ("reason", pa.string())])

KNN_MODES = ("auto", "exact", "ivf")
# Pools up to this size use exact kNN under knn_mode="auto": exact candidates where
# they cost little (benchmarks/results/cluster.json, `crossover`: at 50K exact took 1.2x
# ivf's time on synthetic blobs, 1.5x at 100K; exact work grows as n^2).
DEFAULT_EXACT_MAX_POINTS = 50_000
DEFAULT_NUM_NEIGHBORS = 100
DEFAULT_NUM_SHARDS = 16
# IVF cells a point searches at most (its own and the nearest boundaries that its own
# k-th distance allows): on all 60K Fashion-MNIST images 6 gave ARI >= 0.99998 against
# the exact-candidate partition at eps 0.1-0.3 (benchmarks/results/cluster.json, `ivf_fidelity`).
DEFAULT_NUM_PROBES = 6
DEFAULT_POINTS_PER_PARTITION = 1000
DEFAULT_MAX_ROUNDS = 16
DEFAULT_MAX_INMEMORY_EDGES = 2_000_000
SAMPLE_SIZE = 32_768
RECALL_QUERIES = 256
KMEANS_ITERATIONS = 8

# Hash salts: independent uses of the example-id hash.
_SALT_ID = 11
_SALT_FINGERPRINT = 12
_MASK64 = (1 << 64) - 1

FINGERPRINT_METHOD = (
    "sum mod 2^64 over input rows (rejected ones included) of splitmix64(hash(example_id) "
    "^ polynomial hash of the float32 embedding bits); independent of row order and sharding"
)


# --- Validate ------------------------------------------------------------------

def _embedding_matrix(batch: pa.RecordBatch):
    """(ids, float32 [m, d] values of rows with a non-empty embedding, row mask, lengths)."""
    ids = batch.column(batch.schema.get_field_index("example_id"))
    emb = batch.column(batch.schema.get_field_index("embedding"))
    if pa.types.is_fixed_size_list(emb.type):
        lengths = np.full(len(emb), emb.type.list_size, np.int64)
    else:
        lengths = pc.list_value_length(emb).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    present = (~emb.is_null().to_numpy(zero_copy_only=False)) & (lengths > 0)
    return ids, emb, present, lengths


def fingerprint_rows(ids: pa.Array, vecs: np.ndarray, present: np.ndarray) -> int:
    """The input fingerprint's contribution of these rows (see FINGERPRINT_METHOD)."""
    h = hash_ids(ids, seed=0, salt=_SALT_FINGERPRINT)
    if vecs.shape[0]:
        bits = np.ascontiguousarray(vecs, np.float32).view(np.uint32).astype(np.uint64)
        mult = splitmix64(np.arange(bits.shape[1], dtype=np.uint64)) | np.uint64(1)
        with np.errstate(over="ignore"):
            rows = (bits * mult[None, :]).sum(axis=1, dtype=np.uint64)
        emb_hash = np.zeros(len(h), np.uint64)
        emb_hash[present] = splitmix64(rows)
        h = splitmix64(h ^ emb_hash)
    else:
        h = splitmix64(h)
    return int(h.sum(dtype=np.uint64))


class _Validate(beam.DoFn):
    """Record batch -> valid point block (main) and rejected rows ("rejected")."""

    def __init__(self, metric: str):
        self._metric = metric

    def process(self, batch: pa.RecordBatch):
        with StageTimer("validate"):
            ids, emb, present, lengths = _embedding_matrix(batch)
            reasons = np.full(len(ids), None, object)
            reasons[~emb.is_null().to_numpy(zero_copy_only=False) & (lengths == 0)] = "empty_embedding"
            reasons[emb.is_null().to_numpy(zero_copy_only=False)] = "null_embedding"
            rows = np.flatnonzero(present)
            d = int(lengths[rows[0]]) if len(rows) else 0
            bad = rows[lengths[rows] != d]
            if len(bad):
                raise InputError(
                    f"--embeddings: example_id {ids[int(bad[0])].as_py()!r} has an embedding of length "
                    f"{int(lengths[bad[0]])}, but example_id {ids[int(rows[0])].as_py()!r} has {d}; "
                    "all embeddings must have the same length"
                )
            sub = emb.filter(pa.array(present))
            if pa.types.is_fixed_size_list(sub.type):
                values = sub.flatten()
            else:
                values = pc.list_flatten(sub)
            vecs = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), d)
            fp = fingerprint_rows(ids, vecs, present)
            finite = np.isfinite(vecs).all(axis=1)
            ok = finite.copy()
            reasons[rows[~finite]] = "non_finite"
            if self._metric == "cosine":
                zero = finite & ~np.any(vecs != 0, axis=1)
                reasons[rows[zero]] = "zero_vector"
                ok &= ~zero
            keep = rows[ok]
            rejected = np.flatnonzero(reasons != None)  # noqa: E711 (object array)
            if len(rejected):
                yield beam.pvalue.TaggedOutput("rejected", pa.RecordBatch.from_arrays(
                    [ids.take(pa.array(rejected)), pa.array(reasons[rejected].tolist(), pa.string())],
                    schema=REJECTED_SCHEMA))
            names = ids.take(pa.array(keep, pa.int64()))
            yield {
                "names": names,
                "hashes": hash_ids(names, seed=0, salt=_SALT_ID),
                "vecs": vecs[ok],
                "d": d,
                "first_id": names[0].as_py() if len(names) else None,
                "fingerprint": fp,
                "rows": len(ids),
            }


def _prepare_vectors(vecs: np.ndarray, metric: str, mean: Optional[np.ndarray]) -> np.ndarray:
    """float64 vectors the clustering uses: unit rows (cosine) or centred (sqeuclidean).

    Centring does not change squared Euclidean distances but keeps the sums-based
    linkage (q_A/|A| + q_B/|B| - 2 s_A.s_B/|A||B|) away from cancellation.
    """
    return kk.prepared_vectors({"vecs": vecs, "normalise": metric == "cosine", "center": mean})


def _tie_scale(metric: str, mean: Optional[np.ndarray], max_sq_norm: float) -> float:
    """The size of the terms linkages are computed from (hac_kernels.tie_keys): 1 for
    cosine (unit vectors); for sqeuclidean a bound of the largest squared norm of the
    centred vectors, (max |v| + |mean|)^2. Rounded up to a power of two, so float noise
    in the mean does not change it."""
    if metric != "sqeuclidean":
        return 1.0
    bound = (np.sqrt(max_sq_norm) + float(np.sqrt(np.dot(mean, mean)))) ** 2
    return float(2.0 ** np.ceil(np.log2(max(bound, 1e-300))))


# --- PoolStats: one global combine ----------------------------------------------

class _PoolStats(beam.CombineFn):
    """Count, dimensions seen, fingerprint, vector sum and a bottom-hash sample."""

    def __init__(self, metric: str, sample_size: int):
        self._metric, self._sample_size = metric, sample_size

    def create_accumulator(self):
        return {"n": 0, "rows": 0, "dims": {}, "fp": 0, "sum": None, "maxsq": 0.0, "hashes": np.zeros(0, np.uint64),
                "vecs": None}

    def add_input(self, acc, block):
        part = {"n": len(block["hashes"]), "rows": block["rows"], "fp": block["fingerprint"], "dims": {},
                "sum": None, "maxsq": 0.0, "hashes": block["hashes"], "vecs": None}
        if len(block["hashes"]):
            part["dims"] = {block["d"]: block["first_id"]}
            if self._metric == "sqeuclidean":
                v = block["vecs"].astype(np.float64)
                part["sum"] = v.sum(axis=0)
                part["maxsq"] = float(np.einsum("ij,ij->i", v, v).max())
            part["vecs"] = block["vecs"]  # raw: Plan prepares them once the mean is known
            part = self._trim(part)
        return self.merge_accumulators([acc, part])

    def _trim(self, acc):
        if len(acc["hashes"]) > self._sample_size:
            keep = np.argpartition(acc["hashes"], self._sample_size - 1)[: self._sample_size]
            acc["hashes"], acc["vecs"] = acc["hashes"][keep], acc["vecs"][keep]
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        hashes, vecs = [], []
        for a in accs:
            out["n"] += a["n"]
            out["rows"] += a["rows"]
            out["fp"] = (out["fp"] + a["fp"]) & _MASK64
            for d, first in a["dims"].items():
                out["dims"].setdefault(d, first)
            if a["sum"] is not None:
                out["sum"] = a["sum"] if out["sum"] is None else out["sum"] + a["sum"]
            out["maxsq"] = max(out["maxsq"], a["maxsq"])
            if a["vecs"] is not None and len(a["hashes"]):
                if vecs and vecs[0].shape[1] != a["vecs"].shape[1]:
                    continue  # mixed dimensions: reported by Plan, naming example ids
                hashes.append(a["hashes"]); vecs.append(a["vecs"])
        if hashes:
            out["hashes"], out["vecs"] = np.concatenate(hashes), np.concatenate(vecs)
        return self._trim(out)

    def extract_output(self, acc):
        if acc["vecs"] is not None:
            order = np.argsort(acc["hashes"], kind="stable")  # canonical order: sharding-independent
            acc["hashes"], acc["vecs"] = acc["hashes"][order], acc["vecs"][order]
        return acc


# --- Plan: shards, partitions, recall sample -------------------------------------

def _plan(stats, metric, knn_mode, exact_max_points, num_shards, num_partitions, num_probes, seed):
    n = stats["n"]
    if len(stats["dims"]) > 1:
        (d1, id1), (d2, id2) = sorted(stats["dims"].items())[:2]
        raise InputError(
            f"--embeddings: example_id {id1!r} has an embedding of length {d1}, but example_id "
            f"{id2!r} has {d2}; all embeddings must have the same length"
        )
    plan = {"n": n, "rows": stats["rows"], "fingerprint": f"{stats['fp']:016x}", "mode": None, "dim": None,
            "mean": None, "tie_scale": 1.0, "shard_centroids": None, "ivf_centroids": None, "num_partitions": 0,
            "sample": {"ids": np.zeros(0, np.int64), "vecs": np.zeros((0, 1), np.float32)}}
    if n == 0:
        return plan
    plan["dim"] = int(next(iter(stats["dims"])))
    mean = stats["sum"] / n if metric == "sqeuclidean" else None
    plan["mean"] = mean
    plan["tie_scale"] = _tie_scale(metric, mean, stats["maxsq"])
    sample = _prepare_vectors(stats["vecs"], metric, mean).astype(np.float32)
    plan["shard_centroids"] = kk.kmeans(sample, num_shards, KMEANS_ITERATIONS, seed)
    mode = knn_mode if knn_mode != "auto" else ("exact" if n <= exact_max_points else "ivf")
    plan["mode"] = mode
    if mode == "ivf":
        parts = num_partitions or max(1, int(round(n / DEFAULT_POINTS_PER_PARTITION)))
        parts = min(parts, len(sample))
        plan["num_partitions"] = parts
        plan["ivf_centroids"] = kk.kmeans(sample, parts, KMEANS_ITERATIONS, seed + 1)
        # Recall queries: the sample's smallest hashes, named by the shard-independent
        # part of their ids (their shard is only known once ShardPoints has run).
        q = min(RECALL_QUERIES, len(sample))
        ids = hk.hash_part(hk.make_ids(np.zeros(q, np.int64), stats["hashes"][:q]))
        order = np.argsort(ids)
        plan["sample"] = {"ids": ids[order], "vecs": sample[:q][order]}
    return plan


def _shard_points(block, plan, metric):
    """Valid block -> (shard, points) and (shard, names) pieces, plus a dup-check piece."""
    if not len(block["hashes"]):
        return
    with StageTimer("shard_points"):
        vecs = _prepare_vectors(block["vecs"], metric, plan["mean"])
        # Per row, so identical vectors share a shard (MergePoints folds them there).
        shards = dk.nearest_centroid_per_row(vecs.astype(np.float32), plan["shard_centroids"])
        ids = hk.make_ids(shards, block["hashes"])
        labels = hk.public_labels(block["hashes"])
        for s in unique_sorted(shards):
            m = np.flatnonzero(shards == s)
            # Raw float32 rows travel; consumers prepare them (knn_kernels.prepared_vectors).
            yield int(s), ("points", {"ids": ids[m], "labels": labels[m], "vecs": block["vecs"][m],
                                      "names": block["names"].take(pa.array(m))})
            yield beam.pvalue.TaggedOutput("names", (int(s), {"ids": ids[m], "leaves": labels[m],
                                                              "names": block["names"].take(pa.array(m))}))
        buckets = (block["hashes"] % np.uint64(64)).astype(np.int64)
        for b in unique_sorted(buckets):
            m = np.flatnonzero(buckets == b)
            yield beam.pvalue.TaggedOutput("dupcheck", (int(b), (block["hashes"][m], block["names"].take(pa.array(m)))))


def _merge_points(kv, plan, metric):
    """A shard's point pieces -> one block, exact duplicates folded (main), plus their
    height-0 merges ("merges") and how many rows were folded ("folded").

    Identical prepared vectors go to the same spatial shard (the shard is a function
    of the vector), so folding inside the shard finds them without another shuffle.
    """
    shard, parts = kv
    blocks = [p for _, p in parts]
    ids = np.concatenate([b["ids"] for b in blocks])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
        # Same id in one shard: a duplicate example_id with the same embedding (other
        # duplicates are caught by CheckUniqueIds) or, odds ~m^2/2^54, a hash collision.
        names = pa.concat_arrays([b["names"] for b in blocks]).take(pa.array(order))
        i = int(np.flatnonzero(ids[1:] == ids[:-1])[0])
        a, b = names[i].as_py(), names[i + 1].as_py()
        if a == b:
            raise InputError(f"--embeddings: duplicate example_id {a!r}: every example_id must appear once")
        raise RuntimeError(f"53-bit id hash collision between example_ids {a!r} and {b!r} in shard {shard}")
    labels = np.concatenate([b["labels"] for b in blocks])[order]
    vecs = np.concatenate([b["vecs"] for b in blocks])[order]
    block = {"ids": ids, "labels": labels, "vecs": vecs, "normalise": metric == "cosine", "center": plan["mean"]}
    with StageTimer("fold_duplicates"):
        rep = dk.duplicate_groups(dk.row_bits(kk.prepared_vectors(block, np.float32)), ids)
        reps, counts = dk.fold_counts(rep)
        folded = np.flatnonzero(rep != np.arange(len(ids)))
        if len(folded):
            yield beam.pvalue.TaggedOutput("merges", dk.fold_merges(labels, rep))
            group_labels = labels.copy()  # a group is named by its smallest leaf id
            np.minimum.at(group_labels, rep, labels)
            block = dict(block, ids=ids[reps], labels=group_labels[reps], vecs=vecs[reps])
    yield beam.pvalue.TaggedOutput("folded", len(folded))
    # counts: the points each row stands for; folded: (representative id, point id) of
    # the other members, which the clustering carries as members of the representative.
    yield shard, dict(block, counts=counts, folded=(ids[rep[folded]], ids[folded]))


def _check_unique(kv):
    _, parts = kv
    hashes = np.concatenate([p[0] for p in parts])
    names = pa.concat_arrays([p[1] for p in parts])
    order = np.argsort(hashes, kind="stable")
    h = hashes[order]
    dup = np.flatnonzero(h[1:] == h[:-1])
    if len(dup):
        a = names[int(order[dup[0]])].as_py()
        b = names[int(order[dup[0] + 1])].as_py()
        if a == b:
            raise InputError(f"--embeddings: duplicate example_id {a!r}: every example_id must appear once")
        raise RuntimeError(f"64-bit hash collision between example_ids {a!r} and {b!r}")
    return len(h)


def _join_names(kv):
    shard, items = kv
    names, assigned = [], []
    for tag, value in items:
        (names if tag == "names" else assigned).append(value)
    if not names:
        return
    with StageTimer("write"):
        ids = np.concatenate([n["ids"] for n in names])
        example_ids = pa.concat_arrays([n["names"] for n in names])
        leaves = np.concatenate([n["leaves"] for n in names])
        if assigned:
            points = np.concatenate([a["points"] for a in assigned])
            labels = np.concatenate([a["labels"] for a in assigned])
            sizes = np.concatenate([a["sizes"] for a in assigned])
        else:
            points = labels = sizes = np.zeros(0, np.int64)
        order = np.argsort(points, kind="stable")
        points, labels, sizes = points[order], labels[order], sizes[order]
        pos = hk.lookup(points, ids)
        if len(points) != len(ids) or (pos < 0).any():
            raise RuntimeError(f"shard {shard}: {len(ids)} points but {len(points)} cluster assignments")
        yield pa.RecordBatch.from_arrays(
            [example_ids, pa.array(labels[pos], pa.int64()), pa.array(sizes[pos], pa.int64()),
             pa.array(leaves, pa.int64())], schema=CLUSTERS_SCHEMA)


def _summary(_, plan, stats, sizes, recall, checked, folded, rejected_counts, cuts, params):
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    n = int(plan["n"])
    if cuts:  # cut below max_distance: the counts are the cut's
        cut = cuts[0]
        clusters, largest, histogram = cut["num_clusters"], cut["largest_cluster"], cut["size_histogram"]
        inversions = cut["inversions"]
    else:  # cut at max_distance: the clusters the rounds made
        clusters = int(len(sizes))
        largest, histogram = (int(sizes.max()) if len(sizes) else 0), hk.size_histogram(sizes)
        cut = {"rule": "distance", "requested": params["distance_threshold"],
               "distance_threshold": params["distance_threshold"], "num_clusters": clusters,
               "mean_cluster_size": n / clusters if clusters else 0.0}
        inversions = None
    cut_record = {k: cut[k] for k in ("rule", "requested", "distance_threshold", "num_clusters", "mean_cluster_size")}
    rounds: Dict[str, Dict] = {}
    inmemory: Dict[int, Dict] = {}
    for key, value in stats:
        if key[0] == "inmemory":
            inmemory.setdefault(key[1], {})[key[2]] = int(value)
        else:
            rounds.setdefault(key[0], {})[key[1]] = int(value)
    beam_rounds = [dict(round=r, **{k: rounds[r].get(k, 0) for k in ("edges", "active", "merges")})
                   for r in sorted(rounds)]
    for r in beam_rounds:
        r["edges"] //= 2  # each undirected edge is stored at both ends
    mem_rounds = [dict(round=i, **{k: inmemory[i].get(k, 0) for k in ("edges", "active", "merges")})
                  for i in sorted(inmemory)]
    recall_value = recall[0] if recall else None
    return {
        "parameters": dict(params, knn_mode_used=plan["mode"], num_partitions_used=plan["num_partitions"]),
        "n": int(plan["n"]),
        "input_rows": int(plan["rows"]),
        "rejected": int(sum(rejected_counts.values())),
        "rejected_by_reason": dict(rejected_counts),
        "dimension": plan["dim"],
        "clusters": int(clusters),
        "clustered_points": int(sizes.sum()),
        "largest_cluster": int(largest),
        "size_histogram": histogram,
        "cut": cut_record,
        "distance_threshold": cut_record["distance_threshold"],
        "num_clusters": cut_record["num_clusters"],
        "mean_cluster_size": cut_record["mean_cluster_size"],
        "max_distance": params["max_distance"],
        "hierarchy": {"merges": int(n - len(sizes)), "clusters_at_max_distance": int(len(sizes)),
                      "inversions": inversions},
        "rounds": len(beam_rounds) + len(mem_rounds),
        "beam_rounds": beam_rounds,
        "inmemory_rounds": mem_rounds,
        "knn_recall": recall_value,
        "duplicates_folded": int(sum(folded)),
        "ids_checked_unique": int(sum(checked)),
        "input_fingerprint": plan["fingerprint"],
        "input_fingerprint_method": FINGERPRINT_METHOD,
        "state_center": None if plan["mean"] is None else [float(v) for v in plan["mean"]],
    }


def check_cut_flags(distance_threshold, target_mean_cluster_size, num_clusters, max_distance, metric):
    """(rule, value, max_distance) of a clustering's cut flags, or InputError naming the flag.

    Exactly one of the three rules; --max_distance (the eps the rounds run to) defaults
    to --distance_threshold and is required with the two others.
    """
    given = [(flag, v) for flag, v in (("--distance_threshold", distance_threshold),
                                       ("--target_mean_cluster_size", target_mean_cluster_size),
                                       ("--num_clusters", num_clusters)) if v is not None]
    if len(given) != 1:
        raise InputError("exactly one of --distance_threshold, --target_mean_cluster_size, --num_clusters is "
                         f"required, got {', '.join(f for f, _ in given) or 'none'}")
    if metric not in hk.METRICS:
        raise InputError(f"--metric must be one of {', '.join(hk.METRICS)}, got {metric!r}")
    (flag, value), = given

    def finite(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)

    if distance_threshold is not None:
        rule = "distance"
        if not (finite(value) and value > 0):
            raise InputError(f"--distance_threshold must be a finite number > 0, got {value!r}")
        if metric == "cosine" and value > 2:
            raise InputError(f"--distance_threshold: cosine distances are at most 2, got {value}")
    elif target_mean_cluster_size is not None:
        rule = "target"
        if not (finite(value) and value >= 1):
            raise InputError(f"--target_mean_cluster_size must be a finite number >= 1, got {value!r}")
    else:
        rule = "num_clusters"
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
            raise InputError(f"--num_clusters must be an integer >= 1, got {value!r}")
    if max_distance is None:
        if rule != "distance":
            raise InputError(f"--max_distance is required with {flag}: the eps the clustering runs to "
                             "before the cut is chosen")
        max_distance = value
    if not (finite(max_distance) and max_distance > 0):
        raise InputError(f"--max_distance must be a finite number > 0, got {max_distance!r}")
    if metric == "cosine" and max_distance > 2:
        raise InputError(f"--max_distance: cosine distances are at most 2, got {max_distance}")
    if rule == "distance" and max_distance < value:
        raise InputError(f"--max_distance ({max_distance}) must be >= --distance_threshold ({value})")
    return rule, (float(value) if rule != "num_clusters" else int(value)), float(max_distance)


class BuildClusters(beam.PTransform):
    """Average-linkage HAC over pa.RecordBatch blocks, run to `max_distance` and cut by one rule.

    Cut: exactly one of `distance_threshold` (max_distance defaults to it), or
    `target_mean_cluster_size` / `num_clusters` (max_distance required; the achievable
    cut nearest the target; InputError naming the flag, raised in the pipeline, if even
    the cut at max_distance is finer than the target).

    Input: PCollection[pa.RecordBatch] with `example_id` (string) and `embedding`
    (list of numbers, the same length in every row).
    Output: dict of PCollections
      "clusters": pa.RecordBatch (example_id, cluster_id int64 >= 0, cluster_size int64, leaf_id int64),
      "merges":   pa.RecordBatch (hierarchy.MERGES_SCHEMA), every merge up to max_distance,
      "state":    pa.RecordBatch (state.STATE_SCHEMA), count/sum/sq of each cluster at max_distance,
      "rejected": pa.RecordBatch (example_id, reason),
      "summary":  one dict (see docs/reference.md, "cm-cluster manifest.json": n,
                  clusters, size_histogram, rounds, per-round merges/active clusters,
                  knn_recall, input_fingerprint).

    `max_points`, when the caller knows an upper bound on the pool size, lets small
    pools skip the unrolled distributed rounds (n * k <= max_inmemory_edges).

    Example:
        out = batches | BuildClusters(distance_threshold=0.2)
        out["clusters"] | WriteTableBlocks(prefix, CLUSTERS_SCHEMA)
    """

    def __init__(self, distance_threshold: Optional[float] = None, metric: str = "cosine",
                 num_neighbors: int = DEFAULT_NUM_NEIGHBORS, knn_mode: str = "auto",
                 exact_max_points: int = DEFAULT_EXACT_MAX_POINTS, num_partitions: int = 0,
                 num_probes: int = DEFAULT_NUM_PROBES, num_shards: int = DEFAULT_NUM_SHARDS,
                 max_rounds: int = DEFAULT_MAX_ROUNDS, max_inmemory_edges: int = DEFAULT_MAX_INMEMORY_EDGES,
                 seed: int = 0, max_points: Optional[int] = None,
                 target_mean_cluster_size: Optional[float] = None, num_clusters: Optional[int] = None,
                 max_distance: Optional[float] = None):
        super().__init__()
        rule, value, max_distance = check_cut_flags(distance_threshold, target_mean_cluster_size, num_clusters,
                                                    max_distance, metric)
        self._cut = (rule, value)
        if knn_mode not in KNN_MODES:
            raise InputError(f"--knn_mode must be one of {', '.join(KNN_MODES)}, got {knn_mode!r}")
        for flag, value, low in (("--num_neighbors", num_neighbors, 1), ("--exact_max_points", exact_max_points, 0),
                                 ("--num_partitions", num_partitions, 0), ("--num_probes", num_probes, 1),
                                 ("--num_shards", num_shards, 1), ("--max_rounds", max_rounds, 0),
                                 ("--max_inmemory_edges", max_inmemory_edges, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"{flag} must be an integer >= {low}, got {value!r}")
        if num_shards > hk.MAX_SHARDS:
            raise InputError(f"--num_shards must be <= {hk.MAX_SHARDS}, got {num_shards}")
        # --num_probes caps the partitions a point searches: above --num_partitions it means
        # every partition the boundary bound allows (exact search), not an error.
        # A known bound on the pool (e.g. from file metadata) can rule distributed
        # rounds out: the kNN graph has at most n * k edges. Not unrolling them saves
        # the fixed cost of ~6 empty stages per round on small pools.
        self._unrolled_rounds = max_rounds
        if max_points is not None and max_points * num_neighbors <= max_inmemory_edges:
            self._unrolled_rounds = 0
        # The kNN mode is fixed when the graph is built if it can be (explicit, or auto
        # with a known pool size); otherwise both branches exist and Plan picks one.
        self._static_mode = knn_mode if knn_mode != "auto" else (
            None if max_points is None else ("exact" if max_points <= exact_max_points else "ivf"))
        self.params = {
            "distance_threshold": None if distance_threshold is None else float(distance_threshold),
            "target_mean_cluster_size": None if target_mean_cluster_size is None else float(target_mean_cluster_size),
            "num_clusters": None if num_clusters is None else int(num_clusters),
            "max_distance": float(max_distance), "metric": metric, "num_neighbors": int(num_neighbors),
            "knn_mode": knn_mode, "exact_max_points": int(exact_max_points), "num_partitions": int(num_partitions),
            "num_probes": int(num_probes), "num_shards": int(num_shards), "max_rounds": int(max_rounds),
            "max_inmemory_edges": int(max_inmemory_edges), "seed": int(seed),
        }

    def expand(self, batches):
        p = self.params
        # The rounds run to max_distance; the clusters are then cut where the rule says.
        metric, eps = p["metric"], p["max_distance"]
        valid = batches | "Validate" >> beam.ParDo(_Validate(metric)).with_outputs("rejected", main="points")
        stats = valid.points | "PoolStats" >> beam.CombineGlobally(_PoolStats(metric, SAMPLE_SIZE))
        plan = stats | "Plan" >> beam.Map(
            _plan, metric, self._static_mode or p["knn_mode"], p["exact_max_points"], p["num_shards"],
            p["num_partitions"], p["num_probes"], p["seed"])
        plan_si = beam.pvalue.AsSingleton(plan)
        pieces = valid.points | "ShardPoints" >> beam.FlatMap(_shard_points, plan_si, metric).with_outputs(
            "names", "dupcheck", main="points")
        merged = (pieces.points | "GroupPoints" >> beam.GroupByKey()
                  | "MergePoints" >> beam.FlatMap(_merge_points, plan_si, metric).with_outputs(
                      "merges", "folded", main="points"))
        points = merged.points
        checked = (pieces.dupcheck | "GroupIdHashes" >> beam.GroupByKey()
                   | "CheckUniqueIds" >> beam.Map(_check_unique))

        edge_parts, recall = [], []
        if self._static_mode in (None, "exact"):
            exact_points = points | "ExactOnly" >> beam.Filter(lambda kv, pl: pl["mode"] == "exact", plan_si)
            exact = exact_points | "ExactKnn" >> KnnGraph(
                p["num_neighbors"], metric, "exact", p["num_shards"], max_dist=eps)
            edge_parts.append(exact["edges"])
        if self._static_mode in (None, "ivf"):
            ivf_points = points | "IvfOnly" >> beam.Filter(lambda kv, pl: pl["mode"] == "ivf", plan_si)
            ivf = ivf_points | "IvfKnn" >> KnnGraph(
                p["num_neighbors"], metric, "ivf", p["num_shards"], p["num_probes"], max_dist=eps,
                centroids=beam.pvalue.AsSingleton(plan | "IvfCentroids" >> beam.Map(lambda pl: pl["ivf_centroids"])),
                sample=beam.pvalue.AsSingleton(plan | "RecallSample" >> beam.Map(lambda pl: pl["sample"])))
            edge_parts.append(ivf["edges"])
            recall = [ivf["recall"]]
        edges = edge_parts | "FlattenEdges" >> beam.Flatten()
        recall = recall[0] if recall else batches.pipeline | "NoRecall" >> beam.Create([])

        hac = {"points": points, "edges": edges} | "Hac" >> HacRounds(
            eps, metric, self._unrolled_rounds, p["max_inmemory_edges"],
            beam.pvalue.AsSingleton(plan | "TieScale" >> beam.Map(lambda pl: pl["tie_scale"])))

        clusters = (
            (hac["assignments"] | "TagAssigned" >> beam.Map(lambda kv: (kv[0], ("assigned", kv[1]))),
             pieces.names | "TagNames" >> beam.Map(lambda kv: (kv[0], ("names", kv[1]))))
            | "FlattenOutput" >> beam.Flatten()
            | "GroupOutput" >> beam.GroupByKey()
            | "JoinExampleIds" >> beam.FlatMap(_join_names)
        )
        merges = (hac["merges"], merged.merges) | "FlattenMerges" >> beam.Flatten()
        rule, value = self._cut
        cuts = []
        if rule != "distance" or value < eps:
            cut = {"clusters": clusters, "merges": merges} | "Cut" >> CutHierarchy(rule, value, eps, "--max_distance")
            clusters = cut["clusters"]
            cuts = [cut["cut"]]
        cut_list = beam.pvalue.AsList(cuts[0] if cuts else batches.pipeline | "NoCut" >> beam.Create([]))
        rejected_counts = (
            valid.rejected
            | "RejectReasons" >> beam.FlatMap(lambda b: b.column(1).to_pylist())
            | "CountReasons" >> beam.combiners.Count.PerElement()
        )
        summary = (
            batches.pipeline
            | "SummarySeed" >> beam.Create([None])
            | "Summary" >> beam.Map(
                _summary, plan_si,
                beam.pvalue.AsList(hac["stats"]),
                beam.pvalue.AsList(hac["sizes"]),
                beam.pvalue.AsList(recall),
                beam.pvalue.AsList(checked),
                beam.pvalue.AsList(merged.folded),
                beam.pvalue.AsDict(rejected_counts),
                cut_list,
                self.params)
        )
        return {"clusters": clusters, "rejected": valid.rejected, "summary": summary,
                "merges": merges | "MergesToBatches" >> beam.Map(merges_to_batch),
                "state": hac["final_state"] | "StateToBatches" >> beam.Map(
                    lambda c: state_batch(c.labels, c.counts, c.sums, c.sq))}
