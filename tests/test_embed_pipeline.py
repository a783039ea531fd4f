"""cm-embed end to end: every reader, bad images rejected, outputs equal the model's own predict.

The reference for every output row is independent of the pipeline: TF's eager
decode + resize of that one image, then `model.predict` (and a tapped
`keras.Model(...).predict` for the embedding), with margin and entropy in plain numpy.
"""

import glob
import hashlib
import io
import json
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from cm_beam.io import artifacts
from cm_beam.embedding.embed_pool import EmbedAndScore
from cm_beam.errors import InputError
from cm_beam.embedding.image_sources import inspect_pool, ReadImagePool
from cm_beam.embedding.keras_model_handler import output_schema
from pipelines import embed_pool
from tests.conftest import beam_args, keras_trunk

SIZE = 16
ATOL = 1e-5


# ---------------------------------------------------------------------------
# Fixtures: models, images and pools, built once per module.


def _trunk():
    return keras_trunk(SIZE, scale=1 / 127.5, offset=-1, filters=6, emb_units=8, emb_activation="tanh")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    keras.utils.set_random_seed(11)
    d = tmp_path_factory.mktemp("models")
    inputs, x = _trunk()
    classifier = keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="head")(x))
    classifier.save(d / "classifier.keras")
    inputs, x = _trunk()
    probs = keras.layers.Dense(4, activation="sigmoid", name="head")(x)
    keras.Model(inputs, {"embedding": x, "probs": probs}).save(d / "multilabel_dict.keras")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3, activation="relu")(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(d / "lambda.keras")
    return {
        "classifier": str(d / "classifier.keras"),
        "multilabel_dict": str(d / "multilabel_dict.keras"),
        "lambda": str(d / "lambda.keras"),
    }


def _encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    """{example_id: bytes} of good images of every format and size, and of bad ones."""
    rng = np.random.default_rng(7)
    good = {}
    for i in range(26):
        h, w = rng.integers(6, 40, size=2)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = i % 5
        if kind == 0:
            data = tf.io.encode_png(rgb).numpy()
        elif kind == 1:
            data = tf.io.encode_jpeg(rgb, quality=90).numpy()
        elif kind == 2:
            data = _encode(rgb, "GIF")
        elif kind == 3:
            data = _encode(rgb, "BMP")
        else:
            data = tf.io.encode_png(rgb[..., :1]).numpy()  # grayscale
        good[f"img-{i:03d}"] = data
    jpeg = good["img-001"]
    bad = {
        "bad-corrupt": bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        "bad-truncated-jpeg": jpeg[: len(jpeg) // 2],
        "bad-truncated-png": good["img-000"][:40],
        "bad-empty": b"",
        "bad-text": b"example_id,uri\nthis is a CSV, not an image\n",
    }
    return good, bad


@pytest.fixture(scope="module")
def manifest_pool(tmp_path_factory, images):
    good, bad = images
    d = tmp_path_factory.mktemp("manifest_pool")
    (d / "img").mkdir()
    ids, uris = [], []
    for k, data in {**good, **bad}.items():
        (d / "img" / f"{k}.bin").write_bytes(data)
        ids.append(k)
        uris.append(f"img/{k}.bin")
    ids.append("bad-missing")
    uris.append("img/does-not-exist.png")
    order = np.random.default_rng(0).permutation(len(ids))  # bad rows spread among good ones
    pq.write_table(
        pa.table({"example_id": [ids[i] for i in order], "uri": [uris[i] for i in order]}),
        d / "manifest.parquet",
        row_group_size=12,
    )
    return str(d / "manifest.parquet")


def _masked_crc(data):
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data):
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _example(example_id, image):
    ex = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image/source_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[example_id.encode()])),
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            }
        )
    )
    return ex.SerializeToString()


