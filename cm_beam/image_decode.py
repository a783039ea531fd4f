"""Decoding encoded images into the model's input: RGB, resized, float32 in [0, 255].

Decoding is TensorFlow's (`tf.io.decode_image`: JPEG, PNG, GIF first frame, BMP;
grayscale is expanded and alpha dropped to give 3 channels), resized bilinearly to
`image_size x image_size` with `tf.image.resize`. No normalisation happens here:
it belongs inside the model, so that the same `.keras` file gives the same answer
wherever it runs.

`ImageDecoder.decode` takes a whole block of encoded images and decodes it with one
compiled TensorFlow call (a `tf.function` over a string tensor), which costs a small
fraction of the per-image eager dispatch. When anything in the block fails to
decode, the block is decoded again one image at a time with the *same* compiled
function, so good images give bit-identical pixels either way and each bad image is
reported with TensorFlow's reason instead of failing the job.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np

_LOG = logging.getLogger(__name__)

_THREADS_SET = None


def configure_threads(intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
    """Sets TensorFlow's thread pools (0 = TensorFlow's default) and GPU memory growth.

    Must run before the process's first TensorFlow op; later calls with a different
    setting are ignored with a warning (TensorFlow cannot change them once started).
    Several worker processes on one machine each get their own pools, so with 2
    workers on 2 cores one intra-op thread each avoids oversubscription.
    """
    global _THREADS_SET
    wanted = (int(intra_op_threads), int(inter_op_threads))
    if _THREADS_SET == wanted:
        return
    import tensorflow as tf

    # Several worker processes may share one GPU: each must take memory as it needs it,
    # not all of it up front (TensorFlow's default).
    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError) as e:
        _LOG.warning("cannot enable GPU memory growth: %s", e)
    if wanted == (0, 0):
        _THREADS_SET = wanted
        return

    try:
        if wanted[0]:
            tf.config.threading.set_intra_op_parallelism_threads(wanted[0])
        if wanted[1]:
            tf.config.threading.set_inter_op_parallelism_threads(wanted[1])
        _THREADS_SET = wanted
    except RuntimeError as e:  # TensorFlow already initialised in this process
        _LOG.warning("cannot set TensorFlow threads to %s: %s", wanted, e)
        _THREADS_SET = wanted


class ImageDecoder:
    """Decodes blocks of encoded images to float32 arrays of shape (n, size, size, 3)."""

    def __init__(self, image_size: int):
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        self.image_size = int(image_size)
        self._fn = None

    def _compiled(self):
        if self._fn is None:
            import tensorflow as tf

            size = self.image_size

            def one(encoded):
                image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
                return tf.image.resize(image, [size, size], method="bilinear")

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
            def decode_block(encoded):
                return tf.map_fn(
                    one, encoded, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)
                )

            self._fn = decode_block
        return self._fn

    def __getstate__(self):  # the compiled function is rebuilt where it is used
        return {"image_size": self.image_size, "_fn": None}

    def decode(self, encoded: Sequence[Optional[bytes]]) -> Tuple[np.ndarray, np.ndarray, List[Optional[str]]]:
        """Returns (images of the decodable rows, ok mask over all rows, reason per row).

        `encoded[i]` may be None (already known bad): it is reported as not ok with
        reason None, for the caller to fill in.
        """
        import tensorflow as tf

        n = len(encoded)
        ok = np.zeros(n, dtype=bool)
        reasons: List[Optional[str]] = [None] * n
        todo = []
        for i, data in enumerate(encoded):
            if data is None:
                continue
            if len(data) == 0:
                reasons[i] = "empty file"
            else:
                todo.append(i)
        empty = np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        if not todo:
            return empty, ok, reasons
        fn = self._compiled()
        try:
            images = fn(tf.constant([encoded[i] for i in todo], dtype=tf.string)).numpy()
            ok[todo] = True
            return images, ok, reasons
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.ResourceExhaustedError, tf.errors.OutOfRangeError):
            pass  # at least one bad image: find it below
        good = []
        for i in todo:
            try:
                good.append(fn(tf.constant([encoded[i]], dtype=tf.string)).numpy())
                ok[i] = True
            except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.ResourceExhaustedError, tf.errors.OutOfRangeError) as e:
                reasons[i] = "cannot decode image: " + _first_line(e.message)
        return (np.concatenate(good) if good else empty), ok, reasons


def _first_line(message: str) -> str:
    """TensorFlow's own reason, without the graph-execution preamble and node context."""
    text = (message or "").split("\t [[")[0].split(" [[")[0].strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return (lines[-1] if lines else "unknown error")[:300]
