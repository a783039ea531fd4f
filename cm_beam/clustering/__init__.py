"""Clustering stage (`cm-cluster`): embeddings -> average-linkage HAC clusters.

* `build_clusters`: the `BuildClusters` PTransform (validate, kNN graph, HAC rounds, cut).
* `options`: `ClusterOptions`, every parameter of cm-cluster, validated (the stage runs
  from them with `pipelines.build_clusters.run_cluster`).
* `knn_graph` / `knn_kernels`: the sharded nearest-neighbour candidate graph.
* `hac` / `hac_kernels`: reciprocal-nearest-neighbour merge rounds with exact linkage
  from cluster sums.
* `hierarchy` / `hierarchy_kernels`: the recorded merges and cuts of them.

Modules named `*_kernels` are pure numpy and import no Beam.
"""

import importlib as _importlib

_EXPORTS = {'ClusterOptions': 'options', 'BuildClusters': 'build_clusters', 'CutHierarchy': 'hierarchy', 'KnnGraph': 'knn_graph', 'HacRounds': 'hac'}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that importing a pure-numpy kernel module does not import Beam.
    if name in _EXPORTS:
        return getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
