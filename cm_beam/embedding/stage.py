"""`run_embed`: the embedding stage (cm-embed) as one Beam job, from `EmbedOptions`.

Reads the pool, runs `EmbedAndScore` and writes to `options.output_dir`:

* `embeddings-SSSSS-of-NNNNN.parquet`: example_id, embedding list<float32>,
  margin float32, predicted_class int32, entropy float32 [, probs list<float32>];
* `rejected-SSSSS-of-NNNNN.parquet`: example_id, uri, reason, for every image that
  could not be read or decoded (or whose model output was not probabilities);
* `manifest.json`, last: counts (read, embedded, rejected), the model's sha256,
  the pool's input fingerprint, images/s, wall time and every parameter.

A pool with the wrong columns and a model that does not fit the contract fail
before any image is read.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict

import apache_beam as beam

from cm_beam.embedding import image_sources
from cm_beam.embedding.embed_pool import EmbedAndScore
from cm_beam.embedding.keras_model_handler import REJECTED_SCHEMA, check_model, output_schema
from cm_beam.embedding.options import EmbedOptions
from cm_beam.io import artifacts
from cm_beam.io import table_io
from cm_beam.runtime import runner as cm_runner

_LOG = logging.getLogger("cm_beam.embed_pool")

EMBEDDINGS_PREFIX = "embeddings"
REJECTED_PREFIX = "rejected"


def _default_intra_op_threads(options) -> int:
    """Local multi-process runs split the cores among workers; elsewhere TF decides."""
    import os

    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = (options.view_as(StandardOptions).runner or "").lower()
    if "direct" not in runner and "fnapi" not in runner:
        return 0
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if workers <= 1 or direct.direct_running_mode != "multi_processing":
        return 0  # one process: TensorFlow's own pools already span the cores
    return max(1, (os.cpu_count() or 1) // workers)


def _count_rows(pattern_dir: str, prefix: str) -> int:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    total = 0
    for path in artifacts.list_files(pattern_dir):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(prefix + "-") and name.endswith(".parquet"):
            with FileSystems.open(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
    return total


def run_embed(options: EmbedOptions, beam_options: cm_runner.BeamOptions = None) -> Dict[str, Any]:
    """Runs the embedding stage from `options`; returns the summary (also the manifest,
    written last to options.output_dir)."""
    args = options  # the options carry the flags' names
    pipeline_opts, beam_args = cm_runner.as_pipeline_options(beam_options)
    intra = args.intra_op_threads if args.intra_op_threads is not None else _default_intra_op_threads(pipeline_opts)

    # Everything that can be wrong with the inputs fails here, before any image is read.
    pool = image_sources.inspect_pool(
        args.pool, args.pool_format, image_column=args.image_column, image_key=args.image_key, id_key=args.id_key
    )
    contract = check_model(args.model, args.image_size, args.embedding_layer, args.multilabel, args.unsafe_model)
    fingerprint = image_sources.input_fingerprint(pool)
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)

    schema = output_schema(args.keep_probs)
    pipeline = beam.Pipeline(options=pipeline_opts)
    blocks = pipeline | "ReadPool" >> image_sources.ReadImagePool(pool, block_rows=args.inference_batch_size)
    results = blocks | "EmbedAndScore" >> EmbedAndScore(
        args.model,
        args.image_size,
        embedding_layer=args.embedding_layer,
        multilabel=args.multilabel,
        keep_probs=args.keep_probs,
        inference_batch_size=args.inference_batch_size,
        unsafe_model=args.unsafe_model,
        margin_reduce=args.margin_reduce,
        intra_op_threads=intra,
        fetch_threads=args.fetch_threads,
        contract=contract,
        max_image_pixels=args.max_image_pixels,
    )
    results["embeddings"] | "WriteEmbeddings" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, EMBEDDINGS_PREFIX), schema, args.num_shards
    )
    results["rejected"] | "WriteRejected" >> table_io.WriteTableBlocks(
        artifacts.join(args.output_dir, REJECTED_PREFIX), REJECTED_SCHEMA, args.num_shards
    )
    seconds = cm_runner.run_pipeline(pipeline, "cm-embed")

    embedded = _count_rows(args.output_dir, EMBEDDINGS_PREFIX)
    rejected = _count_rows(args.output_dir, REJECTED_PREFIX)
    read = embedded + rejected
    expected = pool.num_rows
    if expected is not None and read != expected:
        # Every pool row must end up in exactly one output; anything else is a bug.
        raise RuntimeError(f"cm-embed: the pool has {expected} rows but {embedded} embedded + {rejected} rejected were written")
    summary = {
        "stage": "embed",
        "counts": {"read": read, "embedded": embedded, "rejected": rejected},
        "model": {
            "path": args.model,
            "fingerprint": contract.fingerprint,
            "outputs": contract.outputs,
            "embedding_layer": contract.embedding_layer,
            "embedding_dim": contract.embedding_dim,
            "num_classes": contract.num_classes,
        },
        "model_fingerprint": contract.fingerprint,
        "input_fingerprint": fingerprint,
        "pool": {"pattern": args.pool, "format": pool.pool_format, "files": len(pool.files)},
        "outputs": {
            "embeddings": artifacts.join(args.output_dir, EMBEDDINGS_PREFIX + "-*.parquet"),
            "rejected": artifacts.join(args.output_dir, REJECTED_PREFIX + "-*.parquet"),
        },
        "wall_time_s": round(seconds, 3),
        "images_per_s": round(embedded / seconds, 2) if seconds > 0 else None,
        "parameters": {
            **dataclasses.asdict(options),
            "intra_op_threads": intra,
            "beam_args": list(beam_args),
        },
    }
    artifacts.write_manifest(args.output_dir, summary)
    return summary
