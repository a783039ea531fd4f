"""Benchmark of cm-cluster (issue 3): quality against exact HAC, speed and memory at scale.

(a) fashion: 20K Fashion-MNIST training images (Debian package dataset-fashion-mnist,
    read from /usr/share/datasets/fashion-mnist; no download), PCA to 64 dims,
    L2-normalised, cosine. At eps 0.1, 0.2, 0.3: ARI of cm-cluster (default flags, 2
    workers) against exact HAC (fastcluster average linkage + fcluster 'distance'),
    wall time and peak memory of both, and of sklearn's connectivity-constrained
    average linkage on the same kNN graph (k = cm-cluster's default); also cm-cluster
    with the ivf kNN forced (what pools above --exact_max_points get).
(b) synthetic: clustered 64-d pools (Gaussian blobs around random unit directions,
    ~10 points per cluster), 250K and 1M points: wall time, peak memory, rounds,
    kNN recall, on the FnApiRunner ("DirectRunner") with 2 worker processes.
(c) crossover: exact vs ivf kNN on synthetic pools of a few sizes (where `auto` switches).
(e) extend (issue 15): N synthetic points clustered, then extended by N/10 more
    (`cm-cluster --extend`) against reclustering all 1.1 N: time ratio and ARI.
(d) blas_threads: (a)'s pool at eps 0.3, 2 worker processes, alternating runs with
    cm_beam.runtime.worker_threads' BLAS threads per worker (cores // workers) and with every
    worker using all cores' threads: medians of wall time and kNN stage time.
(e) ivf_fidelity: all 60K Fashion-MNIST training images (as (a), PCA-64 fit on them), 2
    workers. At eps 0.1, 0.2, 0.3: cm-cluster with exact kNN candidates, then with ivf at
    the default --num_probes and at --num_probes 2, and (--baseline_commit) the ivf of an
    earlier commit (its code from `git archive`): the partition's ARI against the exact
    one (numpy, `adjusted_rand_index`), the manifest's recall@k, rounds, wall time.

(f) ivf_timing: (e)'s pool at the first --eps: exact, default ivf and the --baseline_commit
    ivf in --repeats alternating rounds (one load for all): median wall times, ratios.
Every measured run is a separate child process; peak memory is the largest sum of
RSS over the child's whole process tree (Beam worker processes included), polled
every 0.2 s with psutil. Run it under `flock /tmp/cm-bench.lock` (shared machine):

    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part fashion
    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part synthetic --sizes 250000,1000000
    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part crossover --sizes 25000,50000,100000
    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part blas_threads
    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part extend --sizes 1000000
    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part ivf_fidelity --baseline_commit 4b26a8c
    flock /tmp/cm-bench.lock .venv/bin/python benchmarks/cluster_bench.py --part ivf_timing --eps 0.2 --repeats 2 --baseline_commit 4b26a8c

Results are merged into benchmarks/results/cluster.json (one key per part) with the
exact command that produced them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "cluster.json")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
WORKER_FLAGS = ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


# --- data -------------------------------------------------------------------------

def fashion_embeddings(n: int) -> np.ndarray:
    """First n training images, PCA-64 (fit on them), L2-normalised, float32."""
    path = os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: apt-get install dataset-fashion-mnist")
    with gzip.open(path) as f:
        raw = f.read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)[:n].astype(np.float64) / 255.0
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:64].T
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z.astype(np.float32)


def synthetic_pool(n: int, d: int = 64, points_per_cluster: int = 10, noise: float = 0.03, seed: int = 0):
    """Blobs around random unit directions: (float32 [n, d], true labels)."""
    rng = np.random.default_rng(seed)
    k = max(1, n // points_per_cluster)
    centers = rng.normal(size=(k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        sl = slice(start, min(n, start + 100_000))
        x[sl] = centers[labels[sl]] + noise * rng.normal(size=(sl.stop - sl.start, d)).astype(np.float32)
    return x, labels


def write_pool(x: np.ndarray, directory: str, rows_per_file: int = 100_000) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    n, d = x.shape
    for i, start in enumerate(range(0, n, rows_per_file)):
        stop = min(n, start + rows_per_file)
        ids = pa.array([f"img-{j:08d}" for j in range(start, stop)], pa.string())
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[start:stop].ravel(), pa.float32()), d)
        emb = emb.cast(pa.list_(pa.float32()))
        pq.write_table(pa.table({"example_id": ids, "embedding": emb}), os.path.join(directory, f"part-{i:05d}.parquet"),
                       row_group_size=32_768)
    return os.path.join(directory, "*.parquet")


# --- measuring child processes ----------------------------------------------------------

def measure(cmd, poll: float = 0.2, env=None, cwd=ROOT):
    """Runs cmd; returns (wall seconds, peak RSS of its process tree in bytes, stdout)."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    out_chunks = []
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(poll)
    out, err = proc.communicate()
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return wall, peak, out


