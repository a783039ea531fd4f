"""Which Cluster-Margin settings save labels: a study on calibration pools only.

Cluster-Margin has two settings the paper's readable text does not fix: the margin
pool size k_m as a multiple of the batch size k_t, and the granularity of the HAC
clusters (here: the mean cluster size of the cut). This study measures them with the
label-efficiency simulation of `benchmarks/label_efficiency.py` (same CNN, same
product pipelines, same test set) on two **calibration** pools whose source images
are Fashion-MNIST training images 0-29,999 only:

* `redundant_cal`: 12,000 sources x 5 near-copies (shifts and pixel noise);
* `zipf_cal`: 6,000 sources, each repeated a Zipf-distributed number of times (1 to
  40; most once or twice, a few dozens of times), copies flipped, shifted,
  contrast-changed and noised.

The evaluation pools of `label_efficiency.py` (`redundant_heldout`, `zipf_heldout`
from training images 30,000-59,999; `plain`, `redundant`, `large_batch`) play no part
here. Batches of 2,000 after a seed set of 1,000, 4 rounds.

The grid: k_m / k_t in FACTORS x mean cluster size in SIZES. Each (pool, seed)
clusters its seed model's embeddings once (cm-cluster's merge hierarchy) and every
configuration cuts that one hierarchy at its size (`cm-cluster --recut_from`).

RULE (below) was written into this file before any of its runs; the choice is
computed from the recorded curves by `choose()`, never by hand.

Resume: each finished curve is a JSON file in `<results>/cm_settings_study/curves/`
and is skipped by a rerun; the study JSON (`cm_settings_study.json`) and the plots are
rewritten after every curve. Stages run in order; a stage that needs the ranking of an
earlier one waits until that stage is complete.

    .venv/bin/python benchmarks/cm_settings_study.py               # hours; resumable
    .venv/bin/python benchmarks/cm_settings_study.py --report_only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import label_efficiency as le  # noqa: E402

_LOG = logging.getLogger("cm_settings_study")

POOLS = le.CALIBRATION_SETTINGS  # ("redundant_cal", "zipf_cal")
FACTORS = (1.25, 2.0, 4.0, 10.0)
SIZES = (3.0, 10.0, 30.0)
STAGE1_SEEDS = (0,)
MORE_SEEDS = (1, 2)
TOP = 3
REFERENCES = ("margin", "random")  # for context only: never part of the choice
TIE = 0.0005

RULE = (
    "Score of a configuration = the mean test accuracy over the budget points after the seed set (3,000, 5,000, "
    "7,000 and 9,000 labels), averaged over both calibration pools (redundant_cal, zipf_cal) and over the seeds run. "
    "Stage 1: the 12 configurations (k_m/k_t in {1.25, 2, 4, 10} x mean cluster size in {3, 10, 30}) at seed 0, "
    "ranked by that score. Stage 2: the 3 best of stage 1 at seeds 1 and 2. Stage 3: the best of those (3-seed score) "
    "again with its clusters rebuilt on every round's model (re-clustering), seeds 0, 1, 2. The winner is the "
    "configuration with the highest 3-seed score among the 3 of stage 2 and the re-clustering variant. Scores within "
    "0.0005 of each other tie; ties go to the smaller k_m/k_t, then to no re-clustering (cheaper), then to the larger "
    "mean cluster size. Margin and Random at seed 0 are run on both pools for reference only. Only calibration pools "
    "are used."
)


@dataclasses.dataclass(frozen=True)
class Variant:
    factor: float
    size: float
    recluster: bool = False

    def cm(self, base: le.ClusterMarginConfig) -> le.ClusterMarginConfig:
        return dataclasses.replace(base, margin_pool_factor=self.factor, target_cluster_size=self.size,
                                   recluster=self.recluster)

    @property
    def label(self) -> str:
        return self.cm(le.ClusterMarginConfig()).label()

    def tie_key(self) -> Tuple:
        return (self.factor, self.recluster, -self.size)


GRID = tuple(Variant(f, s) for f in FACTORS for s in SIZES)


def curve_file(out_dir: str, pool: str, label: str, seed: int) -> str:
    return os.path.join(out_dir, f"{pool}__{label}__seed{seed}.json")


def load(out_dir: str, base: le.Config, pool: str, label: str, strategy: str, seed: int,
         cm: Optional[le.ClusterMarginConfig] = None) -> Optional[dict]:
    path = curve_file(out_dir, pool, label, seed)
    if not os.path.exists(path):
        return None
    config = dataclasses.replace(base, cm=cm) if cm else base
    record = le._read_json(path)
    return record if le.curve_matches(record, config.curve_key(base.setting(pool), strategy), strategy, config) else None


def score(records: Sequence[dict]) -> float:
    """The rule's score: mean accuracy after the seed set, over the given curves."""
    return float(np.mean([np.mean(r["accuracy"][1:]) for r in records]))


