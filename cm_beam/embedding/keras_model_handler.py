"""The team's Keras model under RunInference: the model contract, loading, and scoring.

Model contract (checked by `check_model` before any image is read):

* a `.keras` file (Keras 3 format), loaded with `safe_mode=True` unless the caller
  passes `unsafe=True` (`--unsafe_model`): safe mode refuses to deserialise Python
  code (e.g. `Lambda` layers), which a model file from elsewhere could carry;
* one image input of shape (batch, height, width, 3) taking float32 RGB in
  [0, 255] (normalisation belongs in the model); fixed height/width must equal
  `--image_size`;
* outputs, either
  - a dict with `embedding` (batch, d) and `probs` (batch, classes), or
  - one tensor of class probabilities (batch, classes): a plain classifier. Its
    embedding is then the output of the layer named by `--embedding_layer`, by
    default the layer before the last (the penultimate layer of the paper);
* `probs` are probabilities: softmax rows summing to 1, or with `--multilabel`
  independent sigmoids in [0, 1]. Probed on two synthetic images at check time, so
  logits or a missing `--multilabel` fail at once rather than after hours.

`KerasModelHandler` is a Beam `ModelHandler` of ours (Beam's TensorFlow handler
imports tensorflow_hub, which does not import under TF 2.21; docs/design.md, "Data
contracts", the model contract): it loads the model once per worker process
(RunInference keeps it in Beam's per-process `Shared` cache), takes pre-batched
blocks of decoded images and runs one compiled model call per block. `score_block`
turns a block's outputs into the output rows with `cm_beam.selection.uncertainty`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from cm_beam.selection import uncertainty
from cm_beam.errors import InputError

_LOG = logging.getLogger(__name__)

MARGIN_REDUCES = uncertainty.MULTILABEL_REDUCES


@dataclasses.dataclass(frozen=True)
class ModelContract:
    """What `check_model` learned about a model; travels with the pipeline."""

    path: str
    fingerprint: str  # sha256 of the .keras file bytes
    image_size: int
    embedding_dim: int
    num_classes: int
    outputs: str  # "dict" or "tapped"
    embedding_layer: Optional[str]  # the tapped layer's name, for "tapped"
    unsafe: bool


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with FileSystems.open(path, compression_type="uncompressed") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_keras_model(path: str, unsafe: bool = False, flag: str = "--model"):
    """Loads a `.keras` file from any Beam filesystem (copied to a local temp file)."""
    import keras

    if not path.endswith(".keras"):
        raise InputError(f"{flag}: expected a Keras 3 `.keras` file, got {path}")
    if not FileSystems.exists(path):
        raise InputError(f"{flag}: {path} does not exist")
    with FileSystems.open(path, compression_type="uncompressed") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        # Keras would say "File not found" for a file that exists but is no zip archive.
        what = "an empty file" if not head else f"a file starting with bytes {head!r}"
        raise InputError(f"{flag}: cannot load {path}: it is not a Keras 3 `.keras` file (a zip archive) but {what}")
    local, tmp = path, None
    if "://" in path:
        fd, tmp = tempfile.mkstemp(suffix=".keras")
        with os.fdopen(fd, "wb") as out, FileSystems.open(path, compression_type="uncompressed") as src:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                out.write(chunk)
        local = tmp
    try:
        return keras.saving.load_model(local, compile=False, safe_mode=not unsafe)
    except ValueError as e:
        if not unsafe and ("safe_mode" in str(e) or "unsafe" in str(e).lower()):
            raise InputError(
                f"{flag}: {path} needs Python code to load (e.g. a Lambda layer), which Keras "
                f"safe_mode refuses; pass --unsafe_model only if you trust this file. Keras said: "
                f"{str(e).splitlines()[0][:400]}"
            ) from None
        raise InputError(f"{flag}: cannot load {path}: {str(e)[:600]}") from None
    except Exception as e:
        raise InputError(f"{flag}: cannot load {path}: {type(e).__name__}: {str(e)[:600]}") from None
    finally:
        if tmp:
            os.unlink(tmp)


def _embed_model(model, embedding_layer: Optional[str], flag: str = "--embedding_layer"):
    """Returns (callable model with dict outputs, kind, tapped layer name)."""
    import keras

    outputs = model.outputs if hasattr(model, "outputs") else None
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        missing = [k for k in ("embedding", "probs") if k not in struct]
        if missing:
            raise InputError(
                f"--model: the model returns a dict with keys {sorted(struct)}; the contract expects "
                f"keys 'embedding' and 'probs' (missing {missing})"
            )
        if embedding_layer:
            raise InputError(f"{flag}: the model already returns a dict with 'embedding'; do not pass {flag}")
        return model, "dict", None  # extra outputs, if any, are computed and ignored
    if outputs is None or not outputs:
        raise InputError(
            "--model: cannot see the model's graph (a subclassed model?); the contract expects a "
            "functional/Sequential classifier or a model returning a dict with 'embedding' and 'probs'"
        )
    if len(outputs) != 1:
        raise InputError(
            f"--model: the model has {len(outputs)} outputs; the contract expects one output of class "
            f"probabilities (and --embedding_layer), or a dict with 'embedding' and 'probs'"
        )
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    if embedding_layer:
        names = [l.name for l in model.layers]
        if embedding_layer not in names:
            raise InputError(f"{flag}: the model has no layer '{embedding_layer}' (layers: {', '.join(names)})")
        layer = model.get_layer(embedding_layer)
    else:
        if len(layers) < 2:
            raise InputError(f"--model: the classifier has a single layer; name an embedding layer with {flag}")
        layer = layers[-2]
    try:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        tapped = keras.Model(inputs, {"embedding": layer.output, "probs": outputs[0]})
    except Exception as e:
        raise InputError(f"{flag}: cannot tap layer '{layer.name}': {e}") from None
    return tapped, "tapped", layer.name


def check_model(
    path: str,
    image_size: int,
    embedding_layer: Optional[str] = None,
    multilabel: bool = False,
    unsafe: bool = False,
) -> ModelContract:
    """Loads the model once and checks it against the contract; raises InputError naming the flag."""
    model = load_keras_model(path, unsafe)
    embed_model, kind, tapped = _embed_model(model, embedding_layer)
    inputs = embed_model.inputs
    if len(inputs) != 1:
        raise InputError(f"--model: the model has {len(inputs)} inputs; the contract expects one image input")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[3] not in (3, None):
        raise InputError(f"--model: input shape {shape}; the contract expects (batch, height, width, 3) RGB images")
    for dim in shape[1:3]:
        if dim is not None and dim != image_size:
            raise InputError(
                f"--image_size: the model's input is {shape[1]}x{shape[2]} but --image_size is {image_size}"
            )
    rng = np.random.default_rng(0)
    probe = np.stack(
        [np.zeros((image_size, image_size, 3), np.float32), rng.uniform(0, 255, (image_size, image_size, 3)).astype(np.float32)]
    )
    out = embed_model(probe, training=False)
    import keras

    embedding = keras.ops.convert_to_numpy(out["embedding"])
    probs = keras.ops.convert_to_numpy(out["probs"])
    if embedding.ndim != 2:
        where = f"layer '{tapped}'" if tapped else "output 'embedding'"
        raise InputError(
            f"{'--embedding_layer' if tapped else '--model'}: {where} gives shape {('batch',) + embedding.shape[1:]}; "
            f"the contract expects (batch, dim): tap a pooling or dense layer"
        )
    if probs.ndim != 2:
        raise InputError(f"--model: probabilities of shape {('batch',) + probs.shape[1:]}; the contract expects (batch, classes)")
    bad, reasons = uncertainty.validate_probs(probs, multilabel=multilabel)
    if bad.any():
        reason = reasons[np.flatnonzero(bad)[0]]
        hint = (
            "independent sigmoids in [0, 1]" if multilabel
            else "softmax probabilities (pass --multilabel for independent sigmoids)"
        )
        raise InputError(f"--model: on a probe image the output 'probs' is not probabilities ({reason}); the contract expects {hint}")
    return ModelContract(
        path=path,
        fingerprint=file_sha256(path),
        image_size=int(image_size),
        embedding_dim=int(embedding.shape[1]),
        num_classes=int(probs.shape[1]),
        outputs=kind,
        embedding_layer=tapped,
        unsafe=bool(unsafe),
    )


class LoadedEmbedModel:
    """A loaded model as a compiled function of a float32 image batch -> dict of numpy."""

    def __init__(self, embed_model, image_size: int):
        import tensorflow as tf

        self.model = embed_model
        # Traced for the first (full) block size with a static batch dimension, which
        # lets TensorFlow/oneDNN pick faster kernels (measured ~15-30% on MobileNetV2 at
        # batch 64 against a [None, ...] signature); smaller blocks (after rejections, at
        # the end of a file) share one generalised trace instead of retracing each time.
        # This is what Keras' own predict does.
        self._fn = tf.function(lambda x: embed_model(x, training=False), reduce_retracing=True)
        self._tf = tf

    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        out = self._fn(self._tf.convert_to_tensor(images, dtype=self._tf.float32))
        return {"embedding": out["embedding"].numpy(), "probs": out["probs"].numpy()}


class KerasModelHandler(ModelHandler[np.ndarray, PredictionResult, LoadedEmbedModel]):
    """RunInference handler: examples are blocks (n, size, size, 3) of decoded images.

    Each element is already a batch (RunInference is told to pass one at a time), so
    there is exactly one model call per block and no per-image Python work. Use it
    keyed, with the block's example ids as the key:

        RunInference(KeyedModelHandler(KerasModelHandler(contract)))
    """

    def __init__(self, contract: ModelContract, intra_op_threads: int = 0, inter_op_threads: int = 0):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self._contract = contract
        self._intra = int(intra_op_threads)
        self._inter = int(inter_op_threads)

    def load_model(self) -> LoadedEmbedModel:
        from cm_beam.embedding.image_decode import configure_threads

        configure_threads(self._intra, self._inter)
        c = self._contract
        model = load_keras_model(c.path, c.unsafe)
        embed_model, _, _ = _embed_model(model, c.embedding_layer if c.outputs == "tapped" else None)
        _LOG.info("loaded %s in process %d", c.path, os.getpid())
        return LoadedEmbedModel(embed_model, c.image_size)

    def run_inference(
        self, batch: Sequence[np.ndarray], model: LoadedEmbedModel, inference_args: Optional[Dict[str, Any]] = None
    ) -> Iterable[PredictionResult]:
        sizes = [len(b) for b in batch]
        images = batch[0] if len(batch) == 1 else np.concatenate(batch)
        out = model(images)
        results, start = [], 0
        for block, n in zip(batch, sizes):
            results.append(
                PredictionResult(
                    example=None,  # the pixels are not needed downstream; do not keep them alive
                    inference={k: v[start : start + n] for k, v in out.items()},
                )
            )
            start += n
        return results

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return int(sum(b.nbytes for b in batch))  # the default pickles the whole batch

    def get_metrics_namespace(self) -> str:
        return "cm_embed"


def output_schema(keep_probs: bool = False) -> pa.Schema:
    fields = [
        pa.field("example_id", pa.string()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("margin", pa.float32()),
        pa.field("predicted_class", pa.int32()),
        pa.field("entropy", pa.float32()),
    ]
    if keep_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
    return pa.schema(fields)


REJECTED_SCHEMA = pa.schema(
    [pa.field("example_id", pa.string()), pa.field("uri", pa.string()), pa.field("reason", pa.string())]
)


def _list_array(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def score_block(
    ids: np.ndarray,
    uris: np.ndarray,
    embedding: np.ndarray,
    probs: np.ndarray,
    multilabel: bool = False,
    margin_reduce: str = "min",
    keep_probs: bool = False,
) -> Tuple[pa.RecordBatch, Optional[pa.RecordBatch]]:
    """Output rows for a block of model outputs, and rejected rows (NaN or non-probabilities).

    margin: top1 - top2 (multi-class) or min/mean over classes of |2p - 1|
    (multi-label); entropy: nats (multi-label: sum of binary entropies);
    predicted_class: argmax of probs.
    """
    embedding = np.asarray(embedding, np.float32)
    probs = np.asarray(probs, np.float32)
    bad, reasons = uncertainty.validate_probs(probs, multilabel=multilabel)
    bad_embedding = ~np.isfinite(embedding).all(axis=1) & ~bad
    reasons[bad_embedding] = "embedding contains NaN or inf"
    bad = bad | bad_embedding
    rejected = None
    if bad.any():
        idx = np.flatnonzero(bad)
        rejected = pa.RecordBatch.from_arrays(
            [pa.array(ids[idx].tolist(), pa.string()), pa.array(uris[idx].tolist(), pa.string()),
             pa.array([f"model output: {r}" for r in reasons[idx]], pa.string())],
            schema=REJECTED_SCHEMA,
        )
        keep = ~bad
        ids, embedding, probs = ids[keep], embedding[keep], probs[keep]
    if multilabel:
        margins = uncertainty.multilabel_margin(probs, margin_reduce)
    else:
        margins = uncertainty.margin(probs)
    entropies = uncertainty.entropy(probs, multilabel=multilabel)
    predicted = probs.argmax(axis=1).astype(np.int32) if probs.shape[1] else np.zeros(len(ids), np.int32)
    columns = [
        pa.array(ids.tolist(), pa.string()),
        _list_array(embedding),
        pa.array(margins.astype(np.float32)),
        pa.array(predicted),
        pa.array(entropies.astype(np.float32)),
    ]
    if keep_probs:
        columns.append(_list_array(probs))
    return pa.RecordBatch.from_arrays(columns, schema=output_schema(keep_probs)), rejected
