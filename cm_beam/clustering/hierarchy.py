"""CutHierarchy: flat clusters of a recorded merge hierarchy at another cut, on Beam.

cm-cluster writes `merges-*.parquet` (every merge: `cluster_a`, `cluster_b`, `merged`,
`height`, `size`, `round`; semantics in `hierarchy_kernels`) beside `clusters-*.parquet`
(which carries each example's `leaf_id`). Average linkage is reducible, so the flat
clusters at any eps' <= the eps the hierarchy was built to are the subtrees whose merges
are all <= eps': one clustering serves every finer cut, without reclustering.

    cut = {"clusters": leaf_batches, "merges": merge_blocks} | CutHierarchy("num_clusters", 500, 0.4)
    cut["clusters"]  # pa.RecordBatch: example_id, cluster_id, cluster_size, leaf_id
    cut["cut"]       # one dict: rule, requested, distance_threshold, num_clusters, mean_cluster_size, ...

Stages: the merges are gathered on one worker (a bounded in-memory step: about 60 bytes
per merge, n - 1 merges at most), which picks the cut from their sorted heights and
resolves the applied merges into a relabelling table (24 bytes per id in an applied
merge); the table is a side input of a per-block relabelling of the leaves, which
stay distributed.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa

from cm_beam.clustering import hierarchy_kernels as hik
from cm_beam.errors import check_choice

MERGES_SCHEMA = pa.schema([("cluster_a", pa.int64()), ("cluster_b", pa.int64()), ("merged", pa.int64()),
                           ("height", pa.float64()), ("size", pa.int64()), ("round", pa.int32())])
CUT_CLUSTERS_SCHEMA = pa.schema([("example_id", pa.string()), ("cluster_id", pa.int64()),
                                 ("cluster_size", pa.int64()), ("leaf_id", pa.int64())])


def merges_to_batch(m: hik.Merges) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(m.a, pa.int64()), pa.array(m.b, pa.int64()), pa.array(m.a, pa.int64()),
         pa.array(m.height, pa.float64()), pa.array(m.size, pa.int64()), pa.array(m.round, pa.int32())],
        schema=MERGES_SCHEMA)


def batch_to_merges(batch) -> hik.Merges:
    col = lambda name: batch.column(batch.schema.get_field_index(name)).to_numpy(zero_copy_only=False)
    m = hik.Merges(col("cluster_a").astype(np.int64), col("cluster_b").astype(np.int64),
                   col("height").astype(np.float64), col("size").astype(np.int64), col("round").astype(np.int32))
    if (m.a >= m.b).any() or (col("merged") != m.a).any():
        raise ValueError("merges: every row must have cluster_a < cluster_b and merged == cluster_a")
    return m


class _ConcatMerges(beam.CombineFn):
    def create_accumulator(self):
        return []

    def add_input(self, acc, m):
        acc.append(m)
        return acc

    def merge_accumulators(self, accs):
        return [hik.Merges.concat([m for a in accs for m in a])]

    def extract_output(self, acc):
        return hik.Merges.concat(acc)


def plan_cut(m: hik.Merges, n: int, rule: str, value: float, max_eps: float, max_flag: str):
    """{"table": CutTable, "summary": cut record}: the cut of the whole hierarchy."""
    md = hik.monotone_heights(m)
    eps, applied = hik.choose_cut(np.sort(md), n, rule, value, max_eps, max_flag)
    table = hik.cut_table(m, md, eps)
    summary = hik.cut_summary(n, table, rule, value, eps, applied)
    summary["max_distance"] = float(max_eps)
    summary["hierarchy_merges"] = len(m)
    summary["inversions"] = int((md > m.height).sum())  # merges below a child (sparse candidates)
    return {"table": table, "summary": summary}


def _relabel_block(batch: pa.RecordBatch, plan) -> pa.RecordBatch:
    leaf = batch.column(batch.schema.get_field_index("leaf_id")).to_numpy(zero_copy_only=False).astype(np.int64)
    labels, sizes = hik.relabel(leaf, plan["table"])
    return pa.RecordBatch.from_arrays(
        [batch.column(batch.schema.get_field_index("example_id")), pa.array(labels, pa.int64()),
         pa.array(sizes, pa.int64()), pa.array(leaf, pa.int64())], schema=CUT_CLUSTERS_SCHEMA)


class CutHierarchy(beam.PTransform):
    """Flat clusters of a merge hierarchy at one cut (rule: distance, target, num_clusters).

    Input: {"clusters": PCollection[pa.RecordBatch] with example_id and leaf_id (one row
    per leaf), "merges": PCollection[hierarchy_kernels.Merges]}. `max_eps` is the eps
    the hierarchy was built to (cuts above it are refused, naming `max_flag`).
    Output: {"clusters": pa.RecordBatch blocks (CUT_CLUSTERS_SCHEMA), "cut": one dict}.
    """

    def __init__(self, rule: str, value: float, max_eps: float, max_flag: str = "--max_distance"):
        super().__init__()
        check_choice("rule", rule, hik.RULES)
        self._args = (rule, int(value) if rule == "num_clusters" else float(value), float(max_eps), max_flag)

    def expand(self, inputs):
        clusters, merges = inputs["clusters"], inputs["merges"]
        n = clusters | "CountLeaves" >> beam.Map(lambda b: b.num_rows) | "SumLeaves" >> beam.CombineGlobally(sum)
        plan = (
            merges
            | "GatherMerges" >> beam.CombineGlobally(_ConcatMerges())
            | "PlanCut" >> beam.Map(lambda m, n, args: plan_cut(m, n, *args), beam.pvalue.AsSingleton(n), self._args)
        )
        out = clusters | "Relabel" >> beam.Map(_relabel_block, beam.pvalue.AsSingleton(plan))
        return {"clusters": out, "cut": plan | "CutSummary" >> beam.Map(lambda p: p["summary"])}
