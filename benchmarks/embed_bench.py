"""Throughput of `cm-embed` against a plain tf.data + `model.predict` loop, side by side.

Both read the same JPEG files (Fashion-MNIST training images from the Debian package
`dataset-fashion-mnist`, upscaled to `--source_size` and tinted per class so that
they are colour JPEGs of a realistic size), decode them with the same TF ops, resize
to `--image_size` and run the same model: a MobileNetV2-shaped classifier
(`keras.applications.MobileNetV2(weights=None)`, random weights, nothing downloaded)
with a Rescaling layer in front, its global-average-pooling layer tapped as the
embedding. Every measurement runs in its own process on this machine's cores.

* baseline `predict`: `tf.data` (read_file, decode, resize; parallel map, batch,
  prefetch) into `model.predict` of the embedding+probs model; timed from the first
  batch request to the last output (model load excluded).
* baseline `loop`: the same dataset into a compiled `tf.function` model call per
  batch, traced like cm-embed's (static batch dimension for full batches); reported
  for honesty, not the target.
* `cm-embed` configurations (FnApiRunner, 1 or 2 worker processes, TF intra-op
  threads per worker); timed as the pipeline's own wall time from manifest.json
  (includes worker start-up and model loading in every worker, which the baselines
  do not pay).

Run heavy: `flock /tmp/cm-bench.lock .venv/bin/python benchmarks/embed_bench.py`.
Results go to benchmarks/results/embed.json with the exact command.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
FASHION_LABELS = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"


def _tf_env():
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_pool(work: str, n: int, source_size: int) -> str:
    """Writes n JPEGs and a manifest (example_id, uri); reuses them if already there."""
    import numpy as np

    manifest = os.path.join(work, "manifest.parquet")
    done = os.path.join(work, f"pool-{n}-{source_size}.done")
    if os.path.exists(done):
        return manifest
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    with gzip.open(FASHION) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_LABELS) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if n > len(images):
        raise SystemExit(f"--num_images: Fashion-MNIST has {len(images)} training images")
    tints = np.random.default_rng(0).uniform(0.3, 1.0, (10, 3)).astype(np.float32)
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    ids, uris = [], []
    for start in range(0, n, 500):
        batch = images[start : start + 500].astype(np.float32)[..., None]
        big = tf.image.resize(batch, [source_size, source_size], method="bicubic").numpy()
        rgb = np.clip(big * tints[labels[start : start + 500]][:, None, None, :], 0, 255).astype(np.uint8)
        for i, img in enumerate(rgb):
            k = start + i
            name = f"images/{k:05d}.jpg"
            tf.io.write_file(os.path.join(work, name), tf.io.encode_jpeg(img, quality=90))
            ids.append(f"fmnist-{k:05d}")
            uris.append(name)
    pq.write_table(pa.table({"example_id": ids, "uri": uris}), manifest)
    open(done, "w").close()
    return manifest


def make_model(work: str, image_size: int) -> str:
    path = os.path.join(work, f"mobilenetv2-{image_size}.keras")
    if os.path.exists(path):
        return path
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # normalisation inside the model
    model = keras.applications.MobileNetV2(weights=None, input_tensor=x, classes=10)
    model.save(path)
    return path


BASELINE_CODE = r"""
import json, sys, time, numpy as np
import tensorflow as tf
sys.path.insert(0, {root!r})
from cm_beam.embedding.keras_model_handler import load_keras_model, _embed_model
import pyarrow.parquet as pq, os
work, model_path, size, batch, mode = {work!r}, {model!r}, {size}, {batch}, {mode!r}
table = pq.read_table(os.path.join(work, "manifest.parquet"))
paths = [os.path.join(work, u) for u in table.column("uri").to_pylist()]
model, _, _ = _embed_model(load_keras_model(model_path), None)
def decode(p):
    img = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
    return tf.image.resize(img, [size, size], method="bilinear")
ds = (tf.data.Dataset.from_tensor_slices(paths).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
      .batch(batch).prefetch(tf.data.AUTOTUNE))
start = time.time()
if mode == "predict":
    out = model.predict(ds, verbose=0)
    n = len(out["embedding"])
else:
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    n = 0
    for x in ds:
        out = fn(x)
        n += int(out["embedding"].shape[0])
