"""The demo's image pool and model, made locally in seconds (no download).

`make_pool` draws a few thousand small RGB images of simple shapes (one class per
shape) with random colours, sizes, positions and noise, and writes them as PNG files
plus a pool manifest (`pool.csv`: example_id, uri relative to the manifest) that
`cm-embed --pool_format manifest` reads. Like real pools, a share of the images are
near-duplicates of another image (the same drawing, re-encoded with a one-pixel
shift, a brightness change and fresh noise), so that Cluster-Margin has duplicate
groups to spread the batch over. The true classes go to `labels.csv`, which only
the demo's report reads (a real pool has no labels).

`train_model` trains a small Keras classifier on a random seed set of the pool
(the "labeled so far" set of active learning) and saves it as `.keras`. It is a
plain classifier whose penultimate layer is named `embedding`: cm-embed taps that
layer for the embedding and reads the softmax output as `probs`.

Everything is seeded: the same seed gives the same pixels and the same model
weights (TensorFlow op determinism is switched on while training).

    from cm_beam.testing import demo_pool
    info = demo_pool.make_pool("demo/pool", num_images=3000, seed=0)
    demo_pool.train_model(info["manifest"], info["labels"], "demo/model.keras", seed=0)
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, Optional

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross", "ring", "bars")
DEFAULT_IMAGE_SIZE = 32
MANIFEST_NAME = "pool.csv"
LABELS_NAME = "labels.csv"
INFO_NAME = "pool_info.json"


def _draw(rng: np.random.Generator, label: int, size: int):
    """One image of class `label` as a PIL image (shape, colours, placement random)."""
    from PIL import Image, ImageDraw

    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    foreground = tuple(int(c) for c in (np.array(background) + rng.integers(80, 176, 3)) % 256)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    width = max(1, int(round(radius / 3)))
    name = CLASSES[label]
    if name == "circle":
        draw.ellipse(box, fill=foreground)
    elif name == "square":
        draw.rectangle(box, fill=foreground)
    elif name == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=foreground)
    elif name == "cross":
        draw.line([(cx - radius, cy), (cx + radius, cy)], fill=foreground, width=width)
        draw.line([(cx, cy - radius), (cx, cy + radius)], fill=foreground, width=width)
    elif name == "ring":
        draw.ellipse(box, outline=foreground, width=width)
    else:  # bars: vertical stripes across the box
        step = max(2, int(radius / 2))
        for x in range(int(cx - radius), int(cx + radius), 2 * step):
            draw.rectangle([x, cy - radius, x + step - 1, cy + radius], fill=foreground)
    return image


def _noisy(rng: np.random.Generator, image, sigma: float, shift: int = 0, gain: float = 1.0):
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32)
    if shift:
        pixels = np.roll(pixels, tuple(rng.integers(-shift, shift + 1, 2)), axis=(0, 1))
    pixels = pixels * gain + rng.normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_pool(
    directory: str,
    num_images: int = 3000,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    duplicate_fraction: float = 0.3,
    noise: float = 12.0,
) -> Dict[str, object]:
    """Writes the demo pool under `directory` (local); returns paths and counts.

    A `duplicate_fraction` of the images are near-copies of an earlier original;
    the copies of one original form a near-duplicate group (sizes 2 to ~10).
    """
    if num_images < len(CLASSES):
        raise ValueError(f"num_images must be >= {len(CLASSES)}, got {num_images}")
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(directory, "images")
    os.makedirs(images_dir, exist_ok=True)
    num_originals = max(len(CLASSES), int(round(num_images * (1.0 - duplicate_fraction))))
    labels = np.empty(num_images, np.int64)
    duplicate_of = np.full(num_images, -1, np.int64)
    drawings = []
    for i in range(num_originals):
        labels[i] = i % len(CLASSES) if i < len(CLASSES) else rng.integers(len(CLASSES))
        drawings.append(_draw(rng, int(labels[i]), image_size))
    # Near-duplicate groups: a few originals get many copies (Zipf-like), as scraped pools do.
    weights = 1.0 / np.arange(1, num_originals + 1) ** 1.2
    sources = rng.permutation(num_originals)[rng.choice(num_originals, num_images - num_originals, p=weights / weights.sum())]
    duplicate_of[num_originals:] = sources
    labels[num_originals:] = labels[sources]
    # Shuffle so duplicates are not contiguous in the manifest (ids say nothing).
    order = rng.permutation(num_images)
    rows = []
    for position, i in enumerate(order):
        example_id = f"img-{position:06d}"
        if i < num_originals:
            image = _noisy(rng, drawings[i], noise)
        else:
            image = _noisy(rng, drawings[duplicate_of[i]], noise, shift=1, gain=float(rng.uniform(0.9, 1.1)))
        uri = f"images/{example_id}.png"
        image.save(os.path.join(directory, uri))
        rows.append((example_id, uri, int(labels[i]), int(duplicate_of[i]) if duplicate_of[i] >= 0 else i))
    manifest = os.path.join(directory, MANIFEST_NAME)
    labels_path = os.path.join(directory, LABELS_NAME)
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example_id", "uri"])
        writer.writerows((r[0], r[1]) for r in rows)
    with open(labels_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example_id", "label", "group"])  # group: the original drawing's index
        writer.writerows((r[0], r[2], r[3]) for r in rows)
    info = {
        "manifest": manifest,
        "labels": labels_path,
        "num_images": num_images,
        "num_originals": num_originals,
        "image_size": image_size,
        "classes": list(CLASSES),
        "seed": seed,
    }
    with open(os.path.join(directory, INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)
    return info


def read_labels(labels_path: str) -> Dict[str, int]:
    with open(labels_path, newline="") as f:
        return {row["example_id"]: int(row["label"]) for row in csv.DictReader(f)}


def load_images(manifest: str, example_ids=None) -> Dict[str, np.ndarray]:
    """The manifest's images (all, or those in `example_ids`) as uint8 arrays."""
    from PIL import Image

    base = os.path.dirname(os.path.abspath(manifest))
    wanted = set(example_ids) if example_ids is not None else None
    out = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            if wanted is None or row["example_id"] in wanted:
                out[row["example_id"]] = np.asarray(Image.open(os.path.join(base, row["uri"])).convert("RGB"))
    return out


