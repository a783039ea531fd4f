"""The small Keras CNN of the label-efficiency simulation.

Trained from scratch on all labels so far for a fixed number of epochs, with every
random draw seeded from (AL seed, round), so a curve is reproducible and every
strategy of a seed starts from the same seed-set model. TensorFlow is pinned to
2 threads (this machine has 2 cores, shared).

`save_for_embedding` writes the model the way `cm-embed` takes it: a `.keras` model
that maps an RGB float32 batch [n, 28, 28, 3] in [0, 255] to a dict with `embedding`
(the penultimate layer) and `probs` (softmax).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONFIGURED = False


def configure_tensorflow(threads: int = 2) -> None:
    """Thread limits and op determinism; must run before TF executes anything."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised by another module in this process
        pass
    tf.config.experimental.enable_op_determinism()
    _CONFIGURED = True


@dataclasses.dataclass(frozen=True)
class CnnConfig:
    conv1: int = 16
    conv2: int = 32
    embedding_dim: int = 64
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3


def build_cnn(config: CnnConfig, num_classes: int = 10):
    """conv-pool-conv-pool-dense(embedding)-softmax; outputs {'embedding', 'probs'}."""
    import keras

    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(config.conv1, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(config.conv2, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    embedding = keras.layers.Dense(config.embedding_dim, activation="relu", name="embedding")(x)
    probs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(embedding)
    return keras.Model(inputs, {"embedding": embedding, "probs": probs}, name="al_cnn")


def train_cnn(images: np.ndarray, labels: np.ndarray, config: CnnConfig, seed: int):
    """A fresh CNN trained on (images uint8 [n,28,28], labels) with all draws seeded by `seed`."""
    import keras

    configure_tensorflow()
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_cnn(config)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss={"probs": "sparse_categorical_crossentropy"},
    )
    x = images[..., None].astype(np.float32)
    model.fit(x, {"probs": labels}, epochs=config.epochs, batch_size=config.batch_size, shuffle=True, verbose=0)
    return model


def predict(model, images: np.ndarray, batch_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """(embedding float32 [n, d], probs float32 [n, classes]) of uint8 images [n, 28, 28]."""
    out = model.predict(images[..., None].astype(np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(out["embedding"], np.float32), np.asarray(out["probs"], np.float32)


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    _, probs = predict(model, images)
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def export_for_embedding(model):
    """`model` behind cm-embed's input contract: RGB float32 [0, 255] (n, 28, 28, 3).

    cm-embed decodes every image to 3 channels; our PNGs are greyscale, so the
    decoder replicates the grey level into R, G and B. A fixed 1x1 convolution that
    keeps the R channel (weights [1, 0, 0], exact in float32) feeds the trained
    network the very pixels it was trained on; no Lambda layer, so the file loads in
    Keras safe mode.
    """
    import keras

    rgb = keras.Input((28, 28, 3), name="rgb")
    to_grey = keras.layers.Conv2D(1, 1, use_bias=False, trainable=False, name="r_channel")
    grey = to_grey(rgb)
    to_grey.set_weights([np.array([1.0, 0.0, 0.0], np.float32).reshape(1, 1, 3, 1)])
    outputs = model(grey)
    return keras.Model(rgb, {"embedding": outputs["embedding"], "probs": outputs["probs"]}, name="al_cnn_rgb")


def save_for_embedding(model, path: str) -> str:
    """Saves `model` as `.keras` for cm-embed (dict outputs embedding + probs, RGB input)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    export_for_embedding(model).save(path)
    return path
