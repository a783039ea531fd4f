"""Cluster-Margin batch selection as a Beam PTransform.

`SelectBatch` takes per-example uncertainty scores, cluster assignments and
exclusion lists (each a PCollection of `pa.RecordBatch`) and returns the next
labeling batch, exactly as Cluster-Margin defines it (docs/design.md, "The margin
pool" and "Cluster-Margin round robin"):

1. M = the `margin_pool_size` (k_m) most uncertain examples that are not excluded;
   ties in the score are broken by a seeded hash of example_id (its upper 32 bits),
   then by example_id, so the result is deterministic.
2. The clusters restricted to M are sorted by ascending size within M, ties by
   cluster_id. Examples with no cluster row are singleton clusters (with a negative
   synthetic cluster_id) and are counted as unclustered.
3. Round-robin passes visit the clusters in that order and take one member of each
   (a seeded uniformly random permutation of the members) until `batch_size` (k_t).

Strategies: `cluster_margin` (the above), `margin` (the k_t most uncertain, in order
of uncertainty) and `random` (k_t uniformly random eligible examples). Both cuts are
computed from small aggregates (radix histograms of order keys; counts of clusters
per size and key-range bucket), so no stage gathers the candidates on one worker;
rows that cannot reach the margin pool are pruned before the join (only their ids
are checked and counted), so the later stages see about k_m rows, not the pool;
the same inputs and seed give the same batch on any runner and number of workers.

Example:

    import apache_beam as beam
    from cm_beam.io import table_io
    from cm_beam.selection.select_batch import SelectBatch

    with beam.Pipeline() as p:
        scores = p | "Scores" >> table_io.ReadTableBlocks(score_files, ["example_id", "margin"])
        clusters = p | "Clusters" >> table_io.ReadTableBlocks(cluster_files, ["example_id", "cluster_id"])
        result = {"scores": scores, "clusters": clusters} | SelectBatch(
            batch_size=100_000, margin_pool_size=1_000_000, seed=7)
        result["selection"] | table_io.WriteTableBlocks(out + "/selection", SELECTION_SCHEMA)

Outputs (a dict): `selection` (record batches of SELECTION_SCHEMA: example_id,
cluster_id, margin, round, rank), `rejected` (example_id, reason: scores rows that
are not valid), `stats` (one dict of counts, the cluster-size histogram and the
batch diagnostics of `selection_kernels.batch_diagnostics`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.pvalue import AsSingleton

from cm_beam.errors import InputError
from cm_beam.selection import kernels as sk
from cm_beam.selection import select_impl as impl
from cm_beam.selection.options import DEFAULT_MARGIN_POOL_FACTOR, SelectOptions, check_selection

SELECTION_SCHEMA = impl.SELECTION_SCHEMA
REJECTED_SCHEMA = impl.REJECTED_SCHEMA
STRATEGIES = impl.STRATEGIES

# Rows per key-range bucket of the round-robin layout: large enough that per-bucket
# overhead is negligible, small enough that one bucket is cheap on any worker.
ROWS_PER_SELECT_BUCKET = 50_000
MAX_BUCKETS = 1024
SAMPLE_PER_BUCKET = 64


def _selection_stats(batch: pa.RecordBatch) -> Dict[str, int]:
    rounds = batch.column(SELECTION_SCHEMA.get_field_index("round")).to_numpy()
    cluster = batch.column(SELECTION_SCHEMA.get_field_index("cluster_id")).to_numpy()
    return {"selected": batch.num_rows, "max_round": int(rounds.max()) if rounds.size else -1,
            "selected_unclustered": int((cluster < 0).sum())}


def _pool_stats(batch: pa.RecordBatch) -> Dict[str, int]:
    unclustered = batch.column(impl.ELIGIBLE_SCHEMA.get_field_index("unclustered")).to_numpy(zero_copy_only=False)
    return {"candidates": batch.num_rows, "candidates_unclustered": int(unclustered.sum())}


# Global combines run `without_defaults` (a default costs a stage of its own), so
# their side inputs carry the value an empty input would have produced instead.
# (Beam compares defaults with `!=`, so numpy arrays cannot be defaults: None stands
# for an all-zero histogram and for "no splitters".)
_EMPTY_HIST = None
_NO_SPLITTERS = None
_NO_OFFSETS = sk.BucketOffsets(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def _singletons(pcolls, default):
    return [AsSingleton(p, default_value=default) for p in pcolls]


class _MergeStatsFn(impl.SumDictsFn):
    """Sums counts; keys starting with `max_` take the maximum instead."""

    def add_input(self, acc, item):
        for k, v in item.items():
            if k.startswith("max_"):
                acc[k] = max(acc.get(k, v), v)
            else:
                acc[k] = acc.get(k, 0) + v
        return acc


class _SumShortArraysFn(beam.CombineFn):
    """Sums equal-length int64 arrays whose length is known only at run time."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, item):
        return item.copy() if acc is None else acc + item

    def merge_accumulators(self, accs):
        out = None
        for a in accs:
            if a is not None:
                out = self.add_input(out, a)
        return out

    def extract_output(self, acc):
        return acc