def build_model(num_classes: int, image_size: int = DEFAULT_IMAGE_SIZE, embedding_dim: int = 32):
    """A small CNN; float RGB in [0, 255] in, softmax out; penultimate layer `embedding`."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, activation="relu", padding="same")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, activation="relu", padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    # Linear embedding: ReLU features all sit in one orthant, where cosine distances
    # bunch up near 0 and a distance threshold separates little.
    x = layers.Dense(embedding_dim, name="embedding")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="demo_classifier")


def train_model(
    manifest: str,
    labels_path: str,
    model_path: str,
    seed: int = 0,
    seed_set_size: int = 300,
    epochs: int = 20,
    image_size: Optional[int] = None,
) -> Dict[str, object]:
    """Trains the demo classifier on `seed_set_size` random pool images; saves `model_path`.

    Returns the seed set's ids (the "labeled" set: the nightly excludes them) and
    the training accuracy.
    """
    import keras
    import tensorflow as tf

    labels = read_labels(labels_path)
    ids = sorted(labels)
    rng = np.random.default_rng(seed + 1)
    seed_ids = sorted(rng.choice(ids, size=min(seed_set_size, len(ids)), replace=False).tolist())
    images = load_images(manifest, seed_ids)
    x = np.stack([images[i] for i in seed_ids]).astype(np.float32)
    y = np.array([labels[i] for i in seed_ids], np.int64)
    size = image_size or x.shape[1]
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model(len(CLASSES), size)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    model.save(model_path)
    return {
        "model": model_path,
        "seed_ids": seed_ids,
        "train_accuracy": float(history.history["accuracy"][-1]),
        "epochs": epochs,
    }


def make_demo_inputs(directory: str, num_images: int = 3000, seed: int = 0, seed_set_size: int = 300,
                     image_size: int = DEFAULT_IMAGE_SIZE, epochs: int = 20) -> Dict[str, object]:
    """Pool, trained model and labeled seed set (`labeled.csv`) under `directory`.

    What `cm-nightly --demo` runs on; tests use it with a small `num_images`.
    """
    pool = make_pool(os.path.join(directory, "pool"), num_images, seed=seed, image_size=image_size)
    model_path = os.path.join(directory, "model.keras")
    trained = train_model(pool["manifest"], pool["labels"], model_path, seed=seed,
                          seed_set_size=min(seed_set_size, num_images // 2), epochs=epochs)
    labeled = os.path.join(directory, "labeled.csv")
    with open(labeled, "w") as f:
        f.write("example_id\n" + "".join(f"{i}\n" for i in trained["seed_ids"]))
    return {"pool": pool["manifest"], "labels": pool["labels"], "model": model_path, "labeled": labeled,
            "num_images": num_images, "num_originals": pool["num_originals"], "seed_set": len(trained["seed_ids"]),
            "train_accuracy": trained["train_accuracy"]}