def child(code: str, *args):
    """A python child process running `code` (a function of this module) on args."""
    return [sys.executable, os.path.abspath(__file__), "--child", code] + [str(a) for a in args]


# --- child entry points -----------------------------------------------------------

def _child_fastcluster(emb_path, out_path, eps_list):
    import fastcluster
    from scipy.cluster.hierarchy import fcluster

    z = np.load(emb_path)
    t = time.time()
    tree = fastcluster.linkage(z.astype(np.float64), method="average", metric="cosine")
    linkage_seconds = time.time() - t
    labels = {eps: fcluster(tree, float(eps), "distance").tolist() for eps in eps_list.split(",")}
    json.dump({"linkage_seconds": linkage_seconds, "labels": labels}, open(out_path, "w"))


def _child_sklearn(emb_path, out_path, eps, k):
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.neighbors import kneighbors_graph

    z = np.load(emb_path)
    t = time.time()
    graph = kneighbors_graph(z, int(k), metric="cosine", include_self=False)
    model = AgglomerativeClustering(n_clusters=None, distance_threshold=float(eps), linkage="average",
                                    metric="cosine", connectivity=graph)
    labels = model.fit_predict(z)
    json.dump({"seconds": time.time() - t, "labels": labels.tolist()}, open(out_path, "w"))


def _read_clusters(out_dir, n):
    from cm_beam.io import table_io

    t = table_io.read_table(os.path.join(out_dir, "clusters-*.parquet"))
    ids = t.column("example_id").to_pylist()
    cid = np.asarray(t.column("cluster_id").to_numpy())
    labels = np.empty(n, np.int64)
    labels[[int(i.split("-")[1]) for i in ids]] = cid
    return labels


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie), from their contingency
    table in numpy (sklearn need not be installed). 1.0 when both are one cluster or
    both all singletons (no pair to disagree on), as sklearn."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings of different shapes {a.shape}, {b.shape}")
    n = len(a)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    # Contingency cells: counts of each (a label, b label) pair present.
    _, cells = np.unique(ai.astype(np.int64) * (int(bi.max(initial=0)) + 1) + bi, return_counts=True)

    def pairs(counts):
        counts = np.asarray(counts, np.float64)
        return float((counts * (counts - 1) / 2).sum())

    index = pairs(cells)
    rows, cols = pairs(np.bincount(ai)), pairs(np.bincount(bi))
    total = n * (n - 1) / 2
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    if top == expected:
        return 1.0
    return (index - expected) / (top - expected)


def cm_cluster_cmd(pattern, out_dir, eps, extra=()):
    return [sys.executable, "-m", "pipelines.build_clusters", "--embeddings", pattern, "--output_dir", out_dir,
            "--overwrite", "--distance_threshold", str(eps)] + WORKER_FLAGS + list(extra)


# --- parts -----------------------------------------------------------------------------

