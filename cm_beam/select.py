"""Cluster-Margin batch selection as a Beam PTransform.

`SelectBatch` takes per-example uncertainty scores, cluster assignments and
exclusion lists (each a PCollection of `pa.RecordBatch`) and returns the next
labeling batch, exactly as Cluster-Margin defines it (DESIGN.md section 2):

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
the same inputs and seed give the same batch on any runner and number of workers.

Example:

    import apache_beam as beam
    from cm_beam import table_io
    from cm_beam.select import SelectBatch

    with beam.Pipeline() as p:
        scores = p | "Scores" >> table_io.ReadTableBlocks(score_files, ["example_id", "margin"])
        clusters = p | "Clusters" >> table_io.ReadTableBlocks(cluster_files, ["example_id", "cluster_id"])
        result = {"scores": scores, "clusters": clusters} | SelectBatch(
            batch_size=100_000, margin_pool_size=1_000_000, seed=7)
        result["selection"] | table_io.WriteTableBlocks(out + "/selection", SELECTION_SCHEMA)

Outputs (a dict): `selection` (record batches of SELECTION_SCHEMA: example_id,
cluster_id, margin, round, rank), `rejected` (example_id, reason: scores rows that
are not valid), `stats` (one dict of counts and the cluster-size histogram).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.pvalue import AsSingleton

from cm_beam import selection_kernels as sk
from cm_beam import select_impl as impl
from cm_beam import uncertainty as unc

SELECTION_SCHEMA = impl.SELECTION_SCHEMA
REJECTED_SCHEMA = impl.REJECTED_SCHEMA
STRATEGIES = impl.STRATEGIES

# Rows per key-range bucket of the round-robin layout: large enough that per-bucket
# overhead is negligible, small enough that one bucket is cheap on any worker.
ROWS_PER_SELECT_BUCKET = 50_000
MAX_BUCKETS = 1024
SAMPLE_PER_BUCKET = 64


def _count_rows(batch: pa.RecordBatch) -> Dict[str, int]:
    return {"rows": batch.num_rows}


def _selection_stats(batch: pa.RecordBatch) -> Dict[str, int]:
    rounds = batch.column(SELECTION_SCHEMA.get_field_index("round")).to_numpy()
    cluster = batch.column(SELECTION_SCHEMA.get_field_index("cluster_id")).to_numpy()
    return {"selected": batch.num_rows, "max_round": int(rounds.max()) if rounds.size else -1,
            "selected_unclustered": int((cluster < 0).sum())}


def _pool_stats(batch: pa.RecordBatch) -> Dict[str, int]:
    unclustered = batch.column(impl.ELIGIBLE_SCHEMA.get_field_index("unclustered")).to_numpy(zero_copy_only=False)
    return {"candidates": batch.num_rows, "candidates_unclustered": int(unclustered.sum())}


class _MergeStatsFn(impl.SumDictsFn):
    """Sums counts; keys starting with `max_` take the maximum instead."""

    def add_input(self, acc, item):
        for k, v in item.items():
            if k.startswith("max_"):
                acc[k] = max(acc.get(k, v), v)
            else:
                acc[k] = acc.get(k, 0) + v
        return acc


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
        margin_pool_factor: float = 10.0,
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
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if uncertainty not in unc.UNCERTAINTIES:
            raise ValueError(f"uncertainty must be one of {', '.join(unc.UNCERTAINTIES)}, got {uncertainty!r}")
        if multilabel_reduce not in ("min", "mean"):
            raise ValueError(f"multilabel_reduce must be 'min' or 'mean', got {multilabel_reduce!r}")
        if score_column is None and not num_classes:
            raise ValueError("num_classes is required when scores are computed from probs (score_column=None)")
        if margin_pool_size is None:
            if not margin_pool_factor >= 1.0:
                raise ValueError(f"margin_pool_factor must be >= 1, got {margin_pool_factor!r}")
            margin_pool_size = int(math.ceil(batch_size * margin_pool_factor))
        if margin_pool_size < batch_size:
            raise ValueError(f"margin_pool_size ({margin_pool_size}) must be >= batch_size ({batch_size})")
        if num_join_buckets <= 0:
            raise ValueError(f"num_join_buckets must be positive, got {num_join_buckets}")
        self.batch_size = int(batch_size)
        # Plain Margin and Random have no clusters: their margin pool is the batch.
        self.margin_pool_size = int(margin_pool_size) if strategy == "cluster_margin" else int(batch_size)
        self.strategy = strategy
        self.uncertainty = uncertainty
        self.score_column = score_column
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.multilabel_reduce = multilabel_reduce
        self.seed = int(seed)
        self.num_join_buckets = int(num_join_buckets)
        self.num_select_buckets = int(min(MAX_BUCKETS, max(1, math.ceil(self.margin_pool_size / ROWS_PER_SELECT_BUCKET))))

    def expand(self, inputs):
        scores = inputs["scores"]
        pipeline = scores.pipeline
        singletons = self.strategy != "cluster_margin"
        nj = self.num_join_buckets

        scored = scores | "Score" >> beam.ParDo(
            impl.ScoreBlockFn(self.uncertainty, self.score_column, self.multilabel, self.multilabel_reduce, self.num_classes)
        ).with_outputs(impl.ScoreBlockFn.REJECTED, main="scored")

        # Scores, clusters and exclusions meet in example_id-hash buckets.
        routed = [scored.scored | "RouteScores" >> beam.FlatMap(impl.route_by_id_hash, "scores", nj)]
        if inputs.get("clusters") is not None:
            # Margin and Random only report the cluster ids; Cluster-Margin selects by them.
            routed.append(inputs["clusters"] | "RouteClusters" >> beam.FlatMap(impl.route_by_id_hash, "clusters", nj))
        if inputs.get("exclude") is not None:
            routed.append(inputs["exclude"] | "RouteExclusions" >> beam.FlatMap(impl.route_by_id_hash, "exclude", nj))
        joined = (
            routed
            | "FlattenRouted" >> beam.Flatten()
            | "GroupById" >> beam.GroupByKey()
            | "Join" >> beam.ParDo(impl.JoinBucketFn(self.strategy, self.uncertainty, self.seed)).with_outputs(
                impl.JoinBucketFn.STATS, main="eligible")
        )
        eligible = joined.eligible

        # The margin-pool cut: radix selection of the k_m-th smallest order key.
        keys = eligible | "OrderKeys" >> beam.Map(impl.keys_of)
        state = pipeline | "RadixStart" >> beam.Create([sk.RadixState(k=self.margin_pool_size)])
        for level in range(sk.RADIX_LEVELS):
            hist = (
                keys
                | f"RadixHistogram{level}" >> beam.Map(lambda k, st: sk.radix_histogram(k, st), AsSingleton(state))
                | f"SumRadixHistogram{level}" >> beam.CombineGlobally(impl.SumArraysFn(sk.RADIX_BINS))
            )
            state = state | f"RadixStep{level}" >> beam.Map(lambda st, h: sk.radix_step(h, st), AsSingleton(hist))
        chosen_ties = (
            eligible
            | "TiesAtThreshold" >> beam.FlatMap(impl.ties_at_threshold, AsSingleton(state))
            | "CollectTies" >> beam.combiners.ToList()
            | "ChooseTies" >> beam.Map(impl.chosen_ties, AsSingleton(state))
        )
        margin_pool = eligible | "MarginPool" >> beam.FlatMap(
            impl.filter_margin_pool, AsSingleton(state), AsSingleton(chosen_ties))

        # The round-robin cut: layout in key-range buckets, then global ranks.
        sample_size = SAMPLE_PER_BUCKET * self.num_select_buckets
        splitters = (
            margin_pool
            | "SampleGroupKeys" >> beam.Map(impl.sample_group_keys, singletons, sample_size)
            | "BottomK" >> beam.CombineGlobally(impl.BottomKFn(sample_size))
            | "Splitters" >> beam.Map(sk.splitters_from_sample, self.num_select_buckets)
        )
        laid_out = (
            margin_pool
            | "RouteByGroupKey" >> beam.FlatMap(impl.route_by_group_key, AsSingleton(splitters), singletons)
            | "GroupByKeyRange" >> beam.GroupByKey()
            | "Layout" >> beam.ParDo(impl.LayoutBucketFn(singletons)).with_outputs(impl.LayoutBucketFn.SIZES, main="members")
        )
        offsets = (
            laid_out[impl.LayoutBucketFn.SIZES]
            | "CollectSizeCounts" >> beam.CombineGlobally(impl.ConcatTriplesFn())
            | "Offsets" >> beam.Map(lambda t: sk.BucketOffsets(*t))
        )
        selection = laid_out.members | "RankAndCut" >> beam.FlatMap(impl.rank_and_cut, AsSingleton(offsets), self.batch_size)

        stats = self._stats(pipeline, scores, scored, joined, margin_pool, offsets, selection)
        return {"selection": selection, "rejected": scored[impl.ScoreBlockFn.REJECTED], "stats": stats}

    def _stats(self, pipeline, scores, scored, joined, margin_pool, offsets, selection):
        def total(pcoll, fn, label):
            return pcoll | f"{label}Counts" >> beam.Map(fn) | f"{label}Sum" >> beam.CombineGlobally(_MergeStatsFn())

        read = total(scores, _count_rows, "Read")
        rejected = total(scored[impl.ScoreBlockFn.REJECTED], _count_rows, "Rejected")
        join = joined[impl.JoinBucketFn.STATS] | "JoinStatsSum" >> beam.CombineGlobally(_MergeStatsFn())
        pool = total(margin_pool, _pool_stats, "Pool")
        chosen = total(selection, _selection_stats, "Selected")
        params = {"batch_size": self.batch_size, "margin_pool_size": self.margin_pool_size, "strategy": self.strategy}

        def assemble(_, read, rejected, join, pool, chosen, offsets):
            hist = offsets.histogram
            selected = chosen.get("selected", 0)
            if hist.num_members != pool.get("candidates", 0):
                raise AssertionError(f"internal: {hist.num_members} laid out, {pool.get('candidates', 0)} in the margin pool")
            counts = {
                "pool": read.get("rows", 0),
                "rejected": rejected.get("rows", 0),
                "excluded": join.get("excluded", 0),
                "eligible": join.get("eligible", 0),
                "unclustered_eligible": join.get("unclustered_eligible", 0),
                "candidates": pool.get("candidates", 0),
                "candidates_unclustered": pool.get("candidates_unclustered", 0),
                "clusters_touched": hist.num_clusters if self.strategy == "cluster_margin" else None,
                "selected": selected,
                "selected_unclustered": chosen.get("selected_unclustered", 0),
                "unclustered": pool.get("candidates_unclustered", 0),
            }
            return {
                "counts": counts,
                "rounds": chosen.get("max_round", -1) + 1,
                "candidate_cluster_size_histogram": hist.as_dict() if self.strategy == "cluster_margin" else {},
                "batch_smaller_than_requested": selected < params["batch_size"],
                "effective": params,
            }

        return pipeline | "StatsSeed" >> beam.Create([None]) | "AssembleStats" >> beam.Map(
            assemble, AsSingleton(read), AsSingleton(rejected), AsSingleton(join), AsSingleton(pool),
            AsSingleton(chosen), AsSingleton(offsets))