def variant_records(out_dir: str, base: le.Config, v: Variant, seeds: Sequence[int]) -> Optional[List[dict]]:
    """All curves of `v` at `seeds` on both pools, or None while any is missing."""
    out = []
    for pool in POOLS:
        for seed in seeds:
            r = load(out_dir, base, pool, v.label, "cluster_margin", seed, v.cm(base.cm))
            if r is None:
                return None
            out.append(r)
    return out


def rank(out_dir: str, base: le.Config, variants: Sequence[Variant], seeds: Sequence[int]) -> Optional[List[dict]]:
    """`variants` best first by the rule (ties broken as RULE says), or None if incomplete."""
    scored = []
    for v in variants:
        records = variant_records(out_dir, base, v, seeds)
        if records is None:
            return None
        scored.append({"variant": v, "label": v.label, "score": score(records)})
    # Repeatedly take the best left; scores within TIE of it tie and the tie key decides.
    ordered, rest = [], list(scored)
    while rest:
        top = max(s["score"] for s in rest)
        tied = sorted((s for s in rest if s["score"] >= top - TIE), key=lambda s: s["variant"].tie_key())
        ordered.append(tied[0])
        rest.remove(tied[0])
    return ordered


def plan(out_dir: str, base: le.Config) -> Tuple[List[tuple], Dict[str, object]]:
    """The curves to run next (seed, pool, strategy, label, config) and the stages' state."""
    state: Dict[str, object] = {}
    todo = []
    for seed in STAGE1_SEEDS:
        for pool in POOLS:
            todo += [(seed, pool, s, s, base) for s in REFERENCES]
            todo += [(seed, pool, "cluster_margin", v.label, dataclasses.replace(base, cm=v.cm(base.cm))) for v in GRID]
    stage1 = rank(out_dir, base, GRID, STAGE1_SEEDS)
    state["stage1"] = stage1
    if stage1 is None:
        return todo, state
    top = [s["variant"] for s in stage1[:TOP]]
    for seed in MORE_SEEDS:
        for pool in POOLS:
            todo += [(seed, pool, "cluster_margin", v.label, dataclasses.replace(base, cm=v.cm(base.cm))) for v in top]
    all_seeds = STAGE1_SEEDS + MORE_SEEDS
    stage2 = rank(out_dir, base, top, all_seeds)
    state["stage2"] = stage2
    if stage2 is None:
        return todo, state
    lead = stage2[0]["variant"]
    recluster = dataclasses.replace(lead, recluster=True)
    for seed in all_seeds:
        for pool in POOLS:
            todo.append((seed, pool, "cluster_margin", recluster.label, dataclasses.replace(base, cm=recluster.cm(base.cm))))
    final = rank(out_dir, base, top + [recluster], all_seeds)
    state["final"] = final
    if final is not None:
        state["choice"] = final[0]
    return todo, state


def _public(ranking: Optional[List[dict]]) -> Optional[List[dict]]:
    if ranking is None:
        return None
    return [{"label": s["label"], "margin_pool_factor": s["variant"].factor, "target_mean_cluster_size": s["variant"].size,
             "recluster": s["variant"].recluster, "score": s["score"]} for s in ranking]


