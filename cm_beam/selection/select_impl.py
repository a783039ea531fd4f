"""Implementation of the selection stage: the DoFns and CombineFns of `SelectBatch`.

Every element is an Arrow record batch (or a small numpy aggregate): rows travel in
blocks, and the two cuts of Cluster-Margin are computed from small aggregates (see
`cm_beam.selection.kernels`). The stages, in order:

1. `ScoreBlockFn`: the chosen uncertainty of each scores row (from a score column or
   from `probs`); invalid rows go to the rejected output with a reason.
2. `route_scores`, `route_by_id_hash` + `JoinBucketFn`: scores, clusters and
   exclusions meet in buckets of example_id hash; duplicates fail naming the id;
   excluded rows drop out; rows with no cluster become singletons. Scored rows that
   cannot reach the margin pool (their first key digit is above a bound from one
   summed histogram) travel as bare ids: checked and counted, never emitted. Emits
   the eligible rows with their uint64 order key and pick-order hash.
3. Radix selection of the k_m-th smallest order key (four 16-bit histogram passes)
   and a filter that keeps the margin pool M.
4. `route_by_group_key` + `LayoutBucketFn`: M in key ranges of cluster order key;
   each bucket lays out its clusters (member order, sizes, rank among same-size
   clusters) and reports (bucket, size, count) triples.
5. `rank_and_cut`: the global round-robin rank of each member from the triples, and
   the cut at k_t; the picks' clusters, passes and keys go to the batch diagnostics.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cm_beam.selection import kernels as sk
from cm_beam.selection import uncertainty as unc
from cm_beam.errors import InputError
from cm_beam.grouping import split_by_tag
from cm_beam.hashing import derive, id_hash
from cm_beam.selection.options import STRATEGIES

# Salts separate the independent uses of the seed (docs/design.md, "Determinism and
# hashing"): ties and picks are different seeded permutations; join buckets and
# synthetic ids do not depend on it.
TIE_SALT = 1
PICK_SALT = 2
JOIN_SALT = 3
UNCLUSTERED_SALT = 4

# What meets in a join bucket: scored rows, ids of rows pruned before the join
# (`route_scores`), cluster rows and exclusion rows.
JOIN_TAGS = ("scores", "pruned", "clusters", "exclude")


# `id_hash` is the unseeded hash of example_id, computed once and carried along:
# every seeded hash (join bucket, tie-break, pick order) is derived from it.
SCORED_SCHEMA = pa.schema([("example_id", pa.string()), ("score", pa.float32()), ("id_hash", pa.uint64())])
REJECTED_SCHEMA = pa.schema([("example_id", pa.string()), ("reason", pa.string())])
ELIGIBLE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("cluster_id", pa.int64()),
        ("score", pa.float32()),
        ("unclustered", pa.bool_()),
        ("key", pa.uint64()),
        ("pick", pa.uint64()),
    ]
)
MEMBER_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("cluster_id", pa.int64()),
        ("score", pa.float32()),
        ("round", pa.int64()),
        ("size", pa.int64()),
        ("rank_in_size", pa.int64()),
        ("bucket", pa.int64()),
        ("key", pa.uint64()),
    ]
)
SELECTION_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("cluster_id", pa.int64()),
        ("margin", pa.float32()),
        ("round", pa.int32()),
        ("rank", pa.int64()),
    ]
)


def concat_batches(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    """One record batch holding every row of `batches` (columns in `schema` order)."""
    batches = [b.select(schema.names) for b in batches if b.num_rows]
    if not batches:
        return empty_batch(schema)
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)


def unclustered_ids(base_hashes: np.ndarray) -> np.ndarray:
    """Synthetic cluster ids of examples with no cluster row: negative, one per example."""
    h = derive(base_hashes, 0, UNCLUSTERED_SALT) >> np.uint64(2)
    return -1 - h.astype(np.int64)


def priority_for(strategy: str, scores: np.ndarray, uncertainty: str) -> np.ndarray:
    """Random ignores the scores: every example gets the same priority, the hash decides."""
    if strategy == "random":
        return np.zeros(scores.shape[0], dtype=np.float32)
    return unc.priority(scores, uncertainty)


# ---------------------------------------------------------------------------
# 1. Scores
# ---------------------------------------------------------------------------
# Scored blocks smaller than this are merged within a bundle before they are routed:
# every block fans out to every join bucket, so a pool read in small blocks (say 64
# rows, one per inference batch) would cost (pool / 64) x buckets elements, which
# grows as the pool squared.
MIN_SCORED_BLOCK_ROWS = 65536


class ScoreBlockFn(beam.DoFn):
    """RecordBatch of scores rows -> RecordBatch(example_id, score); bad rows tagged 'rejected'.

    Scored blocks of fewer than `min_block_rows` rows are merged within the bundle
    (the rest is emitted when the bundle ends), so later stages see few large blocks
    whatever the size of the input blocks.
    """

    REJECTED = "rejected"
    STATS = "stats"

    def __init__(self, uncertainty: str, score_column: Optional[str], multilabel: bool = False,
                 multilabel_reduce: str = "min", num_classes: Optional[int] = None,
                 min_block_rows: Optional[int] = None):
        self._uncertainty = uncertainty
        self._score_column = score_column
        self._multilabel = multilabel
        self._reduce = multilabel_reduce
        self._num_classes = num_classes
        self._min_block_rows = MIN_SCORED_BLOCK_ROWS if min_block_rows is None else int(min_block_rows)
        self._pending: List[pa.RecordBatch] = []
        self._pending_rows = 0

    def start_bundle(self):
        self._pending, self._pending_rows = [], 0

    def _take_pending(self) -> pa.RecordBatch:
        merged = concat_batches(self._pending, SCORED_SCHEMA)
        self._pending, self._pending_rows = [], 0
        return merged

    def finish_bundle(self):
        if self._pending_rows:
            yield beam.transforms.window.GlobalWindows.windowed_value(self._take_pending())

    def process(self, batch: pa.RecordBatch):
        ids = batch.column(batch.schema.get_field_index("example_id"))
        n = batch.num_rows
        reasons = np.full(n, None, dtype=object)
        scores = np.full(n, np.nan)
        if self._score_column is not None:
            col = batch.column(batch.schema.get_field_index(self._score_column))
            missing = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
            values = pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            bad, why = unc.validate_scores(values, self._uncertainty)
            reasons[bad] = why[bad]
            reasons[missing] = f"{self._score_column} is null"
            scores = values
        else:
            probs_col = batch.column(batch.schema.get_field_index("probs"))
            lengths = pc.list_value_length(probs_col).fill_null(-1).to_numpy(zero_copy_only=False)
            expected = self._num_classes
            wrong = lengths != expected
            for i in np.flatnonzero(wrong):
                reasons[i] = "probs is null" if lengths[i] < 0 else f"probs has {lengths[i]} values, expected {expected}"
            ok = np.flatnonzero(~wrong)
            if ok.size:
                flat = pc.list_flatten(probs_col.take(pa.array(ok))).cast(pa.float64())
                probs = pc.fill_null(flat, np.nan).to_numpy(zero_copy_only=False).reshape(ok.size, expected)
                bad, why = unc.validate_probs(probs, multilabel=self._multilabel)
                reasons[ok[bad]] = why[bad]
                with np.errstate(invalid="ignore"):
                    scores[ok] = unc.score(probs, self._uncertainty, self._multilabel, self._reduce)
        rejected = np.array([r is not None for r in reasons], dtype=bool)
        yield beam.pvalue.TaggedOutput(self.STATS, {"pool": n, "rejected": int(rejected.sum())})
        if rejected.any():
            idx = pa.array(np.flatnonzero(rejected))
            yield beam.pvalue.TaggedOutput(
                self.REJECTED,
                pa.RecordBatch.from_arrays([ids.take(idx), pa.array(reasons[rejected].tolist(), pa.string())], schema=REJECTED_SCHEMA),
            )
        keep = np.flatnonzero(~rejected)
        if keep.size:
            kept = ids.take(pa.array(keep))
            scored = pa.RecordBatch.from_arrays(
                [kept, pa.array(scores[keep].astype(np.float32)), pa.array(id_hash(kept))], schema=SCORED_SCHEMA
            )
            if scored.num_rows >= self._min_block_rows:
                yield scored
                return
            self._pending.append(scored)
            self._pending_rows += scored.num_rows
            if self._pending_rows >= self._min_block_rows:
                yield self._take_pending()


# ---------------------------------------------------------------------------
# 2. Join of scores, clusters and exclusions in example_id-hash buckets
# ---------------------------------------------------------------------------
def split_by_bucket(batch: pa.RecordBatch, buckets: np.ndarray):
    """Yields (bucket, sub-batch) for each bucket present in `buckets` (one per row).

    Each sub-batch is its own `take`, not a slice of one reordered batch: pickling a
    slice writes the whole parent buffer (pyarrow 25), so with b buckets a block was
    encoded b times over and the shuffle grew as pool x buckets, i.e. quadratically
    (benchmarks/select_profile.py; results/select_profile.json).
    """
    if batch.num_rows == 0:
        return
    order = np.argsort(buckets, kind="stable")
    sorted_b = buckets[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_b[1:] != sorted_b[:-1]]))
    ends = np.concatenate([starts[1:], [sorted_b.size]])
    if starts.size == 1:
        yield int(sorted_b[0]), batch
        return
    for s, e in zip(starts, ends):
        yield int(sorted_b[s]), batch.take(pa.array(order[s:e]))


def join_buckets(base_hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """The join bucket of each row, from its unseeded example_id hash."""
    return (derive(base_hashes, 0, JOIN_SALT) % np.uint64(num_buckets)).astype(np.int64)


def route_by_id_hash(batch: pa.RecordBatch, tag: str, num_buckets: int):
    """Yields (bucket, (tag, sub-batch)): rows with the same example_id meet in one bucket."""
    if "id_hash" in batch.schema.names:
        base = batch.column(batch.schema.get_field_index("id_hash")).to_numpy()
    else:
        base = id_hash(batch.column(batch.schema.get_field_index("example_id")))
    for bucket, part in split_by_bucket(batch, join_buckets(base, num_buckets)):
        yield bucket, (tag, part)


def priority_histogram(batch: pa.RecordBatch, strategy: str, uncertainty: str) -> np.ndarray:
    """Counts of the first radix digit of each scored row's order key (for `route_scores`)."""
    score = batch.column(SCORED_SCHEMA.get_field_index("score")).to_numpy()
    digits = sk.priority_digit(priority_for(strategy, score, uncertainty))
    return np.bincount(digits, minlength=sk.RADIX_BINS).astype(np.int64)


