"""Embed and score an image pool with the team's Keras model: the `EmbedAndScore` API.

This is the first stage of every Cluster-Margin run and where most of the compute
goes. It takes pool blocks (see `cm_beam.embedding.image_sources`: Arrow record batches of
example_id, uri, image bytes) and gives, per image, the model's embedding (for
clustering) and its uncertainty (for selection):

    example_id string, embedding list<float32>, margin float32,
    predicted_class int32, entropy float32 [, probs list<float32>]

plus a `rejected` output (example_id, uri, reason) for every image that could not
be read or decoded, or whose model output is not a probability vector. A bad image
never fails the job; a model that does not fit the contract (see
`cm_beam.embedding.keras_model_handler`) fails in the constructor, before any image is read.

Stages, all on blocks (never one Python object per image):

1. `FetchAndDecode`: reads the bytes of uri-only rows (thread pool), decodes a block
   of images with one compiled TF call into a (n, size, size, 3) float32 array.
2. `RunInference`: Beam's RunInference with a `KeyedModelHandler` around our
   `KerasModelHandler`; the key is the block's (example_ids, uris); one model call
   per block; the model is loaded once per worker process.
3. `Score`: margin / entropy / predicted class from `cm_beam.selection.uncertainty`, as an
   Arrow record batch.

Usage (the nightly pipeline runs it in-process like this):

    pool = image_sources.inspect_pool("gs://b/pool/*.tfrecord")
    results = (
        pipeline
        | image_sources.ReadImagePool(pool, block_rows=64)
        | EmbedAndScore("gs://b/model.keras", image_size=224, inference_batch_size=64))
    results["embeddings"] | table_io.WriteTableBlocks(out + "/embeddings", output_schema())
    results["rejected"] | table_io.WriteTableBlocks(out + "/rejected", REJECTED_SCHEMA)
"""

from __future__ import annotations

from typing import Dict, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from cm_beam.embedding import image_sources
from cm_beam.errors import check_choice, check_int
from cm_beam.embedding.image_decode import DEFAULT_MAX_IMAGE_PIXELS, ImageDecoder, configure_threads
from cm_beam.embedding.keras_model_handler import (
    MARGIN_REDUCES,
    REJECTED_SCHEMA,
    KerasModelHandler,
    ModelContract,
    check_model,
    output_schema,
    score_block,
)

__all__ = ["EmbedAndScore", "output_schema", "REJECTED_SCHEMA"]

METRICS_NAMESPACE = "cm_embed"
DEFAULT_INFERENCE_BATCH_SIZE = 64


def _rejected(ids, uris, reasons) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(uris, pa.string()), pa.array(reasons, pa.string())],
        schema=REJECTED_SCHEMA,
    )


class _FetchAndDecode(beam.DoFn):
    """Pool block -> ((ids, uris), images float32[n, s, s, 3]) chunks + tagged rejected rows."""

    def __init__(self, image_size: int, chunk_rows: int, fetch_threads: int, intra_op_threads: int,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self._image_size = image_size
        self._max_pixels = max_image_pixels
        self._chunk_rows = chunk_rows
        self._fetch_threads = fetch_threads
        self._intra = intra_op_threads
        self._read = Metrics.counter(METRICS_NAMESPACE, "images_read")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "images_rejected_input")

    def setup(self):
        # Thread pools must be fixed before this process's first TF op (the decode).
        configure_threads(self._intra)
        self._decoder = ImageDecoder(self._image_size, self._max_pixels)

    def process(self, block: pa.RecordBatch):
        for start in range(0, block.num_rows, self._chunk_rows):
            chunk = block.slice(start, self._chunk_rows)
            self._read.inc(chunk.num_rows)
            ids = np.array(chunk.column(0).to_pylist(), dtype=object)
            uris = np.array(chunk.column(1).to_pylist(), dtype=object)
            encoded, errors = image_sources.fetch_images(chunk, self._fetch_threads)
            images, ok, reasons = self._decoder.decode([e if err is None else None for e, err in zip(encoded, errors)])
            if not ok.all():
                bad = np.flatnonzero(~ok)
                self._rejected.inc(len(bad))
                yield beam.pvalue.TaggedOutput(
                    "rejected", _rejected(ids[bad].tolist(), uris[bad].tolist(), [errors[i] or reasons[i] or "unknown error" for i in bad])
                )
            if ok.any():
                yield (ids[ok], uris[ok]), images


