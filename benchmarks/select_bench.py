"""Benchmark: cm-select (DirectRunner, 2 workers) against a plain in-memory numpy Cluster-Margin.

A synthetic pool of n examples in Zipf-sized clusters (0.23 n nominal clusters,
ties in the margins; ids like `gs-img-000000001`, float32 margins, int64 cluster
ids, Parquet files of 250K rows), k_m = 0.3 n, k_t = 0.1 n. Both programs read the
same Parquet pool and write their batch as Parquet; each run is a separate
process, measured for wall time and peak RSS of its whole process tree (and killed
if that passes --kill_above_mb). Runs alternate (numpy, beam, numpy, beam, ...) so
that both see the same machine load. Each pool size is one point of
benchmarks/results/select.json (a run at a size replaces that size's point), with
its command, medians, ratios and whether the batches are identical; `scaling`
compares every point with the 1M one.

    python benchmarks/select_bench.py --n 1000000 --repeats 3
    python benchmarks/select_bench.py --n 3000000 --repeats 3
    python benchmarks/select_bench.py --n 10000000 --repeats 3

`--series singletons` measures cm-select as a nightly runs it (issue 13): about
half the rows in singleton clusters, scores laid out as cm-embed writes them (a
Parquet row group per 64-row inference batch, with the embedding, margin,
predicted_class and entropy columns), an exclusion list of 2,000 ids (the previous
night's batch), k_t = 0.1% of the pool and k_m = 10 k_t, on the default in-process
FnApiRunner. At each size (--sizes), runs of the code at --before_commit (extracted
with `git archive` into the work dir) alternate with runs of this checkout; both
batches are compared with each other and with the numpy reference. Recorded under
"singletons" in results/select.json, with CPU seconds (steadier than wall time on
a shared machine) and the growth exponent from the smallest to the largest size.

    python benchmarks/select_bench.py --series singletons --sizes 100000 300000 1000000 \
        --before_commit 4b26a8c --repeats 3
"""