def route_scores(batch: pa.RecordBatch, strategy: str, uncertainty: str, num_buckets: int, margin_pool_size: int,
                 first_digit_hist: Optional[np.ndarray], num_exclusions: int):
    """Routes scored rows to their join bucket; rows that cannot enter M go as bare ids.

    A row whose first key digit is above `sk.prune_digit` cannot be in the margin
    pool, so only its example_id travels on ("pruned"): the join still checks it for
    duplicates and counts it (excluded, eligible, unclustered), but the score, hash
    and every later stage skip it. On a 1M pool with k_m = 300K that is ~2/3 of the
    rows.
    """
    limit = sk.prune_digit(first_digit_hist, margin_pool_size + num_exclusions)
    if limit is not None and batch.num_rows:
        score = batch.column(SCORED_SCHEMA.get_field_index("score")).to_numpy()
        keep = sk.priority_digit(priority_for(strategy, score, uncertainty)) <= limit
        if not keep.all():
            dropped = batch.filter(pa.array(~keep))
            base = dropped.column(SCORED_SCHEMA.get_field_index("id_hash")).to_numpy()
            ids_only = pa.RecordBatch.from_arrays([dropped.column(0)], names=["example_id"])
            for bucket, part in split_by_bucket(ids_only, join_buckets(base, num_buckets)):
                yield bucket, ("pruned", part)
            batch = batch.filter(pa.array(keep))
    yield from route_by_id_hash(batch, "scores", num_buckets)


