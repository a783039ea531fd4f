"""`cm-embed`: embed and score an image pool with a Keras model (RunInference).

    cm-embed --pool 'gs://bucket/pool/*.tfrecord' --model gs://bucket/model.keras \\
        --output_dir gs://bucket/embeddings/2026-11-21 --image_size 224 \\
        [--embedding_layer NAME] [--multilabel] [--keep_probs] [Beam options]

Writes to --output_dir:

* `embeddings-SSSSS-of-NNNNN.parquet`: example_id, embedding list<float32>,
  margin float32, predicted_class int32, entropy float32 [, probs list<float32>];
* `rejected-SSSSS-of-NNNNN.parquet`: example_id, uri, reason, for every image that
  could not be read or decoded (or whose model output was not probabilities);
* `manifest.json`, last: counts (read, embedded, rejected), the model's sha256,
  the pool's input fingerprint, images/s, wall time and every parameter.

Bad flags, a pool with the wrong columns and a model that does not fit the contract
fail before any image is read. `run(argv)` returns the summary dict.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Dict, List, Optional

import apache_beam as beam

from cm_beam.io import artifacts
from cm_beam.embedding import image_sources
from cm_beam.io import table_io
from cm_beam.embedding.embed_pool import DEFAULT_INFERENCE_BATCH_SIZE, EmbedAndScore
from cm_beam.embedding.image_decode import DEFAULT_MAX_IMAGE_PIXELS
from cm_beam.embedding.keras_model_handler import MARGIN_REDUCES, REJECTED_SCHEMA, check_model, output_schema
from cm_beam.runtime.runner import (
    add_output_flags,
    run_main,
    non_negative_int,
    pipeline_options,
    positive_int,
    run_pipeline,
)

_LOG = logging.getLogger("cm_beam.embed_pool")

EMBEDDINGS_PREFIX = "embeddings"
REJECTED_PREFIX = "rejected"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cm-embed", description=__doc__.split("\n")[0])
    parser.add_argument("--pool", required=True, help="Glob of the pool files (manifest Parquet/CSV, TFRecord, or Parquet with image bytes).")
    parser.add_argument("--pool_format", choices=image_sources.POOL_FORMATS, default=None,
                        help="Layout of --pool; inferred from names and columns when unambiguous.")
    parser.add_argument("--model", required=True, help="The .keras model file (local or gs://).")
    add_output_flags(parser)
    parser.add_argument("--image_size", type=positive_int, default=224, help="Images are resized to this square size (bilinear).")
    parser.add_argument("--embedding_layer", default=None,
                        help="For a plain classifier: the layer whose output is the embedding (default: the layer before the last).")
    parser.add_argument("--multilabel", action="store_true", help="Outputs are independent sigmoids (multi-label margin).")
    parser.add_argument("--margin_reduce", choices=MARGIN_REDUCES, default="min",
                        help="With --multilabel: reduce the per-class margins |2p-1| by min (default) or mean.")
    parser.add_argument("--keep_probs", action="store_true", help="Also write the probability vector (probs).")
    parser.add_argument("--inference_batch_size", type=positive_int, default=DEFAULT_INFERENCE_BATCH_SIZE,
                        help="Images per model call.")
    parser.add_argument("--unsafe_model", action="store_true",
                        help="Load the model without Keras safe_mode (needed for Lambda layers; trusted files only).")
    parser.add_argument("--image_column", default=image_sources.DEFAULT_IMAGE_COLUMN, help="Parquet pools: the image bytes column.")
    parser.add_argument("--image_key", default=image_sources.DEFAULT_IMAGE_KEY, help="TFRecord pools: the image bytes feature.")
    parser.add_argument("--id_key", default=image_sources.DEFAULT_ID_KEY, help="TFRecord pools: the example id feature.")
    parser.add_argument("--intra_op_threads", type=non_negative_int, default=None,
                        help="TensorFlow intra-op threads per worker process (default: cores / local workers, "
                             "0 = TensorFlow's default).")
    parser.add_argument("--fetch_threads", type=positive_int, default=image_sources.DEFAULT_FETCH_THREADS,
                        help="Concurrent image reads per worker process (manifest pools).")
    parser.add_argument("--max_image_pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="Images whose header declares more pixels (width x height) are rejected before decoding "
                             "(decompression bombs); default %(default)s.")
    parser.add_argument("--verbose", action="store_true", help="Also print third-party logs (TensorFlow, Beam).")
    parser.add_argument("--num_shards", type=non_negative_int, default=0, help="Output shards (0: chosen by the runner).")
    return parser


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


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Runs cm-embed with command-line `argv`; returns the summary (also the manifest)."""
    args, beam_args = build_parser().parse_known_args(argv)
    options = pipeline_options(beam_args)
    intra = args.intra_op_threads if args.intra_op_threads is not None else _default_intra_op_threads(options)

    # Everything that can be wrong with the inputs fails here, before any image is read.
    pool = image_sources.inspect_pool(
        args.pool, args.pool_format, image_column=args.image_column, image_key=args.image_key, id_key=args.id_key
    )
    contract = check_model(args.model, args.image_size, args.embedding_layer, args.multilabel, args.unsafe_model)
    fingerprint = image_sources.input_fingerprint(pool)
    artifacts.prepare_output_dir(args.output_dir, args.overwrite)

    schema = output_schema(args.keep_probs)
    pipeline = beam.Pipeline(options=options)
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
    seconds = run_pipeline(pipeline, "cm-embed")

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
            **{k: v for k, v in vars(args).items()},
            "intra_op_threads": intra,
            "beam_args": list(beam_args),
        },
    }
    artifacts.write_manifest(args.output_dir, summary)
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    started = time.time()

    def print_summary(summary) -> None:
        c = summary["counts"]
        print(
            f"cm-embed: {c['embedded']} embedded, {c['rejected']} rejected of {c['read']} read "
            f"in {summary['wall_time_s']:.1f} s ({summary['images_per_s']} images/s; "
            f"{time.time() - started:.1f} s with start-up) -> {summary['outputs']['embeddings']}"
        )

    from cm_beam.runtime.runner import verbose_requested
    import sys

    args = sys.argv[1:] if argv is None else argv
    run_main("cm-embed", run, argv, print_summary, verbose=verbose_requested(args), quiet_imports=("tensorflow",))

if __name__ == "__main__":
    main()
