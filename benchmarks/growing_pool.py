"""Growing pools (issue 15): where do examples that arrived after clustering go in the batch?

On the demo pool (cm-nightly --demo: 3,000 generated images, the demo's model and its
labeled seed set excluded), 10% of the examples are held out of the clustering (they
"arrived after it"). For each k_m / k_t, cm-select picks a batch of 200 (seed 1) with

* `unclustered`: the old clustering; the new examples have no cluster row (singletons);
* `extended`: the old clustering extended by the new examples (`cm-cluster --extend`);
* `all`: everything clustered together (cm-cluster on the whole pool);

and we report the new examples' share of the margin pool (the k_m most uncertain
unlabeled examples) and of each batch. Target (issue 15): `extended` within 3 points of
`all`.

    python benchmarks/growing_pool.py            # writes benchmarks/results/growing_pool.json
    python benchmarks/growing_pool.py --work /tmp/cm-growing-pool --readme   # and prints the table
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cm_beam.io import table_io  # noqa: E402
from pipelines import build_clusters, nightly, select_batch  # noqa: E402

FACTORS = (10.0, 4.0, 1.25)
BATCH = 200
SEED = 1
NEW_FRACTION = 0.10
EPS = nightly.DEMO_DISTANCE_THRESHOLD
RUNNER = ["--runner=FnApiRunner"]


def _commit() -> str:
    try:
        sha = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "HEAD"], text=True).strip()
        dirty = subprocess.call(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "cm_beam", "pipelines"]) != 0
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _demo(work: str):
    """The demo pool, embedded (cm-nightly --demo, cached in `work`)."""
    night = os.path.join(work, "night")
    if not glob.glob(os.path.join(night, "embeddings", "*", "manifest.json")):
        nightly.run(["--demo", "--work_dir", night, "--seed", str(SEED), "--report", "false"] + RUNNER)
    emb_dir = os.path.dirname(sorted(glob.glob(os.path.join(night, "embeddings", "*", "manifest.json")))[0])
    demo = nightly.read_demo_info(night)
    return os.path.join(emb_dir, "embeddings-*.parquet"), demo["labeled"]


def _write_subset(table, rows, path):
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table.take(rows), path)


def adjusted_rand_index(a, b) -> float:
    """ARI of two labelings (plain numpy: pair counts of the contingency table)."""
    _, ia = np.unique(np.asarray(a), return_inverse=True)
    _, ib = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(table, (ia, ib), 1)
    pairs = lambda x: (x * (x - 1) // 2).sum()  # noqa: E731
    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(ia)]))
    expected = rows * cols / total
    top = (rows + cols) / 2
    return float((index - expected) / (top - expected)) if top != expected else 1.0


def _labels(directory, ids):
    t = table_io.read_table(os.path.join(directory, "clusters-*.parquet"))
    of = dict(zip(t.column("example_id").to_pylist(), t.column("cluster_id").to_pylist()))
    return np.array([of[i] for i in ids])


def _labels_or_none(directory, ids):
    t = table_io.read_table(os.path.join(directory, "clusters-*.parquet"))
    of = dict(zip(t.column("example_id").to_pylist(), t.column("cluster_id").to_pylist()))
    return [of.get(i) for i in ids]


def run(work: str, seed: int = SEED, new_fraction: float = NEW_FRACTION, factors=FACTORS):
    """One held-out draw and its batches; `seed` draws the new examples and seeds cm-select."""
    import pyarrow as pa

    embeddings, labeled = _demo(work)
    work = os.path.join(work, f"seed{seed}" + ("" if new_fraction == NEW_FRACTION else f"_new{new_fraction:g}"))
    pool = table_io.read_table(embeddings, columns=["example_id", "embedding", "margin"])
    ids = np.asarray(pool.column("example_id").to_pylist())
    margin = pool.column("margin").to_numpy()
    # Salted: the demo draws its labeled seed set with default_rng(seed + 1) and its pixels
    # with default_rng(seed); an unsalted draw here would pick exactly the seed set at seed 2.
    rng = np.random.default_rng([seed, 15])
    new = np.zeros(len(ids), bool)
    new[rng.choice(len(ids), int(round(new_fraction * len(ids))), replace=False)] = True
    old_emb = os.path.join(work, "old", "embeddings.parquet")
    _write_subset(pool.select(["example_id", "embedding"]), pa.array(np.flatnonzero(~new)), old_emb)
    timings = {}

    def cluster(name, argv):
        out = os.path.join(work, name)
        t = time.perf_counter()
        m = build_clusters.run(argv + ["--output_dir", out, "--overwrite"] + RUNNER)
        timings[name] = round(time.perf_counter() - t, 2)
        return out, m

    c_old, m_old = cluster("clusters_old", ["--embeddings", old_emb, "--distance_threshold", str(EPS)])
    c_all, m_all = cluster("clusters_all", ["--embeddings", embeddings, "--distance_threshold", str(EPS)])
    c_ext, m_ext = cluster("clusters_extended", ["--extend", c_old, "--embeddings", embeddings])
    with open(labeled) as f:
        excluded = {line.strip() for line in f.readlines()[1:] if line.strip()}
    eligible = np.array([i not in excluded for i in ids])
    new_ids = set(ids[new])
    rows = []
    for factor in factors:
        k_m = int(round(factor * BATCH))
        order = np.argsort(margin[eligible], kind="stable")[:k_m]
        margin_share = float(new[eligible][order].mean())
        row = {"k_m_over_k_t": factor, "k_m": k_m, "new_share_of_margin_pool": margin_share}
        for name, clusters in (("unclustered", c_old), ("extended", c_ext), ("all", c_all)):
            out = os.path.join(work, f"batch_{name}_{factor}")
            select_batch.run(["--scores", embeddings, "--clusters", os.path.join(clusters, "clusters-*.parquet"),
                              "--exclude", labeled, "--batch_size", str(BATCH), "--margin_pool_factor", str(factor),
                              "--seed", str(seed), "--output_dir", out, "--overwrite"] + RUNNER)
            picked = table_io.read_table(os.path.join(out, "selection-*.parquet")).column("example_id").to_pylist()
            assert len(picked) == BATCH
            row[f"new_share_of_batch_{name}"] = float(np.mean([p in new_ids for p in picked]))
        row["extended_minus_all_points"] = 100 * (row["new_share_of_batch_extended"] - row["new_share_of_batch_all"])
        rows.append(row)
    return {
        "pool": {"examples": int(len(ids)), "new": int(new.sum()), "excluded_seed_set": len(excluded),
                 "eps": EPS, "metric": "cosine", "batch_size": BATCH, "seed": seed},
        "clusterings": {
            "old": {"clusters": m_old["clusters"], "points": m_old["n"]},
            "all": {"clusters": m_all["clusters"], "points": m_all["n"]},
            "extended": {"clusters": m_ext["clusters"], "points": m_ext["n"], "extension": m_ext["extension"]},
        },
        "seconds": timings,
        "ari_extended_vs_all": adjusted_rand_index(_labels(c_ext, ids), _labels(c_all, ids)),
        "ari_unclustered_vs_all": adjusted_rand_index(
            [(x if x is not None else -1 - i) for i, x in enumerate(_labels_or_none(c_old, ids))], _labels(c_all, ids)),
        "rows": rows,
    }


def markdown(result) -> str:
    lines = ["| k_m / k_t | new examples' share of the margin pool | of the batch (new ones unclustered) | "
             "of the batch (extended: `cm-cluster --extend`) | of the batch (everything clustered) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['k_m_over_k_t']:g} | {100 * r['new_share_of_margin_pool']:.1f}% | "
                     f"{100 * r['new_share_of_batch_unclustered']:.1f}% | {100 * r['new_share_of_batch_extended']:.1f}% | "
                     f"{100 * r['new_share_of_batch_all']:.1f}% |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/cm-growing-pool", help="Scratch directory (the demo pool is cached here).")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "growing_pool.json"))
    ap.add_argument("--fractions", default="",
                    help="Comma-separated shares of new examples to sweep (e.g. 0.1,0.25,0.5) at seed 1, k_m = 10 k_t: "
                         "ARI of the extension against a reclustering, batch shares, seconds; written to "
                         "benchmarks/results/growing_pool_fractions.json. Skips the main table.")
    ap.add_argument("--seeds", default="1", help="Comma-separated seeds (held-out draw and cm-select seed); the "
                                                 "table is seed 1's, the others give the spread.")
    args = ap.parse_args()
    if args.fractions:
        sweep = []
        for fraction in [float(x) for x in args.fractions.split(",")]:
            r = run(args.work, SEED, fraction, factors=(10.0,))
            sweep.append({"new_fraction": fraction, "ari_extended_vs_all": r["ari_extended_vs_all"],
                          "ari_unclustered_vs_all": r["ari_unclustered_vs_all"], "seconds": r["seconds"],
                          "extension": r["clusterings"]["extended"]["extension"], **r["rows"][0]})
            row = sweep[-1]
            print(f"new {fraction:g}: ARI extended/all {row['ari_extended_vs_all']:.3f} (unclustered/all "
                  f"{row['ari_unclustered_vs_all']:.3f}); batch share new: unclustered "
                  f"{100 * row['new_share_of_batch_unclustered']:.1f}%, extended {100 * row['new_share_of_batch_extended']:.1f}%, "
                  f"all {100 * row['new_share_of_batch_all']:.1f}%; seconds {row['seconds']}")
        with open(os.path.join(ROOT, "benchmarks", "results", "growing_pool_fractions.json"), "w") as f:
            json.dump({"benchmark": "growing_pool_fractions", "commit": _commit(),
                       "command": f"python benchmarks/growing_pool.py --fractions {args.fractions}", "rows": sweep},
                      f, indent=2)
        return
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = {s: run(args.work, s) for s in seeds}
    first = runs[seeds[0]]
    result = {"benchmark": "growing_pool", "commit": _commit(),
              "command": f"python benchmarks/growing_pool.py --seeds {args.seeds}",
              **first, "runs": {str(s): r["rows"] for s, r in runs.items()}}
    if len(seeds) > 1:
        result["mean_over_seeds"] = [
            {"k_m_over_k_t": f, **{key: float(np.mean([[r for r in runs[s]["rows"] if r["k_m_over_k_t"] == f][0][key]
                                                       for s in seeds]))
                                   for key in runs[seeds[0]]["rows"][0] if key.startswith(("new_share", "extended_minus"))}}
            for f in FACTORS]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    for row in result.get("mean_over_seeds", []):
        print(f"mean over seeds {args.seeds}: k_m/k_t {row['k_m_over_k_t']:g}: unclustered "
              f"{100 * row['new_share_of_batch_unclustered']:.1f}%, extended {100 * row['new_share_of_batch_extended']:.1f}%, "
              f"all {100 * row['new_share_of_batch_all']:.1f}%, extended - all {row['extended_minus_all_points']:+.1f} points")


if __name__ == "__main__":
    main()