def _first_duplicate(ids: pa.Array) -> Optional[Tuple[str, int]]:
    counts = pc.value_counts(ids)
    if len(counts) == len(ids):
        return None
    values = counts.field("values")
    c = counts.field("counts").to_numpy()
    i = int(np.argmax(c))
    return values[i].as_py(), int(c[i])


class JoinBucketFn(beam.DoFn):
    """(bucket, [(tag, batch)]) -> eligible rows (ELIGIBLE_SCHEMA); counts tagged 'stats'."""

    STATS = "stats"

    def __init__(self, strategy: str, uncertainty: str, seed: int):
        self._strategy = strategy
        self._uncertainty = uncertainty
        self._seed = seed

    def process(self, element):
        _, tagged = element
        parts = dict(zip(JOIN_TAGS, split_by_tag(tagged, *JOIN_TAGS)))
        scores = concat_batches(parts["scores"], SCORED_SCHEMA)
        clusters = pa.Table.from_batches(parts["clusters"]) if parts["clusters"] else None
        ids = scores.column(0)
        # Rows pruned before the join (see `route_scores`) are checked and counted
        # with the rest; only the first len(ids) rows of `all_ids` can be emitted.
        all_ids = pa.concat_arrays([ids] + [b.column(0) for b in parts["pruned"]]) if parts["pruned"] else ids
        dup = _first_duplicate(all_ids)
        if dup:
            raise InputError(f"--scores: example_id {dup[0]!r} appears {dup[1]} times")
        n_all = len(all_ids)
        cluster_of = np.zeros(n_all, dtype=np.int64)
        has_cluster = np.zeros(n_all, dtype=bool)
        if clusters is not None and clusters.num_rows:
            cluster_ids_col = clusters.column("example_id").combine_chunks()
            dup = _first_duplicate(cluster_ids_col)
            if dup:
                raise InputError(f"--clusters: example_id {dup[0]!r} appears {dup[1]} times")
            cid = clusters.column("cluster_id").combine_chunks().cast(pa.int64())
            if cid.null_count:
                bad = pc.filter(cluster_ids_col, cid.is_null())[0].as_py()
                raise InputError(f"--clusters: example_id {bad!r} has a null cluster_id")
            cid = cid.to_numpy()
            if (cid < 0).any():
                bad = cluster_ids_col[int(np.flatnonzero(cid < 0)[0])].as_py()
                raise InputError(f"--clusters: example_id {bad!r} has a negative cluster_id (ids must be >= 0)")
            pos = pc.index_in(all_ids, value_set=cluster_ids_col)
            has_cluster = pos.is_valid().to_numpy(zero_copy_only=False)
            cluster_of[has_cluster] = cid[pc.drop_null(pos).to_numpy()]
        excluded = np.zeros(n_all, dtype=bool)
        if parts["exclude"]:
            excl = pa.concat_arrays([b.column(b.schema.get_field_index("example_id")) for b in parts["exclude"]])
            excluded = pc.is_in(all_ids, value_set=excl).to_numpy(zero_copy_only=False)
        stats = {
            "pool_valid": n_all,
            "excluded": int(excluded.sum()),
            "eligible": int((~excluded).sum()),
            "unclustered_eligible": int((~excluded & ~has_cluster).sum()),
            "pruned_before_join": n_all - len(ids),
        }
        n = len(ids)
        excluded, has_cluster, cluster_of = excluded[:n], has_cluster[:n], cluster_of[:n]
        keep = np.flatnonzero(~excluded)
        kept_ids = ids.take(pa.array(keep))
        score = scores.column(1).to_numpy()[keep]
        base = scores.column(2).to_numpy()[keep]
        unclustered = ~has_cluster[keep]
        cluster = cluster_of[keep]
        if unclustered.any():
            cluster[unclustered] = unclustered_ids(base[unclustered])
        tie = derive(base, self._seed, TIE_SALT)
        key = sk.order_key(priority_for(self._strategy, score, self._uncertainty), tie)
        pick = derive(base, self._seed, PICK_SALT)
        yield beam.pvalue.TaggedOutput(self.STATS, stats)
        if keep.size:
            yield pa.RecordBatch.from_arrays(
                [kept_ids, pa.array(cluster), pa.array(score.astype(np.float32)), pa.array(unclustered),
                 pa.array(key), pa.array(pick)],
                schema=ELIGIBLE_SCHEMA,
            )