def run_fashion(n: int, eps_list, workdir: str):
    from sklearn.metrics import adjusted_rand_score

    from cm_beam.clustering.build_clusters import DEFAULT_NUM_NEIGHBORS

    z = fashion_embeddings(n)
    emb_path = os.path.join(workdir, "fashion.npy")
    np.save(emb_path, z)
    pattern = write_pool(z, os.path.join(workdir, "fashion_pool"))
    fc_out = os.path.join(workdir, "fastcluster.json")
    fc_wall, fc_peak, _ = measure(child("fastcluster", emb_path, fc_out, ",".join(map(str, eps_list))))
    fc = json.load(open(fc_out))
    result = {"n": n, "dims": 64, "metric": "cosine",
              "fastcluster": {"wall_seconds_process": round(fc_wall, 2), "linkage_seconds": round(fc["linkage_seconds"], 2),
                              "peak_rss_mb": round(fc_peak / 2**20, 1)},
              "per_eps": []}
    for eps in eps_list:
        ref = np.asarray(fc["labels"][str(eps)])
        out_dir = os.path.join(workdir, f"cm_{eps}")
        wall, peak, _ = measure(cm_cluster_cmd(pattern, out_dir, eps))
        ours = _read_clusters(out_dir, n)
        manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
        sk_out = os.path.join(workdir, f"sk_{eps}.json")
        sk_wall, sk_peak, _ = measure(child("sklearn", emb_path, sk_out, eps, DEFAULT_NUM_NEIGHBORS))
        sk = json.load(open(sk_out))
        row = {
            "eps": eps,
            "exact_clusters": int(len(np.unique(ref))),
            "cm_cluster": {"ari": round(float(adjusted_rand_score(ref, ours)), 4), "clusters": int(len(np.unique(ours))),
                           "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1),
                           "rounds": manifest["rounds"], "knn_mode": manifest["parameters"]["knn_mode_used"],
                           "stage_seconds": manifest["timings"]["stage_seconds"]},
            "sklearn_connectivity_average": {"ari": round(float(adjusted_rand_score(ref, sk["labels"])), 4),
                                             "wall_seconds": round(sk_wall, 2), "fit_seconds": round(sk["seconds"], 2),
                                             "peak_rss_mb": round(sk_peak / 2**20, 1), "k": DEFAULT_NUM_NEIGHBORS},
        }
        row["speedup_vs_fastcluster_process"] = round(fc_wall / wall, 2)
        # The same pool through the ivf kNN (what pools above --exact_max_points get).
        out_ivf = os.path.join(workdir, f"cm_ivf_{eps}")
        wall_i, peak_i, _ = measure(cm_cluster_cmd(pattern, out_ivf, eps, ["--knn_mode", "ivf"]))
        man_i = json.load(open(os.path.join(out_ivf, "manifest.json")))
        row["cm_cluster_ivf"] = {"ari": round(float(adjusted_rand_score(ref, _read_clusters(out_ivf, n))), 4),
                                 "wall_seconds": round(wall_i, 2), "peak_rss_mb": round(peak_i / 2**20, 1),
                                 "knn_recall": man_i["knn_recall"],
                                 "num_partitions": man_i["parameters"]["num_partitions_used"],
                                 "stage_seconds": man_i["timings"]["stage_seconds"]}
        print(json.dumps(row), flush=True)
        result["per_eps"].append(row)
    return result


def run_blas_threads(n: int, eps: float, workdir: str, repeats: int):
    """cm-cluster on the Fashion-MNIST pool with 2 worker processes, alternating: BLAS
    threads per worker as cm_beam.runtime.worker_threads sets them (cores // workers) vs every
    worker with all cores' threads (set through the environment, which it respects)."""
    from cm_beam.runtime import worker_threads

    pattern = write_pool(fashion_embeddings(n), os.path.join(workdir, "fashion_pool"))
    base = {k: v for k, v in os.environ.items() if k not in worker_threads.THREAD_VARIABLES}
    cores = worker_threads.available_cores()
    variants = {"per_worker_share": base,
                "all_cores_each": dict(base, **{k: str(cores) for k in worker_threads.THREAD_VARIABLES})}
    runs = {name: [] for name in variants}
    for i in range(repeats):
        for name, env in variants.items():
            out_dir = os.path.join(workdir, f"blas_{name}")
            wall, peak, _ = measure(cm_cluster_cmd(pattern, out_dir, eps), env=env)
            manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
            runs[name].append({"wall_seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1),
                               "knn_stage_seconds": manifest["timings"]["stage_seconds"].get("knn")})
            print(name, runs[name][-1], flush=True)
    med = {name: {key: float(np.median([r[key] for r in rs])) for key in ("wall_seconds", "knn_stage_seconds")}
           for name, rs in runs.items()}
    return {"n": n, "eps": eps, "cores": cores, "workers": 2, "repeats": repeats, "runs": runs, "median": med,
            "wall_ratio_all_cores_over_share": round(med["all_cores_each"]["wall_seconds"]
                                                     / med["per_worker_share"]["wall_seconds"], 3),
            "knn_ratio_all_cores_over_share": round(med["all_cores_each"]["knn_stage_seconds"]
                                                    / med["per_worker_share"]["knn_stage_seconds"], 3)}


