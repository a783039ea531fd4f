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
* `zipf`: `num_sources` training images, each present a Zipf-distributed number of
  times (P(c) proportional to c^-a on 1..`max_copies`: most once or twice, a few
  dozens of times), the first copy as it is and the others augmented (horizontal
  flip, shift, contrast change, pixel noise): the heavy, uneven duplication of
  web-scale pools.

`PoolSpec` names a pool completely (kind, the range of training images its sources
come from, the draw's seed), so calibration and evaluation pools can be drawn from
disjoint halves of the training split. `load_npz_pool` reads a user's own pool.

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


def augmented_copies(image: np.ndarray, count: int, rng: np.random.Generator, max_shift: int = 2,
                     contrast: tuple = (0.7, 1.3), max_noise_std: float = 12.0) -> np.ndarray:
    """`count` versions of `image`: the first as it is, the others each flipped left-right
    with probability 1/2, shifted by up to `max_shift` px, contrast-scaled about the
    image mean by a factor in `contrast`, with Gaussian noise of sd up to `max_noise_std`."""
    out = np.empty((count,) + image.shape, dtype=np.uint8)
    out[0] = image
    for c in range(1, count):
        x = image[:, ::-1] if rng.random() < 0.5 else image
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        x = shift_image(np.ascontiguousarray(x), int(dy), int(dx)).astype(np.float64)
        x = (x - x.mean()) * rng.uniform(*contrast) + x.mean()
        x = x + rng.normal(0.0, rng.uniform(0.0, max_noise_std), size=x.shape)
        out[c] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def zipf_counts(n: int, max_copies: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """n draws from P(c) proportional to c^-exponent on 1..max_copies."""
    c = np.arange(1, max_copies + 1)
    p = c ** -float(exponent)
    return rng.choice(c, size=n, p=p / p.sum())


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """Everything that determines a pool drawn from the Fashion-MNIST training split."""

    kind: str  # plain | redundant | zipf
    source_range: tuple = (0, 60000)  # training images [lo, hi) the sources are drawn from
    num_sources: int = 0  # 0: every image of the range (plain); redundant: pool size / copies
    copies: int = 5  # redundant
    max_shift: int = 2
    noise_std: float = 10.0  # redundant
    max_copies: int = 40  # zipf
    zipf_exponent: float = 1.5  # zipf
    data_seed: int = 20211


def build_pool(name: str, spec: PoolSpec, train_images: np.ndarray, train_labels: np.ndarray) -> Pool:
    """The pool `spec` describes. The draw depends only on the spec (never on the AL seed),
    so every strategy and seed of a setting sees the same pool."""
    lo, hi = spec.source_range
    if not 0 <= lo < hi <= train_images.shape[0]:
        raise ValueError(f"{name}: source_range {spec.source_range} outside the {train_images.shape[0]} training images")
    if spec.kind in ("plain", "redundant") and spec.source_range == (0, train_images.shape[0]):
        # The original settings: drawn exactly as make_pool always drew them.
        size = spec.num_sources * (spec.copies if spec.kind == "redundant" else 1) or None
        return dataclasses.replace(make_pool(spec.kind, train_images, train_labels, size=size, copies=spec.copies,
                                             max_shift=spec.max_shift, noise_std=spec.noise_std,
                                             data_seed=spec.data_seed), name=name)
    rng = np.random.default_rng(spec.data_seed)
    n = spec.num_sources or (hi - lo)
    if n > hi - lo:
        raise ValueError(f"{name}: {n} sources asked from a range of {hi - lo} images")
    base = lo + np.sort(rng.choice(hi - lo, n, replace=False))
    if spec.kind == "plain":
        return Pool(name, train_images[base], train_labels[base], base)
    if spec.kind == "redundant":
        images = near_duplicates(train_images[base], spec.copies, spec.max_shift, spec.noise_std, rng)
        return Pool(name, images, np.repeat(train_labels[base], spec.copies), np.repeat(base, spec.copies))
    if spec.kind == "zipf":
        counts = zipf_counts(n, spec.max_copies, spec.zipf_exponent, rng)
        images = np.concatenate([augmented_copies(train_images[b], int(c), rng, spec.max_shift)
                                 for b, c in zip(base, counts)])
        source = np.repeat(base, counts)
        # Copies of one source must not sit next to each other in id order.
        order = rng.permutation(source.size)
        return Pool(name, images[order], train_labels[source[order]], source[order])
    raise ValueError(f"{name}: unknown pool kind {spec.kind!r} (expected plain, redundant or zipf)")


def load_npz_pool(path: str):
    """(pool, test_images, test_labels) from a user's .npz: `images` uint8 [n, 28, 28],
    `labels` [n], optional `source` [n] (near-copy groups; default: each row its own),
    `test_images` uint8 [m, 28, 28], `test_labels` [m]. Errors name the file and array."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key in ("images", "labels", "test_images", "test_labels"):
        if key not in arrays:
            raise ValueError(f"{path}: array {key!r} missing (has {sorted(arrays)})")
    images, test_images = arrays["images"], arrays["test_images"]
    for key, a in (("images", images), ("test_images", test_images)):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[1:] != (28, 28):
            raise ValueError(f"{path}: {key!r} must be uint8 [n, 28, 28], got {a.dtype} {list(a.shape)}")
    n = images.shape[0]
    labels = arrays["labels"].astype(np.int64)
    test_labels = arrays["test_labels"].astype(np.int64)
    source = arrays.get("source", np.arange(n)).astype(np.int64)
    for key, a, m in (("labels", labels, n), ("source", source, n), ("test_labels", test_labels, test_images.shape[0])):
        if a.shape != (m,):
            raise ValueError(f"{path}: {key!r} must have shape [{m}], got {list(a.shape)}")
    for key, a in (("labels", labels), ("test_labels", test_labels)):
        if a.size and (a.min() < 0 or a.max() >= NUM_CLASSES):
            raise ValueError(f"{path}: {key!r} must be class indices in [0, {NUM_CLASSES})")
    return Pool("npz", images, labels, source), test_images, test_labels


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
