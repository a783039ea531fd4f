"""`EmbedOptions`: every parameter of the embedding stage (cm-embed), validated here.

Frozen, and checked when built, so a bad value fails before the model is loaded or
any image read, naming the parameter (each is the cm-embed flag of the same name).
What needs the files themselves (the pool's columns, the model's contract) is
checked by `run_embed` before its job starts.

    options = EmbedOptions(pool="gs://b/pool/*.tfrecord", model="gs://b/model.keras",
                           output_dir="gs://b/embeddings/2026-11-21")
    manifest = run_embed(options, ["--runner=DataflowRunner", ...])   # cm_beam.embedding.stage
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from cm_beam.embedding import image_sources
from cm_beam.embedding.embed_pool import DEFAULT_INFERENCE_BATCH_SIZE
from cm_beam.embedding.image_decode import DEFAULT_MAX_IMAGE_PIXELS
from cm_beam.embedding.keras_model_handler import MARGIN_REDUCES
from cm_beam.errors import check_choice, check_int, check_required

POOL_FORMATS = image_sources.POOL_FORMATS
DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """The embedding stage: which pool (and its layout), which model and how to run it,
    and where embeddings-*.parquet, rejected-*.parquet and manifest.json go.

    pool_format None: inferred from the pool's names and columns. intra_op_threads
    None: cores / local worker processes on a local multi-process runner, else
    TensorFlow's default. num_shards 0: the runner chooses.
    """

    pool: str
    model: str
    output_dir: str
    pool_format: Optional[str] = None
    image_size: int = DEFAULT_IMAGE_SIZE
    embedding_layer: Optional[str] = None
    multilabel: bool = False
    margin_reduce: str = "min"
    keep_probs: bool = False
    inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE
    unsafe_model: bool = False
    image_column: str = image_sources.DEFAULT_IMAGE_COLUMN
    image_key: str = image_sources.DEFAULT_IMAGE_KEY
    id_key: str = image_sources.DEFAULT_ID_KEY
    intra_op_threads: Optional[int] = None
    fetch_threads: int = image_sources.DEFAULT_FETCH_THREADS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    num_shards: int = 0
    overwrite: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises InputError naming the first parameter that is wrong."""
        for name in ("pool", "model", "output_dir", "image_column", "image_key", "id_key"):
            check_required(name, getattr(self, name))
        if self.pool_format is not None:
            check_choice("pool_format", self.pool_format, POOL_FORMATS)
        check_choice("margin_reduce", self.margin_reduce, MARGIN_REDUCES)
        for name in ("image_size", "inference_batch_size", "fetch_threads", "max_image_pixels"):
            check_int(name, getattr(self, name))
        check_int("intra_op_threads", self.intra_op_threads, low=0, optional=True)
        check_int("num_shards", self.num_shards, low=0)
