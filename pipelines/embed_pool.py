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
fail before any image is read (cm_beam/embedding/stage.py). `run(argv)` returns the summary dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cm_beam.embedding.image_sources import DEFAULT_FETCH_THREADS, DEFAULT_ID_KEY, DEFAULT_IMAGE_COLUMN, DEFAULT_IMAGE_KEY
from cm_beam.embedding.options import DEFAULT_IMAGE_SIZE, POOL_FORMATS, EmbedOptions
from cm_beam.embedding.embed_pool import DEFAULT_INFERENCE_BATCH_SIZE
from cm_beam.embedding.image_decode import DEFAULT_MAX_IMAGE_PIXELS
from cm_beam.embedding.keras_model_handler import MARGIN_REDUCES
from cm_beam.runtime import runner as cm_runner


def build_parser() -> argparse.ArgumentParser:
    parser = cm_runner.new_parser("cm-embed", __doc__.split("\n")[0])
    parser.add_argument("--pool", required=True, help="Glob of the pool files (manifest Parquet/CSV, TFRecord, or Parquet with image bytes).")
    parser.add_argument("--pool_format", choices=POOL_FORMATS, default=None,
                        help="Layout of --pool; inferred from names and columns when unambiguous.")
    parser.add_argument("--model", required=True, help="The .keras model file (local or gs://).")
    cm_runner.add_output_flags(parser)
    parser.add_argument("--image_size", type=cm_runner.positive_int, default=DEFAULT_IMAGE_SIZE, help="Images are resized to this square size (bilinear).")
    parser.add_argument("--embedding_layer", default=None,
                        help="For a plain classifier: the layer whose output is the embedding (default: the layer before the last).")
    parser.add_argument("--multilabel", action="store_true", help="Outputs are independent sigmoids (multi-label margin).")
    parser.add_argument("--margin_reduce", choices=MARGIN_REDUCES, default="min",
                        help="With --multilabel: reduce the per-class margins |2p-1| by min (default) or mean.")
    parser.add_argument("--keep_probs", action="store_true", help="Also write the probability vector (probs).")
    parser.add_argument("--inference_batch_size", type=cm_runner.positive_int, default=DEFAULT_INFERENCE_BATCH_SIZE,
                        help="Images per model call.")
    parser.add_argument("--unsafe_model", action="store_true",
                        help="Load the model without Keras safe_mode (needed for Lambda layers; trusted files only).")
    parser.add_argument("--image_column", default=DEFAULT_IMAGE_COLUMN, help="Parquet pools: the image bytes column.")
    parser.add_argument("--image_key", default=DEFAULT_IMAGE_KEY, help="TFRecord pools: the image bytes feature.")
    parser.add_argument("--id_key", default=DEFAULT_ID_KEY, help="TFRecord pools: the example id feature.")
    parser.add_argument("--intra_op_threads", type=cm_runner.non_negative_int, default=None,
                        help="TensorFlow intra-op threads per worker process (default: cores / local workers, "
                             "0 = TensorFlow's default).")
    parser.add_argument("--fetch_threads", type=cm_runner.positive_int, default=DEFAULT_FETCH_THREADS,
                        help="Concurrent image reads per worker process (manifest pools).")
    parser.add_argument("--max_image_pixels", type=cm_runner.positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="Images whose header declares more pixels (width x height) are rejected before decoding "
                             "(decompression bombs); default %(default)s.")
    parser.add_argument("--verbose", action="store_true", help="Also print third-party logs (TensorFlow, Beam).")
    parser.add_argument("--num_shards", type=cm_runner.non_negative_int, default=0, help="Output shards (0: chosen by the runner).")
    return parser


def options_from_args(args: argparse.Namespace) -> EmbedOptions:
    """EmbedOptions from parsed flags (each option is the flag of the same name; --verbose
    is the command's own); a bad value raises InputError naming the flag."""
    return EmbedOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EmbedOptions)})


def parse(argv: Optional[Sequence[str]] = None) -> Tuple[EmbedOptions, List[str]]:
    """(the options, the Beam pipeline flags) of a cm-embed command line."""
    args, beam_args = cm_runner.split_beam_args(build_parser(), argv)
    return options_from_args(args), beam_args


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Runs cm-embed with command-line `argv`; returns the summary (also the manifest)."""
    from cm_beam.embedding.stage import run_embed

    options, beam_args = parse(argv)
    return run_embed(options, beam_args)


def main(argv: Optional[List[str]] = None) -> None:
    started = time.time()

    def print_summary(summary) -> None:
        c = summary["counts"]
        print(
            f"cm-embed: {c['embedded']} embedded, {c['rejected']} rejected of {c['read']} read "
            f"in {summary['wall_time_s']:.1f} s ({summary['images_per_s']} images/s; "
            f"{time.time() - started:.1f} s with start-up) -> {summary['outputs']['embeddings']}"
        )

    import sys

    args = sys.argv[1:] if argv is None else argv
    cm_runner.run_main("cm-embed", run, argv, print_summary, verbose=cm_runner.verbose_requested(args),
                       quiet_imports=("tensorflow",))


if __name__ == "__main__":
    main()