@pytest.fixture(scope="module")
def tfrecord_pool(tmp_path_factory, images):
    good, bad = images
    d = tmp_path_factory.mktemp("tfrecord_pool")
    items = list(good.items())
    with tf.io.TFRecordWriter(str(d / "pool-0.tfrecord")) as w:
        for k, data in items[:13]:
            w.write(_example(k, data))
        w.write(_example("bad-corrupt", bad["bad-corrupt"]))
    with open(d / "pool-1.tfrecord", "wb") as f:
        for k, data in items[13:]:
            f.write(_record(_example(k, data)))
        f.write(_record(_example("bad-lost", good["img-000"]))[:-7])  # file cut short
    return str(d / "pool-*.tfrecord")


@pytest.fixture(scope="module")
def parquet_pool(tmp_path_factory, images):
    good, bad = images
    d = tmp_path_factory.mktemp("parquet_pool")
    ids = list(good) + ["bad-truncated-png", "bad-null"]
    data = list(good.values()) + [bad["bad-truncated-png"], None]
    pq.write_table(pa.table({"example_id": ids, "pixels": pa.array(data, pa.binary())}), d / "pool.parquet", row_group_size=10)
    return str(d / "pool.parquet")


# ---------------------------------------------------------------------------
# The independent reference.


def _decode_reference(data):
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.image.resize(image, [SIZE, SIZE], method="bilinear").numpy()


def _reference(model_path, good, embedding_layer=None, unsafe=False):
    model = keras.saving.load_model(model_path, safe_mode=not unsafe)
    ids = sorted(good)
    x = np.stack([_decode_reference(good[k]) for k in ids])
    out = model.predict(x, verbose=0)
    if isinstance(out, dict):
        return ids, out["embedding"], out["probs"]
    layer = model.get_layer(embedding_layer) if embedding_layer else model.layers[-2]
    embedding = keras.Model(model.inputs, layer.output).predict(x, verbose=0)
    return ids, embedding, out


def _read_sorted(pattern):
    table = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(pattern))])
    return table.sort_by("example_id")


def _run(pool, model, out_dir, *extra, workers=1):
    argv = ["--pool", pool, "--model", model, "--output_dir", str(out_dir), "--image_size", str(SIZE)]
    return embed_pool.run(argv + list(extra) + beam_args(workers))


def _check_against_reference(out_dir, ids, embedding, probs, multilabel=False, keep_probs=False):
    table = _read_sorted(os.path.join(out_dir, "embeddings-*.parquet"))
    assert table.schema == output_schema(keep_probs)
    assert table.column("example_id").to_pylist() == ids
    got_embedding = np.stack(table.column("embedding").to_pylist())
    np.testing.assert_allclose(got_embedding, embedding, atol=ATOL, rtol=0)
    p = probs.astype(np.float64)
    if multilabel:
        margin = np.abs(2 * p - 1).min(axis=1)
        entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p)).sum(axis=1)
    else:
        s = np.sort(p, axis=1)
        margin = s[:, -1] - s[:, -2]
        entropy = -(p * np.log(p)).sum(axis=1)
    np.testing.assert_allclose(table.column("margin").to_numpy(), margin, atol=ATOL, rtol=0)
    np.testing.assert_allclose(table.column("entropy").to_numpy(), entropy, atol=ATOL, rtol=0)
    assert table.column("predicted_class").to_pylist() == probs.argmax(axis=1).tolist()
    if keep_probs:
        np.testing.assert_allclose(np.stack(table.column("probs").to_pylist()), probs, atol=ATOL, rtol=0)
    return table


def _rejected(out_dir):
    table = _read_sorted(os.path.join(out_dir, "rejected-*.parquet"))
    return {r["example_id"]: (r["uri"], r["reason"]) for r in table.to_pylist()}


# ---------------------------------------------------------------------------