class _JoinById(beam.PTransform):
    """Scored rows, clusters and exclusions meet in example_id-hash buckets -> the
    eligible rows (scored, not excluded, with their cluster) and the join's counts.

    Input: a dict with `scored` and optionally `clusters` and `exclude`. Scored rows
    whose first key digit shows they cannot reach the margin pool go as bare ids
    (one summed histogram bounds the cut; each exclusion row may remove one row of
    the pool, so the bound counts k_m + #exclusion rows). Random has one priority
    for all rows: nothing to prune.
    """

    def __init__(self, strategy: str, uncertainty: str, seed: int, num_join_buckets: int, margin_pool_size: int):
        super().__init__()
        self._strategy, self._uncertainty, self._seed = strategy, uncertainty, seed
        self._buckets, self._k_m = num_join_buckets, margin_pool_size

    def expand(self, inputs):
        scored, nj = inputs["scored"], self._buckets
        if self._strategy == "random":
            routed = [scored | "RouteScores" >> beam.FlatMap(impl.route_by_id_hash, "scores", nj)]
        else:
            first_digits = (
                scored
                | "FirstDigitHistogram" >> beam.Map(impl.priority_histogram, self._strategy, self._uncertainty)
                | "SumFirstDigitHistogram" >> beam.CombineGlobally(impl.SumArraysFn(sk.RADIX_BINS)).without_defaults()
            )
            num_exclusions = 0
            if "exclude" in inputs:
                num_exclusions = AsSingleton(
                    inputs["exclude"]
                    | "CountExclusionRows" >> beam.Map(lambda b: b.num_rows)
                    | "SumExclusionRows" >> beam.CombineGlobally(sum).without_defaults(),
                    default_value=0)
            routed = [scored | "RouteScores" >> beam.FlatMap(
                impl.route_scores, self._strategy, self._uncertainty, nj, self._k_m,
                AsSingleton(first_digits, default_value=_EMPTY_HIST), num_exclusions)]
        if "clusters" in inputs:
            # Margin and Random only report the cluster ids; Cluster-Margin selects by them.
            routed.append(inputs["clusters"] | "RouteClusters" >> beam.FlatMap(impl.route_by_id_hash, "clusters", nj))
        if "exclude" in inputs:
            routed.append(inputs["exclude"] | "RouteExclusions" >> beam.FlatMap(impl.route_by_id_hash, "exclude", nj))
        joined = (
            routed
            | "FlattenRouted" >> beam.Flatten()
            | "GroupById" >> beam.GroupByKey()
            | "Join" >> beam.ParDo(impl.JoinBucketFn(self._strategy, self._uncertainty, self._seed)).with_outputs(
                impl.JoinBucketFn.STATS, main="eligible")
        )
        return {"eligible": joined.eligible, "stats": joined[impl.JoinBucketFn.STATS]}


