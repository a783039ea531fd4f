"""Image decoding: formats, resize, batch path == per-image reference, bad bytes rejected."""

import io

import numpy as np
import pytest

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow writes the GIF and BMP test images)

from cm_beam.image_decode import ImageDecoder  # noqa: E402

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
