"""`ClusterOptions`: every parameter of the clustering stage (cm-cluster), validated here.

Frozen, and checked when built, so a bad value fails before any input is read,
naming the parameter (each is the cm-cluster flag of the same name). The checks are
`BuildClusters`' own (the transform validates its parameters in its constructor;
building one here costs nothing and keeps them in one place); a re-cut
(`recut_from`) is checked for what can be known without reading its source.

    options = ClusterOptions(embeddings="gs://b/emb/embeddings-*.parquet", distance_threshold=0.2,
                             output_dir="gs://b/clusters")
    manifest = run_cluster(options, ["--runner=DataflowRunner", ...])   # pipelines.build_clusters
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from cm_beam.clustering import build_clusters as cl
from cm_beam.clustering.hac_kernels import METRICS
from cm_beam.errors import InputError

KNN_MODES = cl.KNN_MODES


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """The clustering stage: which embeddings, the cut (exactly one of distance_threshold,
    target_mean_cluster_size, num_clusters; max_distance the eps the rounds run to), the
    kNN graph, and where the output goes. With `recut_from` (an earlier output
    directory) the hierarchy there is cut again instead (no embeddings)."""

    output_dir: str
    embeddings: Optional[str] = None
    distance_threshold: Optional[float] = None
    target_mean_cluster_size: Optional[float] = None
    num_clusters: Optional[int] = None
    max_distance: Optional[float] = None
    recut_from: Optional[str] = None
    metric: str = "cosine"
    num_neighbors: int = cl.DEFAULT_NUM_NEIGHBORS
    knn_mode: str = "auto"
    exact_max_points: int = cl.DEFAULT_EXACT_MAX_POINTS
    num_partitions: int = 0
    num_probes: int = cl.DEFAULT_NUM_PROBES
    num_shards: int = cl.DEFAULT_NUM_SHARDS
    max_rounds: int = cl.DEFAULT_MAX_ROUNDS
    max_inmemory_edges: int = cl.DEFAULT_MAX_INMEMORY_EDGES
    seed: int = 0
    # Extension (pipelines/extend_clusters.py): cluster the pool's new examples together
    # with the clusters of an earlier output directory.
    extend: Optional[str] = None
    extend_cluster_neighbors: int = 10
    extend_recompute_state: bool = False
    overwrite: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises InputError naming the first parameter that is wrong."""
        if not self.output_dir:
            raise InputError.bad_parameter("output_dir", "is required")
        if self.metric not in METRICS:
            raise InputError.bad_parameter("metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.extend is not None:
            for name in ("distance_threshold", "target_mean_cluster_size", "num_clusters", "max_distance", "recut_from"):
                if getattr(self, name) is not None:
                    raise InputError(f"--{name}: not used with --extend (the extension runs at the eps and metric of "
                                     f"--extend {self.extend})", parameter=name)
            if self.embeddings is None:
                raise InputError("--embeddings is required with --extend: the whole current pool", parameter="embeddings")
            if self.output_dir.rstrip("/") == self.extend.rstrip("/"):
                raise InputError("--output_dir must differ from --extend", parameter="output_dir")
            if not self.extend_cluster_neighbors >= 1:
                raise InputError.bad_parameter("extend_cluster_neighbors", f"must be >= 1, got {self.extend_cluster_neighbors}")
            return
        if self.recut_from is not None:
            if self.embeddings is not None:
                raise InputError("--embeddings: not used with --recut_from (the hierarchy is read from that directory)",
                                 parameter="embeddings")
            if self.max_distance is not None:
                raise InputError("--max_distance: not used with --recut_from (the hierarchy covers the source's "
                                 "max_distance)", parameter="max_distance")
            if self.output_dir.rstrip("/") == self.recut_from.rstrip("/"):
                raise InputError("--output_dir must differ from --recut_from", parameter="output_dir")
            # The cut itself is checked against the source's max_distance when it is read.
            return
        if self.embeddings is None:
            raise InputError("--embeddings is required (or --recut_from to cut an earlier clustering again)",
                             parameter="embeddings")
        self.build_clusters()

    def transform_params(self) -> Dict[str, Any]:
        """The keyword arguments of `BuildClusters` these options give."""
        names = ("distance_threshold", "metric", "num_neighbors", "knn_mode", "exact_max_points", "num_partitions",
                 "num_probes", "num_shards", "max_rounds", "max_inmemory_edges", "seed", "target_mean_cluster_size",
                 "num_clusters", "max_distance")
        return {name: getattr(self, name) for name in names}

    def build_clusters(self, max_points: Optional[int] = None) -> "cl.BuildClusters":
        """The BuildClusters transform of these options (`max_points`: a known bound on the pool)."""
        return cl.BuildClusters(**self.transform_params(), max_points=max_points)