seconds = time.time() - start
print(json.dumps({{"images": n, "seconds": seconds}}))
"""


def run_baseline(work, model, size, batch, mode):
    code = BASELINE_CODE.format(root=ROOT, work=work, model=model, size=size, batch=batch, mode=mode)
    t, load = time.time(), os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", code], env=_tf_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.time() - t
    result["loadavg_1min_before_after"] = [load, os.getloadavg()[0]]
    result["images_per_s"] = result["images"] / result["seconds"]
    return result


def run_cm_embed(work, manifest, model, size, batch, workers, intra, tag):
    out = os.path.join(work, f"out-{tag}")
    cmd = [
        sys.executable, "-m", "pipelines.embed_pool", "--pool", manifest, "--model", model,
        "--output_dir", out, "--overwrite", "--image_size", str(size),
        "--inference_batch_size", str(batch), "--runner=FnApiRunner",
    ]
    if intra is not None:
        cmd += ["--intra_op_threads", str(intra)]
    if workers > 1:
        cmd += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    t, load = time.time(), os.getloadavg()[0]
    proc = subprocess.run(cmd, env=_tf_env(), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    with open(os.path.join(out, "manifest.json")) as f:
        manifest_json = json.load(f)
    seconds = manifest_json["wall_time_s"]
    return {
        "images": manifest_json["counts"]["embedded"],
        "rejected": manifest_json["counts"]["rejected"],
        "seconds": seconds,
        "process_seconds": time.time() - t,
        "images_per_s": manifest_json["counts"]["embedded"] / seconds,
        "loadavg_1min_before_after": [load, os.getloadavg()[0]],
    }


def parse_config(text):
    """'w2-t1' = 2 workers, 1 intra-op thread each; 't0' = TF default; 'tauto' = cm-embed's default."""
    workers, threads = text.split("-")
    intra = None if threads == "tauto" else int(threads[1:])
    return int(workers[1:]), intra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="/tmp/cm-embed-bench")
    parser.add_argument("--num_images", type=int, default=20000)
    parser.add_argument("--source_size", type=int, default=160)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--configs", default="w1-t0,w2-t1",
                        help="cm-embed configurations: wN-tK = N workers, K intra-op threads each (t0: TF default).")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repeats of each measurement (median reported).")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "embed.json"))
    args = parser.parse_args(argv)

    os.makedirs(args.work_dir, exist_ok=True)
    manifest = make_pool(args.work_dir, args.num_images, args.source_size)
    model = make_model(args.work_dir, args.image_size)
    configs = [c for c in args.configs.split(",") if c]
    runs = {"baseline_predict": [], "baseline_loop": [], **{f"cm_embed_{c}": [] for c in configs}}
    for r in range(args.repeats):
        # Alternate so that drift in machine load hits every measurement alike.
        runs["baseline_predict"].append(run_baseline(args.work_dir, model, args.image_size, args.batch_size, "predict"))
        print("baseline predict", runs["baseline_predict"][-1], flush=True)
        for c in configs:
            workers, intra = parse_config(c)
            res = run_cm_embed(args.work_dir, manifest, model, args.image_size, args.batch_size, workers, intra, c)
            runs[f"cm_embed_{c}"].append(res)
            print("cm-embed", c, res, flush=True)
        runs["baseline_loop"].append(run_baseline(args.work_dir, model, args.image_size, args.batch_size, "loop"))
        print("baseline loop", runs["baseline_loop"][-1], flush=True)
        write_results(runs, configs, args, argv, r + 1)


def write_results(runs, configs, args, argv, repeats_done):
    """Writes the JSON after every repeat, so an interrupted run still leaves its completed repeats."""

    summary = {name: {"median_images_per_s": statistics.median(r["images_per_s"] for r in rs),
                      "median_seconds": statistics.median(r["seconds"] for r in rs), "runs": rs}
               for name, rs in runs.items()}
    best = max(configs, key=lambda c: summary[f"cm_embed_{c}"]["median_images_per_s"])
    cm = summary[f"cm_embed_{best}"]["median_images_per_s"]
    base = summary["baseline_predict"]["median_images_per_s"]
    loop = summary["baseline_loop"]["median_images_per_s"]
    result = {
        "command": "flock /tmp/cm-bench.lock .venv/bin/python " + " ".join(
            shlex.quote(a) for a in ["benchmarks/embed_bench.py"] + (argv if argv is not None else sys.argv[1:])),
        "what": "images/s of cm-embed vs a plain tf.data decode + model.predict loop over the same JPEGs and model",
        "data": {"images": args.num_images, "source": "Fashion-MNIST train (dataset-fashion-mnist), upscaled "
                 f"to {args.source_size}x{args.source_size}, tinted per class, JPEG quality 90",
                 "image_size": args.image_size},
        "model": "keras.applications.MobileNetV2(weights=None, classes=10) behind Rescaling(1/127.5, -1), "
                 f"{args.image_size}x{args.image_size}x3, random weights; embedding = global_average_pooling2d (1280-d)",
        "batch_size": args.batch_size,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "repeats": args.repeats,
        "repeats_completed": repeats_done,
        "results": summary,
        "best_cm_embed_config": best,
        "cm_embed_images_per_s": cm,
        "baseline_predict_images_per_s": base,
        "baseline_loop_images_per_s": loop,
        "ratio_vs_predict": cm / base,
        # Each repeat ran its measurements back to back under similar load: the ratio within
        # a repeat is the side-by-side figure; its median is robust to load drift between repeats.
        "paired_ratios_vs_predict": [c["images_per_s"] / b["images_per_s"] for c, b in
                                     zip(runs[f"cm_embed_{best}"], runs["baseline_predict"])],
        "median_paired_ratio_vs_predict": statistics.median(
            c["images_per_s"] / b["images_per_s"] for c, b in zip(runs[f"cm_embed_{best}"], runs["baseline_predict"])),
        "ratio_vs_loop": cm / loop,
        "target_ratio_vs_predict": 0.85,
        "noise": "The 2-core machine is shared with other engineers' jobs that do not all take the benchmark "
                 "lock; each run records the 1-minute load average before and after. Measurements alternate "
                 "(baseline predict, cm-embed configs, baseline loop) so that load drift hits all alike.",
        "timing_notes": "cm-embed seconds = pipeline wall time from its manifest (worker start-up, model load "
                        "in each worker and writing Parquet included); baseline seconds = from the first batch "
                        "to the last output (model load excluded). Configs: wN-tK = N FnApiRunner workers, K TF "
                        "intra-op threads per worker (t0 = TF default).",
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("best_cm_embed_config", "cm_embed_images_per_s",
                                             "baseline_predict_images_per_s", "baseline_loop_images_per_s",
                                             "ratio_vs_predict", "median_paired_ratio_vs_predict",
                                             "ratio_vs_loop")}, indent=2))


if __name__ == "__main__":
    main()