import argparse
import json
import os
import platform
import shlex
import math
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from cm_beam.io import table_io  # noqa: E402
from cm_beam.testing.synthetic_pool import make_pool, write_sharded  # noqa: E402
from measure import run_measured  # noqa: E402
from numpy_cluster_margin import select as numpy_select  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--series", choices=("zipf", "singletons"), default="zipf",
                   help="zipf: the default pool, one size per run; singletons: the nightly-like series.")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000], help="singletons: pool sizes.")
    p.add_argument("--before_commit", default=None, help="singletons: also run this commit's cm-select, alternating.")
    p.add_argument("--singleton_fraction", type=float, default=0.48, help="singletons: share of rows in clusters of one.")
    p.add_argument("--scores_row_group_rows", type=int, default=64, help="singletons: rows per scores row group.")
    p.add_argument("--exclusions", type=int, default=2000, help="singletons: ids in the exclusion list.")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--num_clusters", type=int, default=None, help="Nominal clusters (default 0.23 n).")
    p.add_argument("--batch_size", type=int, default=None, help="k_t (default 0.1 n).")
    p.add_argument("--margin_pool_size", type=int, default=None, help="k_m (default 0.3 n).")
    p.add_argument("--shard_rows", type=int, default=250_000, help="Rows per Parquet file (one row group each).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kill_above_mb", type=float, default=11_000, help="Kill a run whose process tree passes this RSS.")
    p.add_argument("--workdir", default=os.path.join(HERE, "data", "select"))
    p.add_argument("--output", default=os.path.join(HERE, "results", "select.json"))
    args = p.parse_args(argv)
    command = "python benchmarks/select_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.series == "singletons":
        return singletons_series(args, command)

    args.num_clusters = args.num_clusters or int(round(0.23 * args.n))
    args.batch_size = args.batch_size or args.n // 10
    args.margin_pool_size = args.margin_pool_size or 3 * args.n // 10
    pool_dir = os.path.join(args.workdir, "pool")
    if os.path.isdir(pool_dir):
        shutil.rmtree(pool_dir)
    tables = make_pool(args.n, args.num_clusters, seed=0, zipf_a=0.5, id_prefix="gs-img")
    shards = max(1, -(-args.n // args.shard_rows))
    scores = write_sharded(tables["scores"], pool_dir, "scores", num_shards=shards, row_group_size=args.shard_rows)
    clusters = write_sharded(tables["clusters"], pool_dir, "clusters", num_shards=shards, row_group_size=args.shard_rows)
    n_clusters = int(np.unique(tables["clusters"].column("cluster_id").to_numpy()).size)
    del tables

    python = sys.executable
    numpy_out = os.path.join(args.workdir, "numpy.parquet")
    beam_out = os.path.join(args.workdir, "beam")
    numpy_cmd = [python, os.path.join(HERE, "numpy_cluster_margin.py"), "--scores", scores, "--clusters", clusters,
                 "--batch_size", str(args.batch_size), "--margin_pool_size", str(args.margin_pool_size), "--output", numpy_out]
    beam_cmd = [python, "-m", "pipelines.select_batch", "--scores", scores, "--clusters", clusters,
                "--batch_size", str(args.batch_size), "--margin_pool_size", str(args.margin_pool_size),
                "--output_dir", beam_out, "--overwrite", "--runner=DirectRunner", "--direct_num_workers=2",
                "--direct_running_mode=multi_processing"]
    # For context only (not the target): the same pipeline on one in-process worker,
    # which moves no data between processes.
    beam_inprocess_cmd = [a for a in beam_cmd if not a.startswith("--direct_")]
    beam_inprocess_cmd[beam_inprocess_cmd.index("--runner=DirectRunner")] = "--runner=FnApiRunner"
    beam_inprocess_cmd[beam_inprocess_cmd.index(beam_out)] = beam_out + "-inprocess"
    env = dict(os.environ, PYTHONPATH=ROOT)
    runs = {"numpy": [], "beam": [], "beam_inprocess_1_worker": []}
    for i in range(args.repeats):
        for name, cmd in (("numpy", numpy_cmd), ("beam", beam_cmd), ("beam_inprocess_1_worker", beam_inprocess_cmd)):
            load_before = os.getloadavg()[0]
            r = run_measured(cmd, env=env, log_path=os.path.join(args.workdir, f"{name}-{i}.log"),
                             kill_above_mb=args.kill_above_mb)
            # The machine is shared: keep the load beside each run, so a noisy run shows.
            r["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            runs[name].append(r)
            print(f"run {i} {name}: {r['wall_seconds']:.2f}s, peak {r['peak_rss_mb']:.0f} MB", flush=True)

    ref = pq.read_table(numpy_out).sort_by("rank")
    got = table_io.read_table(os.path.join(beam_out, "selection-*.parquet")).sort_by("rank")
    got_inprocess = table_io.read_table(os.path.join(beam_out + "-inprocess", "selection-*.parquet")).sort_by("rank")
    identical = all(ref.column(c).to_pylist() == got.column(c).to_pylist() == got_inprocess.column(c).to_pylist()
                    for c in ("example_id", "cluster_id", "round", "rank"))
    manifest = json.load(open(os.path.join(beam_out, "manifest.json")))

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    result = {
        "command": command,
        "description": "cm-select (DirectRunner, 2 worker processes: the target configuration) vs an in-memory "
                       "numpy Cluster-Margin, each end to end (read Parquet pool, select, write Parquet); runs "
                       "alternate; cm-select on one in-process FnApiRunner worker is recorded for context",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "pool": {"examples": args.n, "clusters": n_clusters, "margin_pool_size": args.margin_pool_size,
                 "batch_size": args.batch_size, "files": shards, "rows_per_file": args.shard_rows},
        "runs": runs,
        "median_wall_seconds": {k: med(k, "wall_seconds") for k in runs},
        "median_peak_rss_mb": {k: med(k, "peak_rss_mb") for k in runs},
        "ratio_beam_over_numpy_wall": round(med("beam", "wall_seconds") / med("numpy", "wall_seconds"), 2),
        "ratio_beam_inprocess_over_numpy_wall": round(
            med("beam_inprocess_1_worker", "wall_seconds") / med("numpy", "wall_seconds"), 2),
        "target_ratio": 5.0,
        "batches_identical": identical,
        "beam_manifest_counts": manifest["counts"],
        "beam_rounds": manifest["rounds"],
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    if os.path.exists(args.output):
        with open(args.output) as f:
            recorded = json.load(f)
        if "points" not in recorded:  # the single-point layout of earlier versions
            recorded = {"points": []}
    else:
        recorded = {"points": []}
    points = [p for p in recorded["points"] if p["pool"]["examples"] != args.n] + [result]
    points.sort(key=lambda p: p["pool"]["examples"])
    recorded.update({"description": "one point per pool size; scaling: each point against the 1M one",
                     "points": points, "scaling": _scaling(points)})
    with open(args.output, "w") as f:
        json.dump(recorded, f, indent=2)
    print(json.dumps({k: result[k] for k in ("median_wall_seconds", "median_peak_rss_mb", "ratio_beam_over_numpy_wall",
                                              "ratio_beam_inprocess_over_numpy_wall", "batches_identical")}, indent=2))
    if not identical:
        sys.exit("the two batches differ")


def _git_commit(root, ref="HEAD"):
    out = subprocess.run(["git", "-C", root, "rev-parse", ref], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return out + ("-dirty" if dirty and ref == "HEAD" else "")


def write_nightly_like_pool(n, directory, singleton_fraction, row_group_rows, exclusions, shard_rows):
    """A singleton-heavy pool in the layout a nightly hands to cm-select; returns its globs and counts."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    tables = make_pool(n, max(1, n // 20), seed=0, zipf_a=0.5, id_prefix="gs-img", singleton_fraction=singleton_fraction)
    rng = np.random.default_rng(1)
    scores = tables["scores"]
    # cm-embed's columns (a small embedding: only the Parquet layout matters here).
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(8 * n, dtype=np.float32)), 8)
    scores = pa.table({
        "example_id": scores.column("example_id"),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, 8 * n + 1, 8, dtype=np.int32)), embedding.flatten()),
        "margin": scores.column("margin"),
        "predicted_class": pa.array(rng.integers(0, 10, n, dtype=np.int32)),
        "entropy": pa.array(rng.random(n, dtype=np.float32)),
    })
    shards = max(1, -(-n // shard_rows))
    scores_glob = write_sharded(scores, directory, "embeddings", num_shards=shards, row_group_size=row_group_rows)
    clusters_glob = write_sharded(tables["clusters"].select(["example_id", "cluster_id"]), directory, "clusters",
                                  num_shards=shards, row_group_size=4096)
    excluded = scores.column("example_id").take(pa.array(rng.choice(n, exclusions, replace=False)))
    exclude_path = os.path.join(directory, "previous-batch.parquet")
    pq.write_table(pa.table({"example_id": excluded}), exclude_path)
    _, sizes = np.unique(tables["clusters"].column("cluster_id").to_numpy(), return_counts=True)
    counts = {"examples": n, "clusters": int(sizes.size), "singleton_clusters": int((sizes == 1).sum()),
              "unclustered_rows": n - tables["clusters"].num_rows, "scores_files": shards,
              "scores_row_groups": sum(pq.ParquetFile(f).metadata.num_row_groups for f in table_io.expand_glob(scores_glob, "scores")),
              "exclusions": exclusions}
    return scores_glob, clusters_glob, exclude_path, counts


def singletons_series(args, command):
    python = sys.executable
    variants = {"after": ROOT}
    if args.before_commit:
        before_root = os.path.join(args.workdir, "code-" + args.before_commit)
        if not os.path.isdir(before_root):
            os.makedirs(before_root)
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.before_commit], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", before_root], input=archive, check=True)
        variants = {"before": before_root, "after": ROOT}
    points = []
    for n in args.sizes:
        pool_dir = os.path.join(args.workdir, f"singletons-{n}")
        scores, clusters, exclude, pool = write_nightly_like_pool(
            n, pool_dir, args.singleton_fraction, args.scores_row_group_rows, args.exclusions, args.shard_rows)
        k_t = max(1, n // 1000)
        k_m = 10 * k_t
        runs = {name: [] for name in variants}
        for i in range(args.repeats):
            for name, root in variants.items():
                out = os.path.join(args.workdir, f"singletons-{n}-{name}")
                cmd = [python, "-m", "pipelines.select_batch", "--scores", scores, "--clusters", clusters,
                       "--exclude", exclude, "--batch_size", str(k_t), "--margin_pool_size", str(k_m),
                       "--output_dir", out, "--overwrite"]
                load_before = os.getloadavg()[0]
                r = run_measured(cmd, env=dict(os.environ, PYTHONPATH=root), cwd=root,
                                 log_path=os.path.join(args.workdir, f"singletons-{n}-{name}-{i}.log"),
                                 kill_above_mb=args.kill_above_mb)
                r["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                runs[name].append(r)
                print(f"singletons n={n} run {i} {name}: {r['cpu_seconds']:.1f} CPU-s, {r['wall_seconds']:.1f} s wall, "
                      f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
        # The independent check: numpy Cluster-Margin on the pool without the excluded ids.
        table = table_io.read_table(scores, columns=["example_id", "margin"])
        excluded = pq.read_table(exclude).column("example_id").combine_chunks()
        eligible = table.filter(pc.invert(pc.is_in(table.column("example_id"), value_set=excluded)))
        ref = numpy_select(eligible, table_io.read_table(clusters), k_t, k_m)
        cols = ("example_id", "cluster_id", "round", "rank")
        batches = {name: table_io.read_table(os.path.join(args.workdir, f"singletons-{n}-{name}", "selection-*.parquet"))
                   .sort_by("rank") for name in variants}
        manifest = json.load(open(os.path.join(args.workdir, f"singletons-{n}-after", "manifest.json")))
        point = {
            "pool": dict(pool, batch_size=k_t, margin_pool_size=k_m),
            "runs": runs,
            "median_cpu_seconds": {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()},
            "median_wall_seconds": {k: statistics.median(r["wall_seconds"] for r in v) for k, v in runs.items()},
            "median_peak_rss_mb": {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
            "batch_equals_numpy_reference": {k: all(b.column(c).to_pylist() == ref.column(c).to_pylist() for c in cols)
                                             for k, b in batches.items()},
            "manifest_counts": manifest["counts"],
        }
        points.append(point)
        print(json.dumps({k: point[k] for k in ("median_cpu_seconds", "median_wall_seconds", "batch_equals_numpy_reference")}),
              flush=True)
    first, last = points[0], points[-1]
    growth = math.log(last["pool"]["examples"] / first["pool"]["examples"])
    series = {
        "command": command,
        "commit": _git_commit(ROOT),
        "before_commit": _git_commit(ROOT, args.before_commit) if args.before_commit else None,
        "description": "cm-select as a nightly runs it (FnApiRunner in process): ~half the rows in singleton clusters, "
                       "scores in cm-embed's layout (one row group per 64 rows), 2,000 excluded ids, k_t = 0.1% of the "
                       "pool, k_m = 10 k_t; 'before' and 'after' runs alternate; CPU seconds of the process tree",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "points": points,
        "cpu_growth_exponent": {k: round(math.log(last["median_cpu_seconds"][k] / first["median_cpu_seconds"][k]) / growth, 2)
                                for k in variants},
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    recorded = {}
    if os.path.exists(args.output):
        with open(args.output) as f:
            recorded = json.load(f)
    recorded["singletons"] = series
    with open(args.output, "w") as f:
        json.dump(recorded, f, indent=2)
    print(json.dumps({"cpu_growth_exponent": series["cpu_growth_exponent"]}))
    if not all(all(p["batch_equals_numpy_reference"].values()) for p in points):
        sys.exit("a batch differs from the numpy reference")


def _scaling(points):
    base = next((p for p in points if p["pool"]["examples"] == 1_000_000), None)
    if base is None:
        return {}
    out = {}
    for p in points:
        n = p["pool"]["examples"]
        out[str(n)] = {
            "rows_over_1M": n / 1_000_000,
            "wall_over_1M": {k: round(p["median_wall_seconds"][k] / base["median_wall_seconds"][k], 2)
                             for k in p["median_wall_seconds"]},
            "peak_rss_over_1M": {k: round(p["median_peak_rss_mb"][k] / base["median_peak_rss_mb"][k], 2)
                                 for k in p["median_peak_rss_mb"]},
        }
    return out


if __name__ == "__main__":
    main()
