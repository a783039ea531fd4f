"""The exact-linkage state of a clustering's clusters as Parquet rows (no Beam import).

cm-cluster writes `state-*.parquet` beside `clusters-*.parquet`: one row per cluster the
merge rounds left at `max_distance`, with what average linkage needs of it
(docs/design.md, "Exact linkage from cluster sums"):

* `cluster_id` int64: the cluster's public id (as in `clusters-*.parquet` when the cut is
  at `max_distance`);
* `count` int64: its members;
* `sum` list<float64>: the sum of its members' prepared vectors (unit rows under cosine;
  under sqeuclidean rows minus the pool mean the clustering centred on, which the
  manifest records as `state_center`);
* `sq` float64: the sum of its members' squared norms (sqeuclidean; 0 under cosine).

A later pool joins these clusters without reclustering them (`cm-cluster --extend`,
`cm_beam.clustering.extend`).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pyarrow as pa

STATE_SCHEMA = pa.schema([("cluster_id", pa.int64()), ("count", pa.int64()), ("sum", pa.list_(pa.float64())),
                          ("sq", pa.float64())])


def state_batch(labels, counts, sums, sq) -> pa.RecordBatch:
    """Rows of STATE_SCHEMA from arrays (sums float64 [m, d])."""
    sums = np.ascontiguousarray(sums, np.float64)
    m = sums.shape[0]
    d = sums.shape[1] if sums.ndim == 2 else 0
    offsets = pa.array(np.arange(m + 1, dtype=np.int32) * d, pa.int32())
    return pa.RecordBatch.from_arrays(
        [pa.array(np.asarray(labels, np.int64)), pa.array(np.asarray(counts, np.int64)),
         pa.ListArray.from_arrays(offsets, pa.array(sums.ravel(), pa.float64())),
         pa.array(np.asarray(sq, np.float64))], schema=STATE_SCHEMA)


def batch_state(batch) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels int64, counts int64, sums float64 [m, d], sq float64) of a state batch.

    Raises ValueError when the sum vectors are not all of one length.
    """
    col = lambda name: batch.column(batch.schema.get_field_index(name))  # noqa: E731
    labels = col("cluster_id").to_numpy(zero_copy_only=False).astype(np.int64)
    counts = col("count").to_numpy(zero_copy_only=False).astype(np.int64)
    sq = col("sq").to_numpy(zero_copy_only=False).astype(np.float64)
    sums_col = col("sum")
    if isinstance(sums_col, pa.ChunkedArray):
        sums_col = sums_col.combine_chunks()
    if len(labels) == 0:
        return labels, counts, np.zeros((0, 0)), sq
    lengths = np.diff(sums_col.offsets.to_numpy())
    if (lengths != lengths[0]).any():
        raise ValueError(f"state: cluster {int(labels[np.argmax(lengths != lengths[0])])} has a sum of length "
                         f"{int(lengths[np.argmax(lengths != lengths[0])])}, others {int(lengths[0])}")
    values = sums_col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return labels, counts, values.reshape(len(labels), int(lengths[0])), sq
