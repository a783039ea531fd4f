"""Micro-benchmark: numpy's `np.unique` against `cm_beam.array_ops.unique_sorted`.

numpy >= 2.3 answers a plain `np.unique(a)` with a hash table; cm-cluster calls
"distinct values" on id and shard arrays of up to millions of entries. This times
both on int64 arrays shaped like those (few distinct values: shard ids; many:
cluster ids), alternating, `--repeats` times each, and records the medians and
their ratio in benchmarks/results/unique.json with the command. Both must return
the same array (checked).

    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/unique_bench.py [--repeats 7]
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cm_beam.array_ops import unique_sorted  # noqa: E402

CASES = (  # (name, length, distinct values drawn from)
    ("2M entries, 16 values (shard ids)", 2_000_000, 16),
    ("2M entries, 100K values", 2_000_000, 100_000),
    ("2M entries, all distinct (63-bit ids)", 2_000_000, 1 << 62),
    ("200K entries, all distinct (63-bit ids)", 200_000, 1 << 62),
)


def _time(f, a):
    t = time.perf_counter()
    out = f(a)
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "unique.json"))
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for name, n, values in CASES:
        a = rng.integers(0, values, n, dtype=np.int64)
        hashed, sorted_ = [], []
        for _ in range(args.repeats):
            t1, u1 = _time(np.unique, a)
            t2, u2 = _time(unique_sorted, a)
            if not np.array_equal(u1, u2):
                raise AssertionError(f"{name}: unique_sorted differs from np.unique")
            hashed.append(t1)
            sorted_.append(t2)
        row = {"case": name, "n": n, "distinct": int(len(u1)),
               "np_unique_median_s": round(statistics.median(hashed), 5),
               "unique_sorted_median_s": round(statistics.median(sorted_), 5)}
        row["ratio"] = round(row["np_unique_median_s"] / row["unique_sorted_median_s"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"command": "flock /tmp/cm-bench.lock .venv/bin/python " + " ".join(shlex.quote(x) for x in sys.argv),
              "numpy": np.__version__, "repeats": args.repeats, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
