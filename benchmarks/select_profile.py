"""Where cm-select's bytes go: element counts and encoded sizes of its shuffled stages.

Runs cm-select's stage functions directly (no runner) on a synthetic pool, and for
each stage that feeds a GroupByKey or crosses a fused-stage boundary counts the
elements, their Arrow payload (`nbytes`: the rows they hold) and the bytes Beam's
pickle coder writes for them. A stage whose encoded bytes exceed its payload by a
factor that grows with the pool is what makes selection superlinear.

    python benchmarks/select_profile.py --n 1000000 3000000 [--output results/select_profile.json]

`--read_cost N...` instead times reading the scores of a nightly-like pool of N rows
written as cm-embed writes it (one file, a row group per 64 rows), the old way (a
unit per row group, each parsing the whole footer) against `table_io`'s units, and
records it under "read_cost" in --output (the rest of the file is kept):

    python benchmarks/select_profile.py --read_cost 100000 1000000 --output benchmarks/results/select_profile.json
"""

import argparse
import json
import os
import pickle
import resource
import sys
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cm_beam.selection import select_impl as impl  # noqa: E402
from cm_beam.selection import kernels as sk  # noqa: E402
from cm_beam.io import table_io  # noqa: E402
from cm_beam.selection.select_batch import ROWS_PER_SELECT_BUCKET, MAX_BUCKETS  # noqa: E402
from cm_beam.testing.synthetic_pool import make_pool, write_sharded  # noqa: E402
from cm_beam.selection.stage import ROWS_PER_JOIN_BUCKET  # noqa: E402
from cm_beam.testing import reference_kernels


def _batch_of(element):
    while isinstance(element, tuple):
        element = element[-1]
    return element


def _measure(name, elements):
    rows = payload = encoded = 0
    for e in elements:
        b = _batch_of(e)
        rows += b.num_rows
        payload += b.nbytes
        encoded += len(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL))
    return {"stage": name, "elements": len(elements), "rows": rows, "payload_mb": round(payload / 1e6, 1),
            "encoded_mb": round(encoded / 1e6, 1), "encoded_bytes_per_row": round(encoded / max(rows, 1), 1)}


