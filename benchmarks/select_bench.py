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
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time

import numpy as np
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from cm_beam.io import table_io  # noqa: E402
from cm_beam.testing.synthetic_pool import make_pool, write_sharded  # noqa: E402
from measure import run_measured  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
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
    recorded = {"points": []}
    if os.path.exists(args.output):
        with open(args.output) as f:
            recorded = json.load(f)
        if "points" not in recorded:  # the single-point layout of earlier versions
            recorded = {"points": []}
    points = [p for p in recorded["points"] if p["pool"]["examples"] != args.n] + [result]
    points.sort(key=lambda p: p["pool"]["examples"])
    recorded = {"description": "one point per pool size; scaling: each point against the 1M one",
                "points": points, "scaling": _scaling(points)}
    with open(args.output, "w") as f:
        json.dump(recorded, f, indent=2)
    print(json.dumps({k: result[k] for k in ("median_wall_seconds", "median_peak_rss_mb", "ratio_beam_over_numpy_wall",
                                              "ratio_beam_inprocess_over_numpy_wall", "batches_identical")}, indent=2))
    if not identical:
        sys.exit("the two batches differ")


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