class SumDictsFn(beam.CombineFn):
    """Sums dicts of counts key by key."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, item):
        for k, v in item.items():
            acc[k] = acc.get(k, 0) + v
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


class SumArraysFn(beam.CombineFn):
    """Sums equal-length int64 arrays (radix histograms)."""

    def __init__(self, length: int):
        self._length = length

    def create_accumulator(self):
        return np.zeros(self._length, dtype=np.int64)

    def add_input(self, acc, item):
        acc += item
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out += a
        return out

    def extract_output(self, acc):
        return acc


# ---------------------------------------------------------------------------
# 3. The margin-pool cut
# ---------------------------------------------------------------------------
def keys_of(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column(ELIGIBLE_SCHEMA.get_field_index("key")).to_numpy()


def radix_histogram_at(keys: np.ndarray, k: int, *histograms) -> np.ndarray:
    """The next level's histogram, given the summed histograms of the levels before."""
    return sk.radix_histogram(keys, sk.radix_state(k, histograms))


def at_or_below_threshold(batch: pa.RecordBatch, k: int, *histograms):
    """Rows whose key is <= the k_m-th smallest: M plus any rows tied with its last one."""
    state = sk.radix_state(k, histograms)
    if state.exhausted:
        yield batch
        return
    mask = keys_of(batch) <= np.uint64(state.prefix)
    if mask.all():
        yield batch
    elif mask.any():
        yield batch.filter(pa.array(mask))


