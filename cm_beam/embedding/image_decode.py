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

Decompression bombs: a 1 MB PNG can declare 20000 x 20000 pixels, which TensorFlow
would decode to 1.2 GB (and resize in float32, four times that). Before any
decoding, the width and height the file's header declares (PNG IHDR, JPEG SOF,
GIF screen, BMP info header, WebP VP8/VP8L/VP8X) are read from the first bytes,
and an image declaring more than `max_pixels` is rejected with that reason.
"""

from __future__ import annotations

import logging
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np

_LOG = logging.getLogger(__name__)

_THREADS_SET = None

# About 40 megapixels (e.g. 7300 x 5500, above an 8K frame): decoded RGB is 120 MB,
# TensorFlow's float32 resize input 480 MB per image.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def declared_size(data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, width, height) from the image header, without decoding; None if unknown.

    For a recognised format with a truncated or corrupt header the size is None too
    (TensorFlow then rejects the bytes with its own reason).
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return "PNG", w, h
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return "GIF", w, h
        if data[:2] == b"BM" and len(data) >= 26:
            header = struct.unpack("<I", data[14:18])[0]
            if header == 12:
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
            return "BMP", abs(w), abs(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return "WebP", w, h
            if chunk == b"VP8L" and data[20:21] == b"\x2f":
                bits = int.from_bytes(data[21:25], "little")
                return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return "WebP", w & 0x3FFF, h & 0x3FFF
    except struct.error:
        return None
    return None


# JPEG markers that start a frame (SOF0..SOF15 but DHT, JPG and DAC).
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> Optional[Tuple[str, int, int]]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _SOF:
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return "JPEG", w, h
        i += 2 + length
    return None


def too_large(data: bytes, max_pixels: Optional[int]) -> Optional[str]:
    """The rejection reason if the header declares more than `max_pixels` pixels, else None."""
    if not max_pixels:
        return None
    size = declared_size(data)
    if size is None:
        return None
    fmt, w, h = size
    if w * h > max_pixels:
        return (f"image too large: its {fmt} header declares {w} x {h} = {w * h} pixels, more than "
                f"--max_image_pixels {max_pixels}; not decoded")
    return None


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

    def __init__(self, image_size: int, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0 or None, got {max_pixels}")
        self.image_size = int(image_size)
        self.max_pixels = max_pixels
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
        return {"image_size": self.image_size, "max_pixels": self.max_pixels, "_fn": None}

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
            elif too_large(data, self.max_pixels):
                reasons[i] = too_large(data, self.max_pixels)  # a decompression bomb: never decoded
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