class _MarginPoolCut(beam.PTransform):
    """Eligible rows -> the margin pool M: the k_m smallest order keys.

    Radix selection of the k_m-th smallest key: each level's histogram is summed
    across workers; the state (the threshold's high digits) is refolded from the
    histograms wherever it is needed, which costs microseconds and saves a stage per
    level. Rows tied with the last key (rare: same score and same 32-bit hash) are
    settled by example_id on that small superset, not on the pool.
    """

    def __init__(self, margin_pool_size: int):
        super().__init__()
        self._k_m = margin_pool_size

    def expand(self, eligible):
        k_m = self._k_m
        keys = eligible | "OrderKeys" >> beam.Map(impl.keys_of)
        hists = []
        for level in range(sk.RADIX_LEVELS):
            hist = (
                keys
                | f"RadixHistogram{level}" >> beam.Map(impl.radix_histogram_at, k_m, *_singletons(hists, _EMPTY_HIST))
                | f"SumRadixHistogram{level}" >> beam.CombineGlobally(impl.SumArraysFn(sk.RADIX_BINS)).without_defaults()
            )
            hists.append(hist)
        radix = _singletons(hists, _EMPTY_HIST)
        at_or_below = eligible | "AtOrBelowThreshold" >> beam.FlatMap(impl.at_or_below_threshold, k_m, *radix)
        chosen_ties = (
            at_or_below
            | "TiesAtThreshold" >> beam.FlatMap(impl.ties_at_threshold, k_m, *radix)
            | "CollectTies" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
            | "ChooseTies" >> beam.Map(impl.chosen_ties, k_m, *radix)
        )
        return at_or_below | "MarginPool" >> beam.FlatMap(
            impl.drop_unchosen_ties, AsSingleton(chosen_ties, default_value=[]), k_m, *radix)


class _RoundRobinCut(beam.PTransform):
    """The margin pool -> the batch: the rows laid out in key-range buckets by (round,
    position in round), then ranked globally and cut at k_t.

    Output: a dict with `selection` (record batches of SELECTION_SCHEMA), `picks` (the
    picks' keys, gathered on one worker: k_t rows) and `offsets` (the buckets'
    offsets and the cluster-size histogram of M).
    """

    def __init__(self, singletons: bool, num_select_buckets: int, batch_size: int):
        super().__init__()
        self._singletons, self._buckets, self._k_t = singletons, num_select_buckets, batch_size

    def expand(self, margin_pool):
        sample_size = SAMPLE_PER_BUCKET * self._buckets
        splitters = (
            margin_pool
            | "SampleGroupKeys" >> beam.Map(impl.sample_group_keys, self._singletons, sample_size)
            | "BottomK" >> beam.CombineGlobally(impl.BottomKFn(sample_size)).without_defaults()
            | "Splitters" >> beam.Map(sk.splitters_from_sample, self._buckets)
        )
        laid_out = (
            margin_pool
            | "RouteByGroupKey" >> beam.FlatMap(
                impl.route_by_group_key, AsSingleton(splitters, default_value=_NO_SPLITTERS), self._singletons)
            | "GroupByKeyRange" >> beam.GroupByKey()
            | "Layout" >> beam.ParDo(impl.LayoutBucketFn(self._singletons)).with_outputs(
                impl.LayoutBucketFn.SIZES, main="members")
        )
        offsets = (
            laid_out[impl.LayoutBucketFn.SIZES]
            | "CollectSizeCounts" >> beam.CombineGlobally(impl.ConcatTriplesFn()).without_defaults()
            | "Offsets" >> beam.Map(lambda t: sk.BucketOffsets(*t))
        )
        cut = laid_out.members | "RankAndCut" >> beam.FlatMap(
            impl.rank_and_cut, AsSingleton(offsets, default_value=_NO_OFFSETS), self._k_t
        ).with_outputs(impl.PICKS, main="selection")
        picks = cut[impl.PICKS] | "CollectPicks" >> beam.CombineGlobally(impl.ConcatPicksFn()).without_defaults()
        return {"selection": cut.selection, "picks": picks, "offsets": offsets}