def ties_at_threshold(batch: pa.RecordBatch, k: int, *histograms):
    """The example_ids whose key equals the threshold (only when the cut falls inside a tie)."""
    state = sk.radix_state(k, histograms)
    if state.exhausted:
        return
    mask = keys_of(batch) == np.uint64(state.prefix)
    if mask.any():
        yield from batch.column(0).filter(pa.array(mask)).to_pylist()


def chosen_ties(tied_ids: List[str], k: int, *histograms) -> List[str]:
    """Of the rows tied at the threshold key, the `state.k` smallest example_ids."""
    state = sk.radix_state(k, histograms)
    if state.exhausted:
        return []
    return sorted(tied_ids)[: state.k]


def drop_unchosen_ties(batch: pa.RecordBatch, tie_ids: List[str], k: int, *histograms):
    """M: rows below the threshold key, and the chosen ones at it."""
    state = sk.radix_state(k, histograms)
    if state.exhausted:
        yield batch
        return
    keys = keys_of(batch)
    threshold = np.uint64(state.prefix)
    at = keys == threshold
    if not at.any():
        yield batch
        return
    chosen = pc.is_in(batch.column(0), value_set=pa.array(tie_ids, pa.string())).to_numpy(zero_copy_only=False)
    mask = (keys < threshold) | (at & chosen)
    if mask.all():
        yield batch
    elif mask.any():
        yield batch.filter(pa.array(mask))


# ---------------------------------------------------------------------------
# 4. Layout of the round robin in key-range buckets
# ---------------------------------------------------------------------------
def group_keys(batch: pa.RecordBatch, singletons: bool) -> np.ndarray:
    if singletons:
        return keys_of(batch)
    return sk.int64_order_key(batch.column(ELIGIBLE_SCHEMA.get_field_index("cluster_id")).to_numpy())


def sample_group_keys(batch: pa.RecordBatch, singletons: bool, k: int):
    pick = batch.column(ELIGIBLE_SCHEMA.get_field_index("pick")).to_numpy()
    return sk.bottom_k(pick, group_keys(batch, singletons), k)