def test_manifest_pool_matches_predict_and_rejects_bad_files(tmp_path, models, images, manifest_pool):
    good, bad = images
    out = tmp_path / "out"
    summary = _run(manifest_pool, models["classifier"], out, "--keep_probs", "--inference_batch_size", "8")
    ids, embedding, probs = _reference(models["classifier"], good)
    _check_against_reference(str(out), ids, embedding, probs, keep_probs=True)

    rejected = _rejected(str(out))
    assert set(rejected) == set(bad) | {"bad-missing"}
    assert "cannot read" in rejected["bad-missing"][1] and rejected["bad-missing"][0].endswith("does-not-exist.png")
    assert rejected["bad-empty"][1] == "empty file"
    for k in ("bad-corrupt", "bad-truncated-jpeg", "bad-truncated-png", "bad-text"):
        assert rejected[k][1].startswith("cannot decode image"), (k, rejected[k])

    manifest = artifacts.read_manifest(str(out))
    assert manifest == json.loads(json.dumps(summary, default=str)) | {
        "completed_at": manifest["completed_at"], "versions": manifest["versions"]}
    assert manifest["counts"] == {"read": len(good) + len(bad) + 1, "embedded": len(good), "rejected": len(bad) + 1}
    assert manifest["model_fingerprint"] == hashlib.sha256(open(models["classifier"], "rb").read()).hexdigest()
    assert manifest["input_fingerprint"]["sha256"] and manifest["images_per_s"] > 0
    assert manifest["parameters"]["image_size"] == SIZE and manifest["model"]["embedding_layer"] == "emb"


@pytest.mark.slow
def test_one_and_two_workers_give_identical_output(tmp_path, models, manifest_pool):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(manifest_pool, models["classifier"], one, "--inference_batch_size", "8")
    _run(manifest_pool, models["classifier"], two, "--inference_batch_size", "8", workers=2)
    assert _read_sorted(str(one / "embeddings-*.parquet")).equals(_read_sorted(str(two / "embeddings-*.parquet")))
    assert _rejected(str(one)) == _rejected(str(two))


def test_tfrecord_pool_with_a_named_embedding_layer(tmp_path, models, images, tfrecord_pool):
    good, _ = images
    out = tmp_path / "out"
    summary = _run(tfrecord_pool, models["classifier"], out, "--embedding_layer", "pool", "--inference_batch_size", "5")
    ids, embedding, probs = _reference(models["classifier"], good, embedding_layer="pool")
    assert embedding.shape[1] == 6  # the pooling layer, not the default "emb"
    _check_against_reference(str(out), ids, embedding, probs)
    rejected = _rejected(str(out))
    assert rejected["bad-corrupt"][1].startswith("cannot decode image")
    lost = [v for k, v in rejected.items() if k != "bad-corrupt"]
    assert len(lost) == 1 and "unreadable from record 13" in lost[0][1] and lost[0][0].endswith("pool-1.tfrecord#record=13")
    assert summary["counts"] == {"read": len(good) + 2, "embedded": len(good), "rejected": 2}


def test_parquet_pool_multilabel_dict_model(tmp_path, models, images, parquet_pool):
    good, _ = images
    out = tmp_path / "out"
    summary = _run(parquet_pool, models["multilabel_dict"], out, "--multilabel", "--image_column", "pixels")
    ids, embedding, probs = _reference(models["multilabel_dict"], good)
    _check_against_reference(str(out), ids, embedding, probs, multilabel=True)
    rejected = _rejected(str(out))
    assert rejected["bad-null"][1] == "null pixels"
    assert rejected["bad-truncated-png"][1].startswith("cannot decode image")
    assert summary["model"]["outputs"] == "dict" and summary["pool"]["format"] == "parquet"


def test_safe_mode_refuses_a_lambda_model_before_any_work(tmp_path, models, images, parquet_pool):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="--unsafe_model"):
        _run(parquet_pool, models["lambda"], out, "--image_column", "pixels")
    assert not out.exists()  # failed before the output directory was touched
    summary = _run(parquet_pool, models["lambda"], out, "--image_column", "pixels", "--unsafe_model")
    good, _ = images
    ids, embedding, probs = _reference(models["lambda"], good, unsafe=True)
    _check_against_reference(str(out), ids, embedding, probs)
    assert summary["counts"]["embedded"] == len(good)