class _Score(beam.DoFn):
    def __init__(self, multilabel: bool, margin_reduce: str, keep_probs: bool):
        self._multilabel = multilabel
        self._reduce = margin_reduce
        self._keep_probs = keep_probs
        self._embedded = Metrics.counter(METRICS_NAMESPACE, "images_embedded")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "images_rejected_output")

    def process(self, keyed):
        (ids, uris), prediction = keyed
        out = prediction.inference
        rows, rejected = score_block(
            ids, uris, out["embedding"], out["probs"], self._multilabel, self._reduce, self._keep_probs
        )
        self._embedded.inc(rows.num_rows)
        if rejected is not None:
            self._rejected.inc(rejected.num_rows)
            yield beam.pvalue.TaggedOutput("rejected", rejected)
        if rows.num_rows:
            yield rows


class EmbedAndScore(beam.PTransform):
    """Pool blocks -> {"embeddings": PCollection[pa.RecordBatch], "rejected": PCollection[pa.RecordBatch]}.

    Args:
      model: path (local or gs://) of the `.keras` model file.
      image_size: decoded images are resized to image_size x image_size.
      embedding_layer: for a plain classifier, the layer whose output is the
        embedding (default: the layer before the last). Not allowed for dict models.
      multilabel: probs are independent sigmoids; margin is min (or mean, see
        `margin_reduce`) over classes of |2p - 1|, entropy the sum of binary entropies.
      keep_probs: also output the probability vector.
      inference_batch_size: images per model call (and per decode call).
      unsafe_model: load the model without Keras safe_mode (trusted files only).
      intra_op_threads: TensorFlow intra-op threads per worker process (0 = TF default).
      fetch_threads: concurrent reads of uri-only rows per worker process.
      contract: a `ModelContract` from `check_model` if the caller already checked the model.

    Example:
        results = blocks | EmbedAndScore("model.keras", image_size=128)
        embeddings, rejected = results["embeddings"], results["rejected"]
    """

    def __init__(
        self,
        model: str,
        image_size: int,
        embedding_layer: Optional[str] = None,
        multilabel: bool = False,
        keep_probs: bool = False,
        inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
        unsafe_model: bool = False,
        margin_reduce: str = "min",
        intra_op_threads: int = 0,
        fetch_threads: int = image_sources.DEFAULT_FETCH_THREADS,
        contract: Optional[ModelContract] = None,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        check_int("image_size", image_size)
        check_int("inference_batch_size", inference_batch_size)
        check_choice("margin_reduce", margin_reduce, MARGIN_REDUCES)
        check_int("intra_op_threads", intra_op_threads, low=0)
        check_int("fetch_threads", fetch_threads)
        if contract is None:
            contract = check_model(model, int(image_size), embedding_layer, multilabel, unsafe_model)
        elif contract.path != model or contract.image_size != int(image_size):
            raise ValueError("contract was checked for a different model path or image_size")
        self.contract = contract
        self._image_size = int(image_size)
        self._multilabel = bool(multilabel)
        self._keep_probs = bool(keep_probs)
        self._batch = int(inference_batch_size)
        self._reduce = margin_reduce
        self._intra = int(intra_op_threads)
        self._fetch_threads = int(fetch_threads)
        self._max_pixels = max_image_pixels

    def expand(self, blocks) -> Dict[str, beam.PCollection]:
        decoded = blocks | "FetchAndDecode" >> beam.ParDo(
            _FetchAndDecode(self._image_size, self._batch, self._fetch_threads, self._intra, self._max_pixels)
        ).with_outputs("rejected", main="images")
        handler = KeyedModelHandler(KerasModelHandler(self.contract, intra_op_threads=self._intra))
        scored = (
            decoded.images
            | "RunInference" >> RunInference(handler)
            | "Score" >> beam.ParDo(_Score(self._multilabel, self._reduce, self._keep_probs)).with_outputs(
                "rejected", main="embeddings"
            )
        )
        rejected = (decoded.rejected, scored.rejected) | "Rejected" >> beam.Flatten()
        return {"embeddings": scored.embeddings, "rejected": rejected}