class _KeysBelowMedianPick(beam.PTransform):
    """For the batch diagnostics: how many keys of the margin pool lie below the picks'
    median key(s) (one or two), i.e. the picks' median uncertainty rank; every key
    smaller than a pick's is in M, so M is enough."""

    def expand(self, inputs):
        median_keys = inputs["picks"] | "MedianPickKeys" >> beam.Map(lambda p: sk.median_keys(p.key))
        return (
            inputs["margin_pool"]
            | "KeysBelowMedian" >> beam.Map(impl.keys_below, AsSingleton(median_keys, default_value=None))
            | "SumKeysBelowMedian" >> beam.CombineGlobally(_SumShortArraysFn()).without_defaults()
        )


class SelectBatch(beam.PTransform):
    """Selects a labeling batch by Cluster-Margin (or Margin, or Random).

    Input: a dict with `scores` (record batches with `example_id` and either the
    score column or `probs`), and optionally `clusters` (`example_id`, `cluster_id`)
    and `exclude` (`example_id`). Output: a dict with `selection`, `rejected` and
    `stats` (see the module docstring).
    """

    def __init__(
        self,
        batch_size: int,
        margin_pool_size: Optional[int] = None,
        margin_pool_factor: float = DEFAULT_MARGIN_POOL_FACTOR,
        strategy: str = "cluster_margin",
        uncertainty: str = "margin",
        score_column: Optional[str] = "margin",
        num_classes: Optional[int] = None,
        multilabel: bool = False,
        multilabel_reduce: str = "min",
        seed: int = 0,
        num_join_buckets: int = 16,
    ):
        super().__init__()
        k_m = check_selection(batch_size, strategy, uncertainty, multilabel_reduce, margin_pool_size, margin_pool_factor)
        if score_column is None and not num_classes:
            raise InputError.bad_parameter(
                "num_classes", "is required when scores are computed from probs (score_column=None)")
        if num_join_buckets <= 0:
            raise InputError.bad_parameter("num_join_buckets", f"must be positive, got {num_join_buckets}")
        self.batch_size = int(batch_size)
        # Plain Margin and Random have no clusters: their margin pool is the batch.
        self.margin_pool_size = k_m
        self.strategy = strategy
        self.uncertainty = uncertainty
        self.score_column = score_column
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.multilabel_reduce = multilabel_reduce
        self.seed = int(seed)
        self.num_join_buckets = int(num_join_buckets)
        self.num_select_buckets = int(min(MAX_BUCKETS, max(1, math.ceil(self.margin_pool_size / ROWS_PER_SELECT_BUCKET))))

    @classmethod
    def from_options(cls, options: SelectOptions, score_column: Optional[str] = "margin",
                     num_classes: Optional[int] = None, num_join_buckets: int = 16) -> "SelectBatch":
        """The transform for `options`; the other arguments describe the inputs (which
        column holds the scores, how many classes `probs` has) and the join's width."""
        return cls(
            batch_size=options.batch_size,
            margin_pool_size=options.margin_pool_size,
            margin_pool_factor=(options.margin_pool_factor if options.margin_pool_factor is not None
                                else DEFAULT_MARGIN_POOL_FACTOR),
            strategy=options.strategy,
            uncertainty=options.uncertainty,
            score_column=score_column,
            num_classes=num_classes,
            multilabel=options.multilabel,
            multilabel_reduce=options.multilabel_reduce,
            seed=options.seed,
            num_join_buckets=num_join_buckets,
        )

    def expand(self, inputs):
        scores = inputs["scores"]
        scored = scores | "Score" >> beam.ParDo(
            impl.ScoreBlockFn(self.uncertainty, self.score_column, self.multilabel, self.multilabel_reduce, self.num_classes)
        ).with_outputs(impl.ScoreBlockFn.REJECTED, impl.ScoreBlockFn.STATS, main="scored")
        joined = {"scored": scored.scored, **{k: inputs[k] for k in ("clusters", "exclude") if inputs.get(k) is not None}} \
            | "JoinById" >> _JoinById(self.strategy, self.uncertainty, self.seed, self.num_join_buckets,
                                      self.margin_pool_size)
        margin_pool = joined["eligible"] | "MarginPoolCut" >> _MarginPoolCut(self.margin_pool_size)
        cut = margin_pool | "RoundRobinCut" >> _RoundRobinCut(
            self.strategy != "cluster_margin", self.num_select_buckets, self.batch_size)
        below_median = {"margin_pool": margin_pool, "picks": cut["picks"]} | "KeysBelowMedianPick" >> _KeysBelowMedianPick()

        # One dict of counts from every stage, merged in a single combine.
        counts = (
            (
                scored[impl.ScoreBlockFn.STATS],
                joined["stats"],
                margin_pool | "PoolCounts" >> beam.Map(_pool_stats),
                cut["selection"] | "SelectedCounts" >> beam.Map(_selection_stats),
            )
            | "FlattenCounts" >> beam.Flatten()
            | "MergeCounts" >> beam.CombineGlobally(_MergeStatsFn()).without_defaults()
        )
        stats = scores.pipeline | "StatsSeed" >> beam.Create([None]) | "AssembleStats" >> beam.Map(
            self._assemble_stats, AsSingleton(counts, default_value={}),
            AsSingleton(cut["offsets"], default_value=_NO_OFFSETS), AsSingleton(cut["picks"], default_value=None),
            AsSingleton(below_median, default_value=None))
        return {"selection": cut["selection"], "rejected": scored[impl.ScoreBlockFn.REJECTED], "stats": stats}

    def _assemble_stats(self, _, merged: Dict[str, int], offsets: sk.BucketOffsets,
                        picks: Optional[sk.PickArrays], below_median: Optional[np.ndarray]) -> Dict:
        hist = offsets.histogram
        candidates = merged.get("candidates", 0)
        if hist.num_members != candidates:
            raise AssertionError(f"internal: {hist.num_members} rows laid out, {candidates} in the margin pool")
        selected = merged.get("selected", 0)
        cluster_margin = self.strategy == "cluster_margin"
        counts = {
            "pool": merged.get("pool", 0),
            "rejected": merged.get("rejected", 0),
            "excluded": merged.get("excluded", 0),
            "eligible": merged.get("eligible", 0),
            "unclustered_eligible": merged.get("unclustered_eligible", 0),
            # Scored rows that could not reach the margin pool, dropped after the join's
            # checks and counts (diagnostic: how much work the bound saved).
            "pruned_before_join": merged.get("pruned_before_join", 0),
            "candidates": candidates,
            "candidates_unclustered": merged.get("candidates_unclustered", 0),
            "clusters_touched": hist.num_clusters if cluster_margin else None,
            "selected": selected,
            "selected_unclustered": merged.get("selected_unclustered", 0),
            "unclustered": merged.get("candidates_unclustered", 0),
        }
        return {
            "counts": counts,
            "rounds": merged.get("max_round", -1) + 1,
            "candidate_cluster_size_histogram": hist.as_dict() if cluster_margin else {},
            "batch_smaller_than_requested": selected < self.batch_size,
            "batch_diagnostics": self._diagnostics(picks, below_median),
        }

    def _diagnostics(self, picks: Optional[sk.PickArrays], below_median: Optional[np.ndarray]) -> Dict:
        picks = picks if picks is not None else sk.PickArrays.concat([])
        # Random's order key is a hash, not an uncertainty: it has no uncertainty rank.
        if self.strategy == "random":
            below_median = None
        elif below_median is None:  # an empty margin pool: no key is below anything
            below_median = np.zeros(len(sk.median_keys(picks.key)), np.int64)
        diag = sk.batch_diagnostics(picks, below_median, self.strategy == "cluster_margin")
        diag["margin_pool_size"] = self.margin_pool_size
        return diag
