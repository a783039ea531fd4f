"""Image decoding: formats, resize, batch path == per-image reference, bad bytes rejected."""

import io

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow writes the GIF and BMP test images)

from cm_beam.embedding.image_decode import ImageDecoder  # noqa: E402

SIZE = 12


def _encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reference(data):
    """TF's decode + resize, eager, one image: what the model would be fed by hand."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.image.resize(image, [SIZE, SIZE], method="bilinear").numpy()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (9, 9), dtype=np.uint8)
    rgba = rng.integers(0, 256, (16, 8, 4), dtype=np.uint8)
    return {
        "png": tf.io.encode_png(rgb).numpy(),
        "jpeg": tf.io.encode_jpeg(rgb, quality=95).numpy(),
        "png_gray": tf.io.encode_png(gray[..., None]).numpy(),
        "png_rgba": tf.io.encode_png(rgba).numpy(),
        "bmp": _encode(rgb, "BMP"),
        "gif": _encode(rgb, "GIF"),
        "rgb": rgb,
    }


def test_formats_decode_like_the_eager_reference(images):
    decoder = ImageDecoder(SIZE)
    keys = ["png", "jpeg", "png_gray", "png_rgba", "bmp", "gif"]
    out, ok, reasons = decoder.decode([images[k] for k in keys])
    assert ok.all() and reasons == [None] * len(keys)
    assert out.shape == (len(keys), SIZE, SIZE, 3) and out.dtype == np.float32
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(out[i], _reference(images[k]), err_msg=k)
    assert 0.0 <= out.min() and out.max() <= 255.0
    # lossless formats: the pixels are the original ones before resizing
    expected = tf.image.resize(images["rgb"], [SIZE, SIZE], method="bilinear").numpy()
    np.testing.assert_allclose(out[0], expected, atol=1e-4)
    np.testing.assert_allclose(out[4], expected, atol=1e-4)
    # grayscale becomes three equal channels, alpha is dropped
    assert np.array_equal(out[2][..., 0], out[2][..., 1]) and np.array_equal(out[2][..., 0], out[2][..., 2])


def test_gif_first_frame():
    frames = [np.full((8, 8, 3), c, np.uint8) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="GIF", save_all=True, append_images=[Image.fromarray(frames[1])])
    out, ok, _ = ImageDecoder(8).decode([buf.getvalue()])
    assert ok.all()
    np.testing.assert_array_equal(out[0], frames[0].astype(np.float32))


def test_bad_images_are_reported_and_good_ones_unchanged(images):
    decoder = ImageDecoder(SIZE)
    good_alone, _, _ = decoder.decode([images["png"], images["jpeg"]])
    batch = [images["png"], b"", b"not an image at all", images["jpeg"][: len(images["jpeg"]) // 2], None, images["jpeg"]]
    out, ok, reasons = decoder.decode(batch)
    assert ok.tolist() == [True, False, False, False, False, True]
    assert reasons[1] == "empty file"
    assert reasons[2].startswith("cannot decode image: ") and "Unknown image file format" in reasons[2]
    assert reasons[3].startswith("cannot decode image: ")  # truncated JPEG
    assert reasons[4] is None  # a row known bad upstream keeps its own reason
    assert reasons[0] is None and reasons[5] is None
    # the per-image fallback gives exactly the pixels of the batch path
    np.testing.assert_array_equal(out, good_alone)


def test_all_bad_gives_an_empty_array():
    out, ok, reasons = ImageDecoder(4).decode([b"x", None])
    assert out.shape == (0, 4, 4, 3) and not ok.any() and reasons[0]


# ---------------------------------------------------------------------------
# Decompression bombs: the header's declared size is checked before decoding.


def bomb_png(width, height):
    """A real PNG header (signature, IHDR with a valid CRC) declaring width x height, and a
    few bytes of IDAT: 1.2 GB of pixels declared in under 100 bytes."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bomb_jpeg(width, height):
    """A real small JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    import struct

    data = bytearray(tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy())
    i = 2
    while data[i + 1] != 0xC0:  # walk the marker segments to the SOF0 frame header
        i += 2 + struct.unpack(">H", bytes(data[i + 2:i + 4]))[0]
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_declared_size_equals_the_decoded_shape_for_every_format():
    """The header parser against the pixels TensorFlow (and Pillow, for WebP) decode."""
    from cm_beam.embedding.image_decode import declared_size

    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (7, 300), (257, 3), (40, 41)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for fmt, data in (("PNG", tf.io.encode_png(rgb).numpy()),
                          ("JPEG", tf.io.encode_jpeg(rgb).numpy()),
                          ("JPEG", _encode(rgb, "JPEG", progressive=True)),
                          ("GIF", _encode(rgb, "GIF")),
                          ("BMP", _encode(rgb, "BMP"))):
            decoded = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
            assert decoded.shape[:2] == (h, w)
            assert declared_size(data) == (fmt, w, h), (fmt, h, w)
        for lossless in (False, True):
            try:
                webp = _encode(rgb, "WEBP", lossless=lossless)
            except (KeyError, OSError):
                continue  # Pillow without WebP
            with Image.open(io.BytesIO(webp)) as im:
                assert declared_size(webp) == ("WebP", im.size[0], im.size[1]) == ("WebP", w, h)
    assert declared_size(b"") is None and declared_size(b"not an image") is None
    assert declared_size(b"\x89PNG\r\n\x1a\n\0\0") is None  # truncated: TensorFlow gives the reason


def test_huge_png_and_jpeg_headers_are_rejected_without_decoding(images, monkeypatch):
    from cm_beam.embedding import image_decode

    png, jpeg = bomb_png(20000, 20000), bomb_jpeg(20000, 20000)
    assert len(png) < 200 and image_decode.declared_size(png) == ("PNG", 20000, 20000)
    assert image_decode.declared_size(jpeg) == ("JPEG", 20000, 20000)
    decoder = ImageDecoder(SIZE)  # the default limit
    assert decoder.max_pixels == image_decode.DEFAULT_MAX_IMAGE_PIXELS < 20000 * 20000
    decoded_batches = []
    real = decoder._compiled()
    decoder._fn = lambda batch: (decoded_batches.append(batch.shape[0]), real(batch))[1]
    out, ok, reasons = decoder.decode([images["png"], png, jpeg, images["jpeg"]])
    assert ok.tolist() == [True, False, False, True]
    for reason, fmt in ((reasons[1], "PNG"), (reasons[2], "JPEG")):
        assert reason == (f"image too large: its {fmt} header declares 20000 x 20000 = 400000000 pixels, more than "
                          f"--max_image_pixels {image_decode.DEFAULT_MAX_IMAGE_PIXELS}; not decoded")
    assert decoded_batches == [2]  # only the two good images reached TensorFlow, in one call
    np.testing.assert_array_equal(out, ImageDecoder(SIZE).decode([images["png"], images["jpeg"]])[0])
    # The limit is inclusive and configurable; a real image above it is refused as well.
    h, w = images["rgb"].shape[:2]
    _, ok, reasons = ImageDecoder(SIZE, max_pixels=h * w).decode([images["png"]])
    assert ok.all()
    _, ok, reasons = ImageDecoder(SIZE, max_pixels=h * w - 1).decode([images["png"]])
    assert not ok.any() and reasons[0].startswith(f"image too large: its PNG header declares {w} x {h}")
    _, ok, _ = ImageDecoder(SIZE, max_pixels=None).decode([images["png"]])
    assert ok.all()