def report(out_dir: str, results_dir: str, base: le.Config, command: str) -> dict:
    """cm_settings_study.json (rule, every curve, rankings, choice) and one plot per pool."""
    _, state = plan(out_dir, base)
    curves = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if name.endswith(".json"):
            r = le._read_json(os.path.join(out_dir, name))
            cm = r["config"].get("cluster_margin")
            curves.append({
                "pool": r["setting"], "label": r["label"], "strategy": r["strategy"], "seed": r["seed"],
                "margin_pool_factor": cm["margin_pool_factor"] if cm else None,
                "target_mean_cluster_size": cm["target_cluster_size"] if cm else None,
                "recluster": cm["recluster"] if cm else None,
                "labels": r["labels"], "accuracy": r["accuracy"], "score": float(np.mean(r["accuracy"][1:])),
                "distinct_sources_per_batch": r["distinct_sources_per_batch"],
                "clusters": r["selector"].get("clusters"), "batch_diagnostics": r["selector"].get("batch_diagnostics"),
                "minutes": round(r["seconds"] / 60, 2), "command": r["command"], "completed_at": r["completed_at"],
            })
    choice = state.get("choice")
    result = {
        "command": command, "rule": RULE, "pools": list(POOLS),
        "pool_specs": {p: dataclasses.asdict(base.setting(p)) for p in POOLS},
        "grid": {"margin_pool_factor": list(FACTORS), "target_mean_cluster_size": list(SIZES)},
        "stage1_seed0": _public(state.get("stage1")), "stage2_three_seeds": _public(state.get("stage2")),
        "final": _public(state.get("final")),
        "choice": _public([choice])[0] if choice else None,
        "complete": choice is not None,
        "curves": curves,
    }
    le._write_json(os.path.join(results_dir, "cm_settings_study.json"), result)
    _plot(curves, results_dir)
    return result


def _plot(curves: List[dict], results_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for pool in POOLS:
        mine = [c for c in curves if c["pool"] == pool]
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=110)
        by_label: Dict[str, List[dict]] = {}
        for c in mine:
            by_label.setdefault(c["label"], []).append(c)
        for label, runs in sorted(by_label.items()):
            acc = np.mean([r["accuracy"] for r in runs], axis=0)
            style = dict(lw=2.2, color="black" if label == "margin" else "grey") if label in REFERENCES else dict(lw=1)
            ax.plot(runs[0]["labels"], acc, marker="o", ms=2.5, label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})",
                    **style)
        ax.set_xlabel("labels")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(f"Cluster-Margin settings study: {pool} (calibration pool)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir, f"cm_settings_study_{pool}.png"))
        plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report_only", action="store_true", help="Rewrite the JSON and plots from the recorded curves.")
    p.add_argument("--results_dir", default=os.path.join(le.ROOT, "benchmarks", "results"))
    p.add_argument("--work_dir", default="/tmp/cm-settings-study", help="Scratch: pools, models, stage outputs.")
    p.add_argument("--data_dir", default=le.al_data.FASHION_MNIST_DIR)
    p.add_argument("--lock", default=le.DEFAULT_LOCK, help="flock file held per curve ('' = none).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    base = le.FULL
    out_dir = os.path.join(args.results_dir, "cm_settings_study", "curves")
    command = " ".join(["python", "benchmarks/cm_settings_study.py"] + [shlex.quote(a) for a in
                                                                         (sys.argv[1:] if argv is None else argv)])
    data: Dict[str, le.Data] = {}

    def data_factory():
        if "d" not in data:
            data["d"] = le.Data(base, args.data_dir, args.work_dir)
        return data["d"]

    ran_total = []
    while not args.report_only:
        todo, _ = plan(out_dir, base)
        ran, failed = le.run_curves(todo, data_factory, out_dir, args.work_dir, command, args.lock, True,
                                    os.path.join(args.results_dir, "cm_settings_study", "failed.json"),
                                    after_each=lambda: report(out_dir, args.results_dir, base, command))
        ran_total += ran
        if not ran:  # nothing left that can run now (complete, capped, or only failures)
            break
    result = report(out_dir, args.results_dir, base, command)
    print(json.dumps({"ran": ran_total, "complete": result["complete"], "choice": result["choice"]}, indent=1))


if __name__ == "__main__":
    main()