def profile(n, k_m, num_clusters, workdir):
    tables = make_pool(n, num_clusters, seed=0, zipf_a=0.5, id_prefix="gs-img")
    d = os.path.join(workdir, f"pool-{n}")
    shards = max(1, n // 250_000)
    scores = write_sharded(tables["scores"], d, "scores", num_shards=shards, row_group_size=250_000)
    clusters = write_sharded(tables["clusters"], d, "clusters", num_shards=shards, row_group_size=250_000)
    del tables
    nj = int(min(4096, max(1, -(-n // ROWS_PER_JOIN_BUCKET))))
    stages = []

    def read(pattern, cols):
        files = table_io.inspect_inputs([pattern], "--x", {"example_id": "id"})
        units = [(f.path, f.fmt, g) for f in files for g in range(f.num_row_groups)]
        return [b for u in units for b in table_io.read_unit(u, cols, table_io.DEFAULT_BLOCK_ROWS)]

    score_blocks = read(scores, ["example_id", "margin"])
    stages.append(_measure("read scores", score_blocks))
    cluster_blocks = read(clusters, ["example_id", "cluster_id"])
    stages.append(_measure("read clusters", cluster_blocks))
    fn = impl.ScoreBlockFn("margin", "margin")
    scored = [o for b in score_blocks for o in fn.process(b) if not hasattr(o, "tag")]
    hist = sum(impl.priority_histogram(b, "cluster_margin", "margin") for b in scored)
    routed_scores = [o for b in scored for o in impl.route_scores(b, "cluster_margin", "margin", nj, k_m, hist, 0)]
    stages.append(_measure("route scores -> GroupById", routed_scores))
    routed_clusters = [o for b in cluster_blocks for o in impl.route_by_id_hash(b, "clusters", nj)]
    stages.append(_measure("route clusters -> GroupById", routed_clusters))
    groups = {}
    for key, value in routed_scores + routed_clusters:
        groups.setdefault(key, []).append(value)
    join = impl.JoinBucketFn("cluster_margin", "margin", 0)
    eligible = [o for item in groups.items() for o in join.process(item) if not hasattr(o, "tag")]
    stages.append(_measure("join -> eligible", eligible))
    keys = [impl.keys_of(b) for b in eligible]
    state = reference_kernels.kth_smallest_in_memory(np.concatenate(keys), k_m)
    mask_pool = [b.filter(impl.keys_of(b) <= np.uint64(state.prefix)) for b in eligible]
    stages.append(_measure("margin pool (<= threshold)", mask_pool))
    nb = int(min(MAX_BUCKETS, max(1, -(-k_m // ROWS_PER_SELECT_BUCKET))))
    sample = np.concatenate([impl.group_keys(b, False) for b in mask_pool])
    splitters = sk.splitters_from_sample(sample[:: max(1, sample.size // (64 * nb))], nb)
    routed_pool = [o for b in mask_pool for o in impl.route_by_group_key(b, splitters, False)]
    stages.append(_measure("route margin pool -> GroupByKeyRange", routed_pool))
    return {"n": n, "k_m": k_m, "join_buckets": nj, "select_buckets": nb, "stages": stages,
            "profile_process_peak_rss_mb": round(psutil.Process().memory_info().rss / 1e6)}


def _commit():
    import subprocess

    root = os.path.dirname(HERE)
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_cost(n, workdir, columns=("example_id", "margin"), samples=25):
    """CPU to read the scores of a nightly-like pool of n rows in ONE file of 64-row groups.

    `old`: the unit read before (open the file, parse its whole footer, read one row
    group), timed on `samples` row groups spread over the file and multiplied by the
    number of row groups; `new`: every unit of `table_io.read_units` read with the
    per-worker footer cache, timed whole.
    """
    from select_bench import write_nightly_like_pool

    directory = os.path.join(workdir, f"read-cost-{n}")
    scores, _, _, pool = write_nightly_like_pool(n, directory, 0.48, 64, 2000, shard_rows=n)
    (path,) = table_io.expand_glob(scores, "--scores")
    groups = pq.ParquetFile(path).metadata.num_row_groups
    picked = np.linspace(0, groups - 1, min(samples, groups)).astype(int)
    start = _cpu()
    for g in picked:
        with FileSystems.open(path) as f:
            pq.ParquetFile(f).read_row_group(int(g), columns=list(columns))
    old_unit = (_cpu() - start) / picked.size
    files = table_io.inspect_inputs([scores], "--scores", {"example_id": "id"})
    start = _cpu()
    cache = table_io._FooterCache()
    units = table_io.read_units(files, table_io.DEFAULT_BLOCK_ROWS)
    rows = sum(b.num_rows for u in units
               for b in table_io.read_unit(u, list(columns), table_io.DEFAULT_BLOCK_ROWS, cache.get(u[0])))
    new_total = _cpu() - start
    assert rows == n
    return {"rows": n, "files": 1, "row_groups": groups, "old_units": groups, "old_unit_cpu_ms": round(1000 * old_unit, 2),
            "old_read_cpu_seconds": round(old_unit * groups, 1), "new_units": len(units),
            "new_read_cpu_seconds": round(new_total, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000, 3_000_000])
    p.add_argument("--workdir", default=os.path.join(HERE, "data", "select_profile"))
    p.add_argument("--output", default=None)
    p.add_argument("--read_cost", type=int, nargs="+", default=None, help="Pool sizes for the read-cost measurement.")
    a = p.parse_args()
    command = "python benchmarks/select_profile.py " + " ".join(sys.argv[1:])
    if a.read_cost:
        points = []
        for n in a.read_cost:
            points.append(read_cost(n, a.workdir))
            print(json.dumps(points[-1]), flush=True)
        recorded = {}
        if a.output and os.path.exists(a.output):
            with open(a.output) as f:
                recorded = json.load(f)
        recorded["read_cost"] = {"command": command, "commit": _commit(), "points": points,
                                 "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if a.output:
            with open(a.output, "w") as f:
                json.dump(recorded, f, indent=2)
        return
    out = {"command": command, "runs": []}
    for n in a.n:
        t = time.time()
        r = profile(n, int(0.3 * n), int(0.23 * n), a.workdir)
        r["seconds"] = round(time.time() - t, 1)
        out["runs"].append(r)
        for s in r["stages"]:
            print(n, json.dumps(s), flush=True)
    out["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if a.output:
        with open(a.output, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