class BottomKFn(beam.CombineFn):
    """Keeps the k (hash, value) pairs with the smallest hashes: a deterministic sample."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return (np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    def add_input(self, acc, item):
        return self.merge_accumulators([acc, item])

    def merge_accumulators(self, accs):
        accs = list(accs)
        h = np.concatenate([a[0] for a in accs])
        v = np.concatenate([a[1] for a in accs]).astype(np.uint64)
        return sk.bottom_k(h, v, self._k)

    def extract_output(self, acc):
        return acc[1]


def route_by_group_key(batch: pa.RecordBatch, splitters: np.ndarray, singletons: bool):
    yield from split_by_bucket(batch, sk.bucket_of(group_keys(batch, singletons), splitters))


class LayoutBucketFn(beam.DoFn):
    """(bucket, [eligible batches]) -> member rows (MEMBER_SCHEMA); (bucket, sizes, counts) tagged 'sizes'."""

    SIZES = "sizes"

    def __init__(self, singletons: bool):
        self._singletons = singletons

    def process(self, element):
        bucket, batches = element
        rows = concat_batches(batches, ELIGIBLE_SCHEMA)
        if rows.num_rows == 0:
            return
        ids = rows.column(0)
        id_rank = np.empty(rows.num_rows, dtype=np.int64)
        id_rank[pc.sort_indices(ids).to_numpy()] = np.arange(rows.num_rows)
        layout = sk.local_round_robin_layout(
            group_keys(rows, self._singletons),
            rows.column(ELIGIBLE_SCHEMA.get_field_index("pick")).to_numpy(),
            id_rank,
            self._singletons,
        )
        ordered = rows.take(pa.array(layout.order))
        n = rows.num_rows
        yield beam.pvalue.TaggedOutput(self.SIZES, (bucket, layout.size_counts[0], layout.size_counts[1]))
        yield pa.RecordBatch.from_arrays(
            [
                ordered.column(0),
                ordered.column(ELIGIBLE_SCHEMA.get_field_index("cluster_id")),
                ordered.column(ELIGIBLE_SCHEMA.get_field_index("score")),
                pa.array(layout.member_index),
                pa.array(layout.group_size),
                pa.array(layout.rank_in_size),
                pa.array(np.full(n, bucket, dtype=np.int64)),
                ordered.column(ELIGIBLE_SCHEMA.get_field_index("key")),
            ],
            schema=MEMBER_SCHEMA,
        )


class ConcatTriplesFn(beam.CombineFn):
    """Collects (bucket, sizes, counts) triples into three flat arrays."""

    def create_accumulator(self):
        return ([], [], [])

    def add_input(self, acc, item):
        bucket, sizes, counts = item
        acc[0].append(np.full(len(sizes), bucket, dtype=np.int64))
        acc[1].append(np.asarray(sizes, dtype=np.int64))
        acc[2].append(np.asarray(counts, dtype=np.int64))
        return acc

    def merge_accumulators(self, accs):
        out = ([], [], [])
        for acc in accs:
            for i in range(3):
                out[i].extend(acc[i])
        return out

    def extract_output(self, acc):
        return tuple(np.concatenate(a) if a else np.zeros(0, np.int64) for a in acc)


# ---------------------------------------------------------------------------
# 5. Global ranks and the cut at k_t
# ---------------------------------------------------------------------------
PICKS = "picks"


def rank_and_cut(members: pa.RecordBatch, offsets: sk.BucketOffsets, batch_size: int):
    """Member rows -> selected rows (SELECTION_SCHEMA) with their round and rank.

    Also emits, tagged PICKS, the picks' (cluster_id, round, cluster size within M,
    order key) for the batch diagnostics: k_t rows in all, gathered on one worker.
    """
    if members.num_rows == 0:
        return
    col = lambda name: members.column(MEMBER_SCHEMA.get_field_index(name)).to_numpy()
    bucket = int(col("bucket")[0])
    size, j = col("size"), col("round")
    g = offsets.offset(bucket, size) + col("rank_in_size")
    rank = sk.selection_rank(j, g, offsets.histogram)
    keep = np.flatnonzero(rank < batch_size)
    if keep.size == 0:
        return
    idx = pa.array(keep)
    yield beam.pvalue.TaggedOutput(PICKS, sk.PickArrays(
        cluster=col("cluster_id")[keep], round=j[keep], size=size[keep], key=col("key")[keep]))
    yield pa.RecordBatch.from_arrays(
        [
            members.column(0).take(idx),
            members.column(1).take(idx),
            members.column(2).take(idx),
            pa.array(j[keep].astype(np.int32)),
            pa.array(rank[keep].astype(np.int64)),
        ],
        schema=SELECTION_SCHEMA,
    )


class ConcatPicksFn(beam.CombineFn):
    """Concatenates the PickArrays of every bucket (k_t rows in all)."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, item):
        acc.append(item)
        return acc

    def merge_accumulators(self, accs):
        return [p for acc in accs for p in acc]

    def extract_output(self, acc):
        return sk.PickArrays.concat(acc)


def keys_below(batch: pa.RecordBatch, thresholds: Optional[np.ndarray]) -> np.ndarray:
    """For each threshold key, how many of the batch's rows have a smaller order key."""
    if thresholds is None or len(thresholds) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.sort(keys_of(batch))
    return np.searchsorted(keys, np.asarray(thresholds, dtype=np.uint64), side="left").astype(np.int64)
