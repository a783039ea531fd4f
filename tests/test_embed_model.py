"""The Keras model contract, safe mode, the RunInference handler and block scoring."""

import hashlib

import numpy as np
import pyarrow as pa
import pytest

import keras  # noqa: E402

from cm_beam.embedding import keras_model_handler as kmh
from cm_beam.errors import InputError
from tests.conftest import keras_trunk

SIZE = 16


def _trunk():
    return keras_trunk(SIZE, scale=1 / 255.0, filters=4, emb_units=6, emb_activation="relu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    keras.utils.set_random_seed(3)
    d = tmp_path_factory.mktemp("models")
    paths = {}

    inputs, x = _trunk()
    paths["classifier"] = d / "classifier.keras"
    keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="head")(x)).save(paths["classifier"])

    inputs, x = _trunk()
    paths["logits"] = d / "logits.keras"
    keras.Model(inputs, keras.layers.Dense(5, name="head")(x)).save(paths["logits"])

    inputs, x = _trunk()
    paths["multilabel"] = d / "multilabel.keras"
    keras.Model(inputs, keras.layers.Dense(4, activation="sigmoid", name="head")(x)).save(paths["multilabel"])

    inputs, x = _trunk()
    probs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    paths["dict"] = d / "dict.keras"
    keras.Model(inputs, {"embedding": x, "probs": probs}).save(paths["dict"])

    inputs, x = _trunk()
    paths["bad_dict"] = d / "bad_dict.keras"
    keras.Model(inputs, {"features": x, "probs": keras.layers.Dense(3, activation="softmax")(x)}).save(paths["bad_dict"])

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0, name="scale")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(4, activation="relu")(x)
    paths["lambda"] = d / "lambda.keras"
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(paths["lambda"])

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    paths["fixed8"] = d / "fixed8.keras"
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(paths["fixed8"])
    return {k: str(v) for k, v in paths.items()}


def test_plain_classifier_taps_the_layer_before_the_last(models):
    c = kmh.check_model(models["classifier"], SIZE)
    assert (c.outputs, c.embedding_layer, c.embedding_dim, c.num_classes) == ("tapped", "emb", 6, 5)
    assert c.fingerprint == hashlib.sha256(open(models["classifier"], "rb").read()).hexdigest()
    named = kmh.check_model(models["classifier"], SIZE, embedding_layer="pool")
    assert (named.embedding_layer, named.embedding_dim) == ("pool", 4)


def test_dict_model(models):
    c = kmh.check_model(models["dict"], SIZE)
    assert (c.outputs, c.embedding_layer, c.embedding_dim, c.num_classes) == ("dict", None, 6, 3)


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        ("logits", {}, "not probabilities.*softmax"),
        ("multilabel", {}, "--multilabel"),  # sigmoids without --multilabel do not sum to 1
        ("bad_dict", {}, "keys 'embedding' and 'probs'"),
        ("dict", {"embedding_layer": "pool"}, "--embedding_layer"),
        ("classifier", {"embedding_layer": "nope"}, "--embedding_layer: the model has no layer 'nope'"),
        ("classifier", {"embedding_layer": "conv"}, "--embedding_layer: layer 'conv' gives shape"),
        ("fixed8", {}, "--image_size: the model's input is 8x8"),
    ],
)
def test_contract_violations_fail_with_a_message(models, model, kwargs, message):
    with pytest.raises(InputError, match=message):
        kmh.check_model(models[model], SIZE, **kwargs)


def test_multilabel_model_passes_with_multilabel(models):
    c = kmh.check_model(models["multilabel"], SIZE, multilabel=True)
    assert c.num_classes == 4


def test_safe_mode_refuses_lambda_unless_unsafe(models):
    with pytest.raises(InputError, match="--model.*safe_mode.*--unsafe_model"):
        kmh.check_model(models["lambda"], SIZE)
    c = kmh.check_model(models["lambda"], SIZE, unsafe=True)
    assert c.unsafe and c.embedding_dim == 4


def test_missing_or_wrong_file(tmp_path):
    with pytest.raises(InputError, match="--model: .* does not exist"):
        kmh.check_model(str(tmp_path / "none.keras"), SIZE)
    (tmp_path / "m.h5").write_bytes(b"")
    with pytest.raises(InputError, match="--model: expected a Keras 3 `.keras` file"):
        kmh.check_model(str(tmp_path / "m.h5"), SIZE)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="--model: cannot load"):
        kmh.check_model(str(tmp_path / "junk.keras"), SIZE)


def test_handler_runs_one_call_per_block_and_matches_predict(models):
    contract = kmh.check_model(models["classifier"], SIZE)
    handler = kmh.KerasModelHandler(contract)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 1}
    loaded = handler.load_model()
    rng = np.random.default_rng(0)
    blocks = [rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32) for n in (3, 5)]
    results = list(handler.run_inference(blocks, loaded))
    model = keras.saving.load_model(models["classifier"])
    tap = keras.Model(model.inputs, model.get_layer("emb").output)
    for block, result in zip(blocks, results):
        np.testing.assert_allclose(result.inference["probs"], model.predict(block, verbose=0), atol=1e-5)
        np.testing.assert_allclose(result.inference["embedding"], tap.predict(block, verbose=0), atol=1e-5)
    assert handler.get_num_bytes(blocks) == sum(b.nbytes for b in blocks)


def test_score_block_against_numpy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(7, 4))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    probs[2] = np.nan  # a broken model output is rejected, not written
    emb = rng.normal(size=(7, 3)).astype(np.float32)
    emb[4, 1] = np.inf
    ids = np.array([f"id{i}" for i in range(7)], dtype=object)
    uris = np.array([f"u{i}" for i in range(7)], dtype=object)
    rows, rejected = kmh.score_block(ids, uris, emb, probs, keep_probs=True)
    assert rows.schema == kmh.output_schema(True)
    keep = [0, 1, 3, 5, 6]
    assert rows.column("example_id").to_pylist() == [f"id{i}" for i in keep]
    s = np.sort(probs[keep], axis=1)
    np.testing.assert_allclose(rows.column("margin").to_numpy(), s[:, -1] - s[:, -2], atol=1e-6)
    p = probs[keep].astype(np.float64)
    np.testing.assert_allclose(rows.column("entropy").to_numpy(), -(p * np.log(p)).sum(1), atol=1e-5)
    assert rows.column("predicted_class").to_pylist() == probs[keep].argmax(1).tolist()
    np.testing.assert_array_equal(np.stack(rows.column("embedding").to_pylist()), emb[keep])
    np.testing.assert_array_equal(np.stack(rows.column("probs").to_pylist()), probs[keep])
    assert rejected.schema == kmh.REJECTED_SCHEMA
    assert rejected.column("example_id").to_pylist() == ["id2", "id4"]
    assert "NaN" in rejected.column("reason")[0].as_py() and "embedding" in rejected.column("reason")[1].as_py()

    ml = rng.uniform(size=(5, 3)).astype(np.float32)
    rows, rejected = kmh.score_block(ids[:5], uris[:5], np.ones((5, 2), np.float32), ml,
                                     multilabel=True, margin_reduce="mean")
    assert rejected is None
    np.testing.assert_allclose(rows.column("margin").to_numpy(), np.abs(2 * ml - 1).mean(1), atol=1e-6)
    ent = -(ml * np.log(ml) + (1 - ml) * np.log(1 - ml)).sum(1)
    np.testing.assert_allclose(rows.column("entropy").to_numpy(), ent, atol=1e-5)
    assert rows.schema == kmh.output_schema(False)
