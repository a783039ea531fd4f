"""Embedding stage (`cm-embed`): images -> embedding, uncertainty score, predicted class.

* `embed_pool`: the `EmbedAndScore` PTransform over RunInference.
* `options` / `stage`: `EmbedOptions` (every parameter of cm-embed, validated) and
  `run_embed(options, beam_options)`, the stage as one Beam job.
* `keras_model_handler`: the Keras `ModelHandler` (safe loading, model contract checks).
* `image_sources` / `image_decode`: reading pools (CSV, directories, TFRecords) and
  decoding images with dead letters for bad ones.
"""

import importlib as _importlib

_EXPORTS = {'EmbedOptions': 'options', 'run_embed': 'stage', 'EmbedAndScore': 'embed_pool', 'KerasModelHandler': 'keras_model_handler', 'ReadImagePool': 'image_sources'}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so that importing a pure-numpy kernel module does not import Beam.
    if name in _EXPORTS:
        return getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