def test_bad_flags_fail_before_any_work(tmp_path, models, manifest_pool):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(InputError, match="--output_dir"):
        _run(manifest_pool, models["classifier"], out)
    with pytest.raises(InputError, match="--embedding_layer"):
        _run(manifest_pool, models["classifier"], tmp_path / "o2", "--embedding_layer", "conv")
    with pytest.raises(InputError, match="--pool"):
        _run(str(tmp_path / "nothing-*.parquet"), models["classifier"], tmp_path / "o3")
    with pytest.raises(SystemExit):
        _run(manifest_pool, models["classifier"], tmp_path / "o4", "--image_size", "0")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_embed_and_score_transform_in_process(models, images, manifest_pool):
    """The nightly pipeline's way in: the PTransform on pool blocks, outputs as PCollections."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    good, bad = images
    pool = inspect_pool(manifest_pool)
    with beam.Pipeline(argv=beam_args(1)) as p:
        results = p | ReadImagePool(pool, block_rows=16) | EmbedAndScore(models["classifier"], SIZE)
        ids = results["embeddings"] | "Ids" >> beam.FlatMap(lambda b: b.column("example_id").to_pylist())
        assert_that(ids, equal_to(sorted(good)), label="AllGood")
        bad_ids = results["rejected"] | "BadIds" >> beam.FlatMap(lambda b: b.column("example_id").to_pylist())
        assert_that(bad_ids, equal_to(sorted(set(bad) | {"bad-missing"})), label="AllBad")


def test_model_is_loaded_once_per_worker_process(tmp_path, monkeypatch, models, manifest_pool):
    """Many blocks, one load: the model is loaded in RunInference's setup (Beam's per-process
    shared cache), never per block or per model call."""
    from cm_beam.embedding import keras_model_handler

    loads = []
    original = keras_model_handler.KerasModelHandler.load_model

    def counting_load(self):
        loads.append(os.getpid())
        return original(self)

    monkeypatch.setattr(keras_model_handler.KerasModelHandler, "load_model", counting_load)
    summary = _run(manifest_pool, models["classifier"], tmp_path / "out", "--inference_batch_size", "2")
    assert summary["counts"]["embedded"] >= 10 * 2  # at least ten model calls
    assert loads == [os.getpid()]  # in-process runner: this process, once


def test_decompression_bombs_become_dead_letter_rows(tmp_path, models, images):
    """A 20000 x 20000 PNG and JPEG (headers crafted, pixels never allocated) in a pool:
    rejected with the reason, the good images embedded as without them."""
    from tests.test_image_decode import bomb_jpeg, bomb_png

    good, _ = images
    keep = dict(list(good.items())[:6])
    (tmp_path / "img").mkdir()
    rows = {**keep, "bomb-png": bomb_png(20000, 20000), "bomb-jpeg": bomb_jpeg(20000, 20000)}
    for k, data in rows.items():
        (tmp_path / "img" / f"{k}.bin").write_bytes(data)
    pq.write_table(pa.table({"example_id": list(rows), "uri": [f"img/{k}.bin" for k in rows]}), tmp_path / "pool.parquet")
    summary = _run(str(tmp_path / "pool.parquet"), models["classifier"], tmp_path / "out")
    assert summary["counts"] == {"read": 8, "embedded": 6, "rejected": 2}
    rejected = _rejected(str(tmp_path / "out"))
    for k in ("bomb-png", "bomb-jpeg"):
        assert rejected[k][1].startswith("image too large:") and "20000 x 20000" in rejected[k][1], rejected[k]
    ids, embedding, probs = _reference(models["classifier"], keep)
    _check_against_reference(str(tmp_path / "out"), ids, embedding, probs)
    # --max_image_pixels is the limit: with 1 every image is refused before decoding.
    summary = _run(str(tmp_path / "pool.parquet"), models["classifier"], tmp_path / "out1", "--max_image_pixels", "1")
    assert summary["counts"] == {"read": 8, "embedded": 0, "rejected": 8}
    assert all(r[1].startswith("image too large:") for r in _rejected(str(tmp_path / "out1")).values())


def test_a_file_that_is_not_a_keras_archive_is_named_as_such(tmp_path, manifest_pool):
    fake = tmp_path / "model.keras"
    fake.write_text("not a model")
    with pytest.raises(InputError, match=r"--model: cannot load .*model.keras: it is not a Keras 3 `.keras` file \(a zip archive\)"):
        _run(manifest_pool, str(fake), tmp_path / "out")
    assert not (tmp_path / "out").exists()
