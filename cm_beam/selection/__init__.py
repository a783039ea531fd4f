"""Selection stage (`cm-select`): scores + clusters + exclusions -> the next labeling batch.

* `options` / `stage`: `SelectOptions` (every parameter of cm-select, validated once, the
  margin-pool rule included) and `run_select(options, beam_options)`, the stage as one Beam job.
* `select_batch`: the `SelectBatch` PTransform (Cluster-Margin's round robin over the
  clusters of the most uncertain examples, and the margin / random baselines).
* `select_impl`: its DoFns and CombineFns (bucketing, joins, the distributed k-th smallest).
* `kernels`: the pure-numpy math (radix selection, bucket layout, picks); imports no Beam.
* `uncertainty`: the scores (margin, entropy, least confidence) from class probabilities.
"""

import importlib as _importlib

_EXPORTS = {'SelectOptions': 'options', 'run_select': 'stage', 'SelectBatch': 'select_batch',
            'STRATEGIES': 'options'}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that importing a pure-numpy kernel module does not import Beam.
    if name in _EXPORTS:
        return getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