def _candidate_variants(workdir, baseline_commit):
    """[(name, where, cm-cluster flags)]: exact, ivf at the default --num_probes, (the ivf of
    `baseline_commit`, its tree extracted with `git archive`), ivf at --num_probes 2; the
    baseline's tree and full commit (None without one)."""
    from cm_beam.clustering.build_clusters import DEFAULT_NUM_PROBES

    variants = [("exact", [], ["--knn_mode", "exact"]),
                (f"ivf_default_probes_{DEFAULT_NUM_PROBES}", [], ["--knn_mode", "ivf"]),
                ("ivf_probes_2", [], ["--knn_mode", "ivf", "--num_probes", "2"])]
    baseline = full = None
    if baseline_commit:
        full = subprocess.run(["git", "rev-parse", baseline_commit], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        baseline = os.path.join(workdir, f"baseline_{full[:12]}")
        if not os.path.isdir(baseline):
            os.makedirs(baseline)
            archive = subprocess.run(["git", "archive", full], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", baseline], input=archive, check=True)
        variants.insert(2, (f"ivf_at_{full[:12]}", ["baseline"], ["--knn_mode", "ivf"]))
    return variants, baseline, full


def _run_variant(pattern, out_dir, eps, where, flags, baseline):
    """One cm-cluster run: (wall seconds, peak RSS bytes, manifest)."""
    cmd, env, cwd = cm_cluster_cmd(pattern, out_dir, eps, flags), None, ROOT
    if where:
        # The earlier commit's code: its tree is the working directory (Beam's worker
        # processes put theirs first on the path) and the whole PYTHONPATH.
        env, cwd = dict(os.environ, PYTHONPATH=baseline), baseline
    wall, peak, _ = measure(cmd, env=env, cwd=cwd)
    return wall, peak, json.load(open(os.path.join(out_dir, "manifest.json")))


def run_ivf_timing(n: int, eps: float, workdir: str, baseline_commit, repeats: int):
    """Wall time of exact, default ivf and (baseline_commit) the earlier ivf on the 60K
    pool at one eps, in alternating rounds so all see the same load: medians, ratios."""
    pattern = write_pool(fashion_embeddings(n), os.path.join(workdir, "fashion_pool"))
    variants, baseline, full = _candidate_variants(workdir, baseline_commit)
    variants = [v for v in variants if v[0] != "ivf_probes_2"]
    runs = {name: [] for name, _, _ in variants}
    for _ in range(repeats):
        for name, where, flags in variants:
            wall, peak, man = _run_variant(pattern, os.path.join(workdir, f"time_{name}"), eps, where, flags, baseline)
            runs[name].append({"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20, 1),
                               "knn_stage_seconds": man["timings"]["stage_seconds"].get("knn"),
                               "rounds": man["rounds"]})
            print(name, runs[name][-1], flush=True)
    med = {name: float(np.median([r["wall_seconds"] for r in rs])) for name, rs in runs.items()}
    default = variants[1][0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"n": n, "eps": eps, "workers": 2, "repeats": repeats, "commit": head, "baseline_commit": full,
            "runs": runs, "median_wall_seconds": med,
            "wall_ratio_default_ivf_over": {name: round(med[default] / m, 3) for name, m in med.items()
                                            if name != default}}


def run_ivf_fidelity(n: int, eps_list, workdir: str, baseline_commit, results_path: str, command: str):
    """Exact vs ivf kNN candidates on real embeddings, side by side at each eps: the
    partition's ARI against the exact-candidate one, recall@k, rounds, wall time. Each
    eps's rows are saved as soon as they exist (runs are minutes each)."""
    from cm_beam.clustering.build_clusters import DEFAULT_NUM_PROBES

    pattern = write_pool(fashion_embeddings(n), os.path.join(workdir, "fashion_pool"))
    variants, baseline, full = _candidate_variants(workdir, baseline_commit)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "cm_beam", "pipelines"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    result = {"n": n, "dims": 64, "metric": "cosine", "workers": 2, "commit": head, "code_dirty": dirty,
              "baseline_commit": baseline_commit and full, "variants": [v[0] for v in variants],
              "default_num_probes": DEFAULT_NUM_PROBES, "per_eps": [], "command": command}
    rows = {eps: {"eps": eps} for eps in eps_list}
    result["per_eps"] = [rows[eps] for eps in eps_list]
    labels = {}
    # Exact and default ivf first, side by side at each eps; the comparisons after them.
    for phase in (variants[:2], variants[2:]):
        for eps in eps_list:
            for name, where, flags in phase:
                out_dir = os.path.join(workdir, f"fid_{name}_{eps}")
                wall, peak, man = _run_variant(pattern, out_dir, eps, where, flags, baseline)
                labels[name, eps] = _read_clusters(out_dir, n)
                rec = {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20, 1),
                       "rounds": man["rounds"], "clusters": man["clusters"],
                       "largest_cluster": man["largest_cluster"], "knn_recall": man["knn_recall"],
                       "num_partitions": man["parameters"]["num_partitions_used"],
                       "knn_stage_seconds": man["timings"]["stage_seconds"].get("knn"),
                       "pipeline_seconds": man["timings"].get("pipeline_seconds"),
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                if name != "exact":
                    rec["num_probes"] = man["parameters"]["num_probes"]
                    rec["ari_vs_exact"] = round(adjusted_rand_index(labels["exact", eps], labels[name, eps]), 6)
                rows[eps][name] = rec
                print(json.dumps({"eps": eps, name: rec}), flush=True)
                _save_part(results_path, "ivf_fidelity", dict(result, machine=_machine()))
    return result


def _machine():
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _save_part(path, part, result):
    results = json.load(open(path)) if os.path.exists(path) else {}
    results[part] = result
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


def run_synthetic(sizes, eps: float, workdir: str, extra):
    from sklearn.metrics import adjusted_rand_score

    rows = []
    for n in sizes:
        x, truth = synthetic_pool(n)
        pattern = write_pool(x, os.path.join(workdir, f"synthetic_{n}"))
        del x
        out_dir = os.path.join(workdir, f"cm_synth_{n}")
        try:
            wall, peak, stdout = measure(cm_cluster_cmd(pattern, out_dir, eps, extra))
        except RuntimeError as e:  # record the failure (e.g. out of memory) and go on
            rows.append({"n": n, "eps": eps, "failed": str(e)[-2000:]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
        ours = _read_clusters(out_dir, n)
        row = {"n": n, "eps": eps, "wall_seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20, 1),
               "rounds": manifest["rounds"], "beam_rounds": len(manifest["beam_rounds"]),
               "inmemory_rounds": len(manifest["inmemory_rounds"]),
               "knn_mode": manifest["parameters"]["knn_mode_used"],
               "num_partitions": manifest["parameters"]["num_partitions_used"],
               "knn_recall": manifest["knn_recall"], "clusters": manifest["clusters"],
               "ari_vs_generating_blobs": round(float(adjusted_rand_score(truth, ours)), 4),
               "pipeline_seconds": manifest["timings"]["pipeline_seconds"],
               "stage_seconds": manifest["timings"]["stage_seconds"],
               "per_round": manifest["beam_rounds"]}
        print(json.dumps({k: v for k, v in row.items() if k != "per_round"}), flush=True)
        rows.append(row)
    out = {"runner": "FnApiRunner, 2 worker processes (multi_processing)", "rows": rows}
    by_n = {r["n"]: r["wall_seconds"] for r in rows if "wall_seconds" in r}
    if 250_000 in by_n and 1_000_000 in by_n:
        out["time_ratio_1M_over_250K"] = round(by_n[1_000_000] / by_n[250_000], 2)
    return out


def run_extend(sizes, eps: float, workdir: str, extra):
    """Issue 15: a clustering of N synthetic points extended by N/10 more (`cm-cluster --extend`)
    against reclustering all 1.1 N: wall time of each (2 worker processes) and the ARI of the
    extended clustering against the reclustering."""
    from sklearn.metrics import adjusted_rand_score

    rows = []
    for n in sizes:
        n_new = n // 10
        x, _ = synthetic_pool(n + n_new)
        old_pattern = write_pool(x[:n], os.path.join(workdir, f"extend_old_{n}"))
        all_pattern = write_pool(x, os.path.join(workdir, f"extend_all_{n}"))
        del x
        old_dir, all_dir, ext_dir = (os.path.join(workdir, f"extend_{kind}_{n}_clusters") for kind in ("old", "all", "ext"))
        measure(cm_cluster_cmd(old_pattern, old_dir, eps, extra))
        wall_all, peak_all, _ = measure(cm_cluster_cmd(all_pattern, all_dir, eps, extra))
        wall_ext, peak_ext, _ = measure([sys.executable, "-m", "pipelines.build_clusters", "--extend", old_dir,
                                         "--embeddings", all_pattern, "--output_dir", ext_dir, "--overwrite"]
                                        + WORKER_FLAGS + list(extra))
        manifest = json.load(open(os.path.join(ext_dir, "manifest.json")))
        full, ext = _read_clusters(all_dir, n + n_new), _read_clusters(ext_dir, n + n_new)
        row = {"n_old": n, "n_new": n_new, "eps": eps, "recluster_wall_seconds": round(wall_all, 1),
               "extend_wall_seconds": round(wall_ext, 1), "time_ratio_extend_over_recluster": round(wall_ext / wall_all, 3),
               "recluster_peak_rss_mb": round(peak_all / 2**20, 1), "extend_peak_rss_mb": round(peak_ext / 2**20, 1),
               "ari_extended_vs_reclustered": round(float(adjusted_rand_score(full, ext)), 4),
               "extension": manifest["extension"], "extend_stage_seconds": manifest["timings"]["stage_seconds"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"runner": "FnApiRunner, 2 worker processes (multi_processing)", "rows": rows}


def run_crossover(sizes, eps: float, workdir: str):
    """Exact vs ivf kNN on the same synthetic pools: where auto should switch."""
    from sklearn.metrics import adjusted_rand_score

    rows = []
    for n in sizes:
        x, _ = synthetic_pool(n, seed=1)
        pattern = write_pool(x, os.path.join(workdir, f"crossover_{n}"))
        del x
        row = {"n": n}
        labels = {}
        for mode in ("exact", "ivf"):
            out_dir = os.path.join(workdir, f"cm_cross_{mode}_{n}")
            wall, peak, _ = measure(cm_cluster_cmd(pattern, out_dir, eps, ["--knn_mode", mode]))
            man = json.load(open(os.path.join(out_dir, "manifest.json")))
            labels[mode] = _read_clusters(out_dir, n)
            row[mode] = {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20, 1),
                         "knn_stage_seconds": man["timings"]["stage_seconds"].get("knn"),
                         "knn_recall": man["knn_recall"]}
        row["ari_ivf_vs_exact"] = round(float(adjusted_rand_score(labels["exact"], labels["ivf"])), 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"eps": eps, "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("fashion", "synthetic", "crossover", "blas_threads", "extend", "ivf_fidelity",
                                      "ivf_timing"),
                   required=True)
    p.add_argument("--repeats", type=int, default=3, help="Alternating runs per variant (part blas_threads).")
    p.add_argument("--n", type=int, default=None,
                   help="Fashion-MNIST images (parts fashion, blas_threads: 20,000; ivf_fidelity: 60,000).")
    p.add_argument("--baseline_commit", default=None,
                   help="Part ivf_fidelity: also run the ivf kNN of this commit (the earlier candidate rule).")
    p.add_argument("--eps", default="0.1,0.2,0.3", help="Thresholds (part fashion).")
    p.add_argument("--sizes", default="250000,1000000", help="Pool sizes (part synthetic).")
    p.add_argument("--synthetic_eps", type=float, default=0.1, help="Threshold (part synthetic, cosine).")
    p.add_argument("--workdir", default=None)
    p.add_argument("--results", default=RESULTS)
    args, extra = p.parse_known_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="cm_cluster_bench_")
    command = "flock /tmp/cm-bench.lock .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    n = args.n or (60_000 if args.part in ("ivf_fidelity", "ivf_timing") else 20_000)
    if args.part == "fashion":
        result = run_fashion(n, [float(e) for e in args.eps.split(",")], workdir)
    elif args.part == "blas_threads":
        result = run_blas_threads(n, 0.3, workdir, args.repeats)
    elif args.part == "extend":
        result = run_extend([int(s) for s in args.sizes.split(",")], args.synthetic_eps, workdir, extra)
    elif args.part == "ivf_timing":
        result = run_ivf_timing(n, float(args.eps.split(",")[0]), workdir, args.baseline_commit, args.repeats)
    elif args.part == "ivf_fidelity":
        result = run_ivf_fidelity(n, [float(e) for e in args.eps.split(",")], workdir, args.baseline_commit,
                                  args.results, command)
    elif args.part == "crossover":
        result = run_crossover([int(s) for s in args.sizes.split(",")], args.synthetic_eps, workdir)
    else:
        result = run_synthetic([int(s) for s in args.sizes.split(",")], args.synthetic_eps, workdir, extra)
    result["command"] = command
    result["machine"] = _machine()
    _save_part(args.results, args.part, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_eps", "rows")}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        {"fastcluster": _child_fastcluster, "sklearn": _child_sklearn}[sys.argv[2]](*sys.argv[3:])
    else:
        main()
