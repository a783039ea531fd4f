"""Fashion-MNIST pools for the label-efficiency simulation (pure numpy, no Beam, no TF).

The images come from Debian's `dataset-fashion-mnist` package (IDX files, read with
numpy; nothing is downloaded). Two pool settings are built from the 60K training
images; the 10K test images are the evaluation set of every setting:

* `plain`: the 60K training images as they are.
* `redundant`: `base_size` training images (drawn once, with a fixed RNG), each
  present as `copies` near-duplicates: every copy is shifted by up to `max_shift`
  pixels in x and y (zero fill, no wrap-around) and gets Gaussian pixel noise of
  standard deviation `noise_std` (grey levels), clipped to uint8. With the defaults
  (12,000 x 5) the pool has the same 60K size as the plain one, so the two settings
  differ only in redundancy, the way web-scale pools are full of near-copies.

`write_png_parquet` writes a pool once as Parquet (`example_id` string, `image` PNG
bytes), the input of `cm-embed`. PNG is lossless, so the product sees exactly the
uint8 pixels the in-memory baselines see.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
from typing import Optional

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzipped) as a numpy array (uint8 data only)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} values, header says {shape}")
    return array.reshape(shape)


def _idx_path(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{os.path.join(directory, stem)}(.gz) not found: install Fashion-MNIST with "
        "`apt-get install dataset-fashion-mnist` or pass --data_dir"
    )


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR):
    """(train_images, train_labels, test_images, test_labels); images uint8 [n, 28, 28]."""
    out = []
    for split in ("train", "t10k"):
        out.append(read_idx(_idx_path(directory, f"{split}-images-idx3-ubyte")))
        out.append(read_idx(_idx_path(directory, f"{split}-labels-idx1-ubyte")).astype(np.int64))
    return tuple(out)


@dataclasses.dataclass
class Pool:
    """An unlabeled pool with its hidden labels; example_id of row i is str(i)."""

    name: str
    images: np.ndarray  # uint8 [n, 28, 28]
    labels: np.ndarray  # int64 [n]
    # Row i is a copy of source image base_index[i] (redundant pool), for reporting.
    base_index: np.ndarray

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def example_ids(self) -> np.ndarray:
        return np.array([str(i) for i in range(self.size)], dtype=object)


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`image` moved by (dy, dx) pixels; what moves out is lost, what moves in is 0."""
    h, w = image.shape
    out = np.zeros_like(image)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = image[ys, xs]
    return out


def near_duplicates(images: np.ndarray, copies: int, max_shift: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """`copies` shifted, noisy versions of each image: row i*copies + c is copy c of image i."""
    n, h, w = images.shape
    out = np.empty((n * copies, h, w), dtype=np.uint8)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, copies, 2))
    noise = rng.normal(0.0, noise_std, size=(n * copies, h, w)) if noise_std > 0 else None
    for i in range(n):
        for c in range(copies):
            out[i * copies + c] = shift_image(images[i], int(shifts[i, c, 0]), int(shifts[i, c, 1]))
    if noise is not None:
        out = np.clip(np.rint(out.astype(np.float64) + noise), 0, 255).astype(np.uint8)
    return out


def make_pool(name: str, train_images: np.ndarray, train_labels: np.ndarray, *, size: Optional[int] = None,
              copies: int = 5, max_shift: int = 2, noise_std: float = 10.0, data_seed: int = 20211) -> Pool:
    """The `plain` or `redundant` pool of `size` rows (default: all 60K) from the training split.

    The draw of images depends only on `data_seed`, never on the AL seed, so every
    strategy and seed of a setting sees the same pool.
    """
    rng = np.random.default_rng(data_seed)
    n_train = train_images.shape[0]
    size = n_train if size is None else size
    if name == "plain":
        index = np.arange(n_train) if size == n_train else np.sort(rng.choice(n_train, size, replace=False))
        return Pool(name, train_images[index], train_labels[index], index)
    if name == "redundant":
        if size % copies:
            raise ValueError(f"redundant pool size {size} is not a multiple of copies={copies}")
        base = np.sort(rng.choice(n_train, size // copies, replace=False))
        images = near_duplicates(train_images[base], copies, max_shift, noise_std, rng)
        return Pool(name, images, np.repeat(train_labels[base], copies), np.repeat(base, copies))
    raise ValueError(f"unknown pool setting {name!r} (expected plain or redundant)")


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image  # Pillow ships with the venv (matplotlib depends on it)

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_png_parquet(pool: Pool, path: str, row_group_rows: int = 8192) -> str:
    """Writes `pool` as Parquet (example_id, image PNG bytes) at `path`, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "example_id": pa.array(list(pool.example_ids), pa.string()),
        "image": pa.array([encode_png(im) for im in pool.images], pa.binary()),
    })
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp, row_group_size=row_group_rows)
    os.replace(tmp, path)
    return path
