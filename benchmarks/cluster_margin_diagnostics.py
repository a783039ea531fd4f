"""Why Cluster-Margin does what it does in the label-efficiency runs: clusters and picks.

Reads the completed curves of `benchmarks/label_efficiency.py` and the stage outputs
they left in its work dir (cm-cluster's clusters, each round's cm-embed scores and
cm-select batch), and measures, per (setting, strategy, seed):

* the HAC clusters the batch was chosen with (cluster_margin only): the share of the
  pool in singletons, in clusters of 2-10, 11-100 and > 100 points; on the redundant
  pool, how many clusters the near-copies of one source image are spread over and
  the share of sources whose copies all share one cluster (what Cluster-Margin
  needs to avoid picking two copies);
* each batch against the model that chose it: the uncertainty rank of every pick
  among the unlabeled pool (0 = most uncertain), as the median rank, the share of
  picks among the k_t most uncertain (Margin's own batch) and, for cluster_margin,
  the share of picks from singleton clusters.

Writes `benchmarks/results/label_efficiency/cluster_diagnostics.json` (with the
command); `label_efficiency.py --report_only` quotes it in the README section.

    .venv/bin/python benchmarks/cluster_margin_diagnostics.py [--work_dir /tmp/cm-label-efficiency]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from al_product import _read_dir  # the same reader the product strategies use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("margin", "cluster_margin")


def _int_ids(column) -> np.ndarray:
    return np.array(column.to_pylist(), dtype=np.int64)


def cluster_structure(cluster_of: np.ndarray, copies: int) -> dict:
    """Shares of the pool by cluster size; for copies > 1, how near-copies are grouped."""
    _, inverse, sizes = np.unique(cluster_of, return_inverse=True, return_counts=True)
    size_of_point = sizes[inverse]
    n = cluster_of.size
    out = {
        "points": int(n), "clusters": int(sizes.size),
        "share_in_singletons": float(np.mean(size_of_point == 1)),
        "share_in_size_2_10": float(np.mean((size_of_point >= 2) & (size_of_point <= 10))),
        "share_in_size_11_100": float(np.mean((size_of_point >= 11) & (size_of_point <= 100))),
        "share_in_size_over_100": float(np.mean(size_of_point > 100)),
    }
    if copies > 1 and n % copies == 0:
        # Row i is copy (i % copies) of source i // copies (benchmarks/al_data.near_duplicates).
        per_source = cluster_of.reshape(-1, copies)
        distinct = np.array([np.unique(row).size for row in per_source])
        out["copies_per_source"] = copies
        out["mean_clusters_per_source"] = float(distinct.mean())
        out["share_sources_in_one_cluster"] = float(np.mean(distinct == 1))
    return out


def batch_against_model(work: str, round_index: int, cluster_sizes: dict, batch_size: int) -> dict:
    """Uncertainty ranks of one round's picks among the unlabeled pool under the round's model."""
    rd = os.path.join(work, f"round{round_index}")
    scores = _read_dir(os.path.join(rd, "embed"), "embeddings", ["example_id", "margin"])
    ids = _int_ids(scores.column("example_id"))
    margin = scores.column("margin").to_numpy()
    labeled = set(_int_ids(pq.read_table(os.path.join(rd, "labeled.parquet")).column("example_id")).tolist())
    unlabeled = np.array([i not in labeled for i in ids.tolist()])
    ids, margin = ids[unlabeled], margin[unlabeled]
    order = np.lexsort((ids, margin))  # ascending margin = most uncertain first
    rank = np.empty(ids.size, np.int64)
    rank[order] = np.arange(ids.size)
    rank_of = dict(zip(ids.tolist(), rank.tolist()))
    sel = _read_dir(os.path.join(rd, "selection"), "selection", ["example_id", "cluster_id"])
    picks = _int_ids(sel.column("example_id"))
    ranks = np.array([rank_of[i] for i in picks.tolist()])
    out = {"round": round_index, "picks": int(picks.size), "median_uncertainty_rank": float(np.median(ranks)),
           "share_in_top_k_t": float(np.mean(ranks < batch_size)), "unlabeled": int(ids.size)}
    if cluster_sizes:
        pick_sizes = np.array([cluster_sizes.get(c, 1) for c in sel.column("cluster_id").to_pylist()])
        out["share_from_singleton_clusters"] = float(np.mean(pick_sizes == 1))
    return out


def diagnose_curve(record: dict, work: str) -> dict:
    config = record["config"]
    copies = config["redundant_copies"] if record["setting"] == "redundant" else 1
    out = {"setting": record["setting"], "strategy": record["strategy"], "seed": record["seed"]}
    cluster_sizes = {}
    if record["strategy"] == "cluster_margin":
        clusters = _read_dir(os.path.join(work, "clusters"), "clusters", ["example_id", "cluster_id"])
        ids = _int_ids(clusters.column("example_id"))
        cluster_of = np.empty(ids.size, np.int64)
        cluster_of[ids] = clusters.column("cluster_id").to_numpy()
        out["clusters"] = cluster_structure(cluster_of, copies)
        u, c = np.unique(cluster_of, return_counts=True)
        cluster_sizes = dict(zip(u.tolist(), c.tolist()))
    out["batches"] = [batch_against_model(work, r, cluster_sizes, config["batch_size"])
                      for r in range(config["rounds"])]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--work_dir", default="/tmp/cm-label-efficiency")
    args = p.parse_args(argv)
    command = " ".join(["python", "benchmarks/cluster_margin_diagnostics.py"]
                       + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    curves, missing = [], []
    for path in sorted(glob.glob(os.path.join(args.results_dir, "label_efficiency", "curves", "*.json"))):
        record = json.load(open(path))
        if record["strategy"] not in STRATEGIES:
            continue
        work = os.path.join(args.work_dir, f"{record['setting']}__{record['strategy']}__seed{record['seed']}-{record['config_key']}")
        try:
            curves.append(diagnose_curve(record, work))
        except (FileNotFoundError, RuntimeError) as e:  # the curve's work dir is gone or incomplete
            missing.append({"curve": os.path.basename(path), "missing": str(e)})
        print(f"{os.path.basename(path)}: done", flush=True)
    summary = {}
    for setting in sorted({c["setting"] for c in curves}):
        for strategy in STRATEGIES:
            cs = [c for c in curves if c["setting"] == setting and c["strategy"] == strategy]
            if not cs:
                continue
            batches = [b for c in cs for b in c["batches"]]
            s = {"curves": len(cs),
                 "median_uncertainty_rank": float(np.mean([b["median_uncertainty_rank"] for b in batches])),
                 "share_in_top_k_t": float(np.mean([b["share_in_top_k_t"] for b in batches]))}
            if strategy == "cluster_margin":
                s["share_from_singleton_clusters"] = float(np.mean([b["share_from_singleton_clusters"] for b in batches]))
                for key in ("share_in_singletons", "share_in_size_over_100", "mean_clusters_per_source",
                            "share_sources_in_one_cluster"):
                    vals = [c["clusters"][key] for c in cs if key in c["clusters"]]
                    if vals:
                        s[key] = float(np.mean(vals))
            summary[f"{setting}/{strategy}"] = s
    result = {"command": command, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "description": __doc__.split("\n\n")[0], "summary": summary, "curves": curves, "missing": missing}
    out = os.path.join(args.results_dir, "label_efficiency", "cluster_diagnostics.json")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
