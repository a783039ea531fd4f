"""Benchmark of exact duplicates and tied distances in cm-cluster (issue 14 item 3).

Runs cm-cluster on tie-heavy pools with two versions of the code, side by side: `before`
(a git ref, default the merge base with main, extracted with `git archive`) and `after`
(this working tree). Each run is a child process (FnApiRunner, in process) with the
version's directory first on PYTHONPATH; the runs alternate between the two versions and
the figures are medians over `--repeats`. Recorded per run: merge rounds, manifest bytes,
wall time and peak RSS of the process tree (`measure.py`), clusters, and whether the two
versions' partitions are equal.

Pools:
* identical_6000: 6,000 identical 16-d embeddings (the issue's case), cosine, eps 0.2;
* duplicates_mixed: 200 distinct blob points, 49 of them repeated to groups of 2..50 rows
  (1,425 rows), cosine, eps 0.2;
* simplex_4x150: 4 regular simplices of 150 points (all pairs inside a group tied), cosine,
  eps 0.3, default k (100) and k = 200;
* simplex_3x600_k100: 3 regular simplices of 600 points, cosine, eps 0.3, default k: a tied
  clique larger than k (the kNN lists tie-break by id: a hub);
* grid_squares: 6 far-apart 4 x 4 grids of spacing 1 (ties everywhere), sqeuclidean, eps 20;
* zipf_20000: 20,000 rows drawn from 4,000 distinct 32-d blob points with Zipf(1.1)
  frequencies (a web-like pool: a few heavy duplicates, many singletons), cosine, eps 0.1;
* blobs_100000: 100,000 distinct 64-d blob points (no duplicates, few ties), cosine, eps 0.2:
  what the fold and the per-row shard assignment cost a pool that gains nothing from them.

    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/duplicates_bench.py --repeats 3

Results go to benchmarks/results/duplicates.json with the command and both commits.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.measure import run_measured  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "duplicates.json")


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


# --- pools ------------------------------------------------------------------------------

def identical(n=6000, d=16):
    return np.repeat(np.random.default_rng(0).normal(size=(1, d)).astype(np.float32), n, axis=0)


def duplicates_mixed(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 12))
    base = (centers[rng.integers(0, 8, 200)] + 0.4 * rng.normal(size=(200, 12))).astype(np.float32)
    rows = [np.arange(200)] + [np.full(g - 1, i) for i, g in zip(rng.choice(200, 49, replace=False), range(2, 51))]
    x = base[np.concatenate(rows)]
    return x[rng.permutation(len(x))]


def simplices(groups=4, size=150):
    x = np.zeros((groups * size, size + groups), np.float32)
    for g in range(groups):
        x[g * size:(g + 1) * size, :size] = 0.3 * np.eye(size, dtype=np.float32)
        x[g * size:(g + 1) * size, size + g] = 1.0
    return x


def zipf_pool(n=20_000, distinct=4_000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(400, d))
    base = (centers[rng.integers(0, 400, distinct)] + 0.3 * rng.normal(size=(distinct, d))).astype(np.float32)
    weights = 1.0 / np.arange(1, distinct + 1) ** 1.1
    return base[rng.choice(distinct, n, p=weights / weights.sum())]


def blobs(n=100_000, d=64, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n // 10, d))
    x = centers[rng.integers(0, n // 10, n)] + 0.15 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def grid_squares(squares=6, side=4, gap=100.0):
    g = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(np.float32)
    return np.concatenate([g + gap * np.array([s, s % 2], np.float32) for s in range(squares)])


CASES = {
    # name: (pool, flags)
    "identical_6000": (identical, ["--distance_threshold", "0.2"]),
    "duplicates_mixed": (duplicates_mixed, ["--distance_threshold", "0.2"]),
    "simplex_4x150_k100": (simplices, ["--distance_threshold", "0.3"]),
    "simplex_4x150_k200": (simplices, ["--distance_threshold", "0.3", "--num_neighbors", "200"]),
    "simplex_3x600_k100": (lambda: simplices(3, 600), ["--distance_threshold", "0.3"]),
    "grid_squares": (grid_squares, ["--distance_threshold", "20", "--metric", "sqeuclidean"]),
    "zipf_20000": (zipf_pool, ["--distance_threshold", "0.1"]),
    "blobs_100000": (blobs, ["--distance_threshold", "0.2"]),
}


def write_pool(directory, x):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    ids = [f"img-{i:06d}" for i in range(len(x))]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1]).cast(pa.list_(pa.float32()))
    pq.write_table(pa.table({"example_id": ids, "embedding": emb}), os.path.join(directory, "pool.parquet"),
                   row_group_size=1000)
    return os.path.join(directory, "*.parquet")


def partition(out_dir):
    import pyarrow.parquet as pq
    import glob

    t = pq.read_table(sorted(glob.glob(os.path.join(out_dir, "clusters-*.parquet"))))
    ids = np.array(t.column("example_id").to_pylist())
    labels = t.column("cluster_id").to_numpy()
    order = np.argsort(ids)
    return ids[order], labels[order]


def same_partition(a, b) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def run_once(tree, pattern, flags, out_dir, log_path):
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, "-m", "pipelines.build_clusters", "--embeddings", pattern, "--output_dir", out_dir,
           *flags, "--runner=FnApiRunner"]
    # cwd = the version's tree: `python -m` puts the working directory first on sys.path.
    m = run_measured(cmd, env=env, log_path=log_path, kill_above_mb=6000, cwd=tree)
    manifest_path = os.path.join(out_dir, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    return {"wall_seconds": m["wall_seconds"], "peak_rss_mb": m["peak_rss_mb"], "rounds": manifest["rounds"],
            "manifest_bytes": os.path.getsize(manifest_path), "clusters": manifest["clusters"],
            "duplicates_folded": manifest.get("duplicates_folded"),
            "stage_seconds": manifest.get("timings", {}).get("stage_seconds")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=None, help="git ref of the 'before' code (default: merge base with main)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args(argv)
    before_ref = args.before or git("merge-base", "HEAD", "main")
    before_commit = git("rev-parse", before_ref)
    after_commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "cm_beam", "pipelines"))
    work = tempfile.mkdtemp(prefix="cm-dups-bench-")
    try:
        before_tree = os.path.join(work, "before")
        os.makedirs(before_tree)
        archive = subprocess.run(["git", "archive", before_commit], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", before_tree], input=archive, check=True)
        trees = {"before": before_tree, "after": ROOT}
        results = {}
        for name in args.cases.split(","):
            make, flags = CASES[name]
            x = make()
            pattern = write_pool(os.path.join(work, name, "in"), x)
            runs = {"before": [], "after": []}
            pattern = os.path.abspath(pattern)
            equal = []
            for r in range(args.repeats):
                parts = {}
                for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    out = os.path.join(work, name, version)
                    runs[version].append(run_once(trees[version], pattern, flags, out,
                                                  os.path.join(work, f"{name}-{version}-{r}.log")))
                    parts[version] = partition(out)
                    print(name, version, r, runs[version][-1], flush=True)
                equal.append(bool(np.array_equal(parts["before"][0], parts["after"][0])
                                  and same_partition(parts["before"][1], parts["after"][1])))
            summary = {}
            for version, rs in runs.items():
                summary[version] = {
                    "rounds": rs[0]["rounds"], "manifest_bytes": rs[0]["manifest_bytes"], "clusters": rs[0]["clusters"],
                    "duplicates_folded": rs[0]["duplicates_folded"],
                    "wall_seconds_median": float(np.median([x["wall_seconds"] for x in rs])),
                    "peak_rss_mb_median": float(np.median([x["peak_rss_mb"] for x in rs])),
                    "runs": rs,
                }
            summary["rows"] = int(len(x))
            summary["flags"] = flags
            summary["same_partition_before_after"] = all(equal)
            summary["wall_ratio_before_over_after"] = round(
                summary["before"]["wall_seconds_median"] / summary["after"]["wall_seconds_median"], 2)
            results[name] = summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "command": "python benchmarks/duplicates_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "before_commit": before_commit,
        "after_commit": after_commit,
        "after_tree_dirty": dirty,
        "repeats": args.repeats,
        "runner": "FnApiRunner, in process",
        "cases": results,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: {v: (s[v]["rounds"], s[v]["manifest_bytes"], s[v]["wall_seconds_median"])
                          for v in ("before", "after")} for k, s in results.items()}, indent=1))


if __name__ == "__main__":
    main()
