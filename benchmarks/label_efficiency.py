"""Label efficiency of Cluster-Margin against the paper's baselines, on Fashion-MNIST.

An active-learning simulation (Citovsky et al. 2021, section 5, at Fashion-MNIST
scale). Each curve = one (setting, strategy, seed):

1. a random seed set of `seed_size` pool examples is labeled;
2. a small CNN (benchmarks/al_model.py) is trained from scratch on all labels so far
   for a fixed number of epochs, and its accuracy on the 10K test images is recorded;
3. the strategy picks the next `batch_size` examples from the unlabeled pool, whose
   labels are then revealed; 2-3 repeat until `rounds` batches were added.

Strategies:
* `margin`, `cluster_margin`: the product's own pipelines. The trained model is saved
  as `.keras` (outputs `embedding`, `probs`); `cm-embed` scores the pool (written once
  as Parquet of example_id + PNG); `cm-cluster` clusters the *seed model's* embeddings
  once per curve (as in the paper); `cm-select` picks the batch with the labeled set
  as `--exclude` (margin: k_m = k_t; cluster_margin: k_m = 10 k_t).
* `random`, `coreset` (k-center greedy on embeddings), `badge` (k-means++ seeding on
  gradient embeddings): in-memory baselines in benchmarks/al_baselines.py.

eps rule (fixed before any result was seen, never tuned per run): the first time a
setting needs clusters, eps is searched (secant/bisection, `calibrate_eps`) on that
seed model's embeddings until cm-cluster's mean cluster size is within [8, 12.5]
(target 10, the paper's recipe); it is saved in calibration-*.json and reused by
every seed of the setting.

Settings: `plain` (the 60K training images) and `redundant` (12K training images, each
as 5 near-duplicates: shifts of up to 2 px and pixel noise; 60K rows). Both use the
same batch size and budget.

Resume: every finished curve is written to `<results>/label_efficiency/curves/` and
skipped by a rerun with the same configuration. Each curve runs holding
`/tmp/cm-bench.lock` (flock), one curve at a time, so other benchmarks interleave.
After each curve the report (JSON, plots) is rewritten from all completed curves;
`--report_only` rewrites it, and the README section, without running anything.

Usage:
    .venv/bin/python benchmarks/label_efficiency.py            # full run (hours)
    .venv/bin/python benchmarks/label_efficiency.py --report_only
    .venv/bin/python benchmarks/label_efficiency.py --quick --results_dir /tmp/q --work_dir /tmp/qw
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import al_baselines  # noqa: E402
import al_data  # noqa: E402
from al_model import CnnConfig  # noqa: E402

_LOG = logging.getLogger("label_efficiency")

STRATEGIES = ("random", "margin", "cluster_margin", "coreset", "badge")
PRODUCT_STRATEGIES = ("margin", "cluster_margin")
SETTINGS = ("plain", "redundant")
DEFAULT_LOCK = "/tmp/cm-bench.lock"
README_MARKER = "<!-- section:label-efficiency -->"
# Accuracies at which the README table reports the labels each strategy needed.
DEFAULT_TARGETS = (0.80, 0.82, 0.84, 0.85, 0.86)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines a curve; its hash names compatible curve files."""

    pool_size: int = 60000
    redundant_copies: int = 5
    max_shift: int = 2
    noise_std: float = 10.0
    test_size: int = 10000
    seed_size: int = 1000
    batch_size: int = 2000
    rounds: int = 4
    margin_pool_factor: float = 10.0  # k_m = 10 k_t
    target_cluster_size: float = 10.0
    cluster_size_tolerance: tuple = (8.0, 12.5)
    num_neighbors: int = 0  # 0: cm-cluster's default
    # Fixed eps (skips the calibration); None = calibrate once per setting (the rule above).
    distance_threshold: Optional[float] = None
    cnn: CnnConfig = CnnConfig()

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


FULL = Config()
# Quick: minutes, for the end-to-end test. eps fixed at what the calibration rule gave on
# this pool (mean cluster size 7-11 on both settings), so the test runs cm-cluster once.
QUICK = Config(pool_size=1000, test_size=1000, seed_size=200, batch_size=100, rounds=2, distance_threshold=0.03,
               cnn=CnnConfig(conv1=8, conv2=16, embedding_dim=32, epochs=4, batch_size=32))


# ----------------------------------------------------------------------------- paths
def curves_dir(results_dir: str) -> str:
    return os.path.join(results_dir, "label_efficiency", "curves")


def curve_path(results_dir: str, setting: str, strategy: str, seed: int) -> str:
    return os.path.join(curves_dir(results_dir), f"{setting}__{strategy}__seed{seed}.json")


def _write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def bench_lock(path: Optional[str]):
    """flock(2) on `path`, the same lock `flock /tmp/cm-bench.lock <cmd>` takes."""
    if not path:
        yield 0.0
        return
    start = time.time()
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.time() - start
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- data
class Data:
    """The test set and the pools, built once per process; pool Parquet written once."""

    def __init__(self, config: Config, data_dir: str, work_dir: str):
        self.config = config
        self.work_dir = work_dir
        train_x, train_y, test_x, test_y = al_data.load_fashion_mnist(data_dir)
        self.train_x, self.train_y = train_x, train_y
        if config.test_size < test_x.shape[0]:
            idx = np.sort(np.random.default_rng(7).choice(test_x.shape[0], config.test_size, replace=False))
            test_x, test_y = test_x[idx], test_y[idx]
        self.test_x, self.test_y = test_x, test_y
        self._pools: Dict[str, al_data.Pool] = {}

    def pool(self, setting: str) -> al_data.Pool:
        if setting not in self._pools:
            c = self.config
            self._pools[setting] = al_data.make_pool(
                setting, self.train_x, self.train_y, size=c.pool_size, copies=c.redundant_copies,
                max_shift=c.max_shift, noise_std=c.noise_std)
        return self._pools[setting]

    def pool_parquet(self, setting: str) -> str:
        path = os.path.join(self.work_dir, f"pool-{setting}-{self.config.key()}", "pool.parquet")
        if not os.path.exists(path):
            al_data.write_png_parquet(self.pool(setting), path)
        return path


# ----------------------------------------------------------------------------- strategies
class Selector:
    """Chooses `k` unlabeled pool indices given the model trained on the labels so far."""

    def __init__(self, strategy: str, setting: str, seed: int, data: Data, config: Config, work: str, calibration_path: str):
        self.strategy, self.setting, self.seed = strategy, setting, seed
        self.data, self.config, self.work = data, config, work
        self.calibration_path = calibration_path
        self.rng = np.random.default_rng([seed, 1 + STRATEGIES.index(strategy)])
        self.info: Dict[str, object] = {}
        self._clusters_dir: Optional[str] = None

    def select(self, model, labeled: np.ndarray, round_index: int, k: int) -> np.ndarray:
        pool = self.data.pool(self.setting)
        if self.strategy == "random":
            return al_baselines.select_random(labeled, k, self.rng)
        if self.strategy in ("coreset", "badge"):
            import al_model

            emb, probs = al_model.predict(model, pool.images)
            if self.strategy == "coreset":
                return al_baselines.select_coreset(emb, labeled, k)
            return al_baselines.select_badge(emb, probs, labeled, k, self.rng)
        return self._select_with_product(model, labeled, round_index, k)

    # The product path: cm-embed -> (cm-cluster once) -> cm-select.
    def _select_with_product(self, model, labeled, round_index, k) -> np.ndarray:
        import al_model
        import al_product

        pool = self.data.pool(self.setting)
        round_dir = os.path.join(self.work, f"round{round_index}")
        os.makedirs(round_dir, exist_ok=True)
        model_path = al_model.save_for_embedding(model, os.path.join(round_dir, "model.keras"))
        t0 = time.time()
        embed_dir = os.path.join(round_dir, "embed")
        embed_summary = al_product.embed_pool(self.data.pool_parquet(self.setting), model_path, embed_dir)
        timings = {"embed_s": time.time() - t0}
        self._check_scores(model, embed_dir, pool)
        if self.strategy == "cluster_margin" and self._clusters_dir is None:
            t1 = time.time()
            eps, built = self._eps(embed_dir)
            self._clusters_dir = os.path.join(self.work, "clusters")
            if built is None:
                al_product.build_clusters(embed_dir, self._clusters_dir, eps, self.config.num_neighbors or None)
            stats = al_product.cluster_stats(self._clusters_dir)
            self.info["clusters"] = {"distance_threshold": eps, "built_on_round": round_index,
                                     **stats}
            timings["cluster_s"] = time.time() - t1
        exclude = al_product.write_exclude(pool.example_ids[labeled], os.path.join(round_dir, "labeled.parquet"))
        t2 = time.time()
        cm = self.strategy == "cluster_margin"
        result = al_product.select_batch(
            embed_dir, self._clusters_dir if cm else None, exclude, os.path.join(round_dir, "selection"), k,
            self.strategy, seed=self.seed * 1000 + round_index,
            margin_pool_factor=self.config.margin_pool_factor if cm else None)
        timings["select_s"] = time.time() - t2
        self.info.setdefault("product_timings", []).append(timings)
        ids = result["example_id"]
        return np.array([int(i) for i in ids], dtype=np.int64)

    def _check_scores(self, model, embed_dir: str, pool) -> None:
        """cm-embed's margins against the same model's own predict: they must agree."""
        import al_model
        import al_product

        scores = al_product.read_scores(embed_dir)
        idx = np.array([int(i) for i in scores["example_id"]])
        if idx.size != pool.size or np.unique(idx).size != pool.size:
            raise RuntimeError(f"cm-embed scored {np.unique(idx).size} distinct of {pool.size} pool examples")
        probe = np.random.default_rng(0).choice(pool.size, min(512, pool.size), replace=False)
        _, probs = al_model.predict(model, pool.images[idx[probe]])
        top2 = np.sort(probs, axis=1)[:, -2:]
        err = float(np.max(np.abs((top2[:, 1] - top2[:, 0]) - scores["margin"][probe])))
        self.info["max_margin_error_vs_predict"] = max(err, float(self.info.get("max_margin_error_vs_predict", 0.0)))
        if err > 1e-3:
            raise RuntimeError(f"cm-embed margins differ from model.predict by up to {err}")

    def _eps(self, embed_dir: str):
        """(eps, clusters dir already built at eps or None): fixed by the config, read from
        calibration.json, or calibrated once on this seed model (module docstring)."""
        import al_product

        if self.config.distance_threshold is not None:
            return float(self.config.distance_threshold), None
        calibration = _read_json(self.calibration_path) if os.path.exists(self.calibration_path) else {}
        entry = calibration.get(self.setting)
        if entry:
            return float(entry["distance_threshold"]), None
        out_dir = os.path.join(self.work, "clusters")

        def mean_size(eps: float) -> dict:
            return al_product.build_clusters(embed_dir, out_dir, eps, self.config.num_neighbors or None)

        eps, trials = calibrate_eps(mean_size, *self.config.cluster_size_tolerance)
        lo_size, hi_size = self.config.cluster_size_tolerance
        calibration[self.setting] = {"distance_threshold": eps, "mean_cluster_size": trials[-1]["mean_cluster_size"],
                                     "calibrated_on_seed": self.seed, "trials": trials,
                                     "rule": f"mean cluster size in [{lo_size:g}, {hi_size:g}] on the seed model's pool embeddings"}
        _write_json(self.calibration_path, calibration)
        return eps, out_dir  # the last trial's clusters are the ones at eps


def calibrate_eps(cluster_stats, lo_size: float, hi_size: float, start: float = 0.006, max_trials: int = 12):
    """eps whose mean cluster size is in [lo_size, hi_size], and the trials that found it.

    `cluster_stats(eps)` runs the clustering and returns a dict with `mean_cluster_size`
    and `num_clusters`. Mean cluster size grows monotonically (and steeply, roughly as
    a power of eps) with eps, so each next eps is the log-log secant towards the
    band's geometric centre through the last two trials, kept strictly inside the
    bracket found so far (geometric bisection when the secant would leave it); before
    a second trial exists, eps doubles or halves. The last trial is at the returned eps.
    """
    target = float(np.sqrt(lo_size * hi_size))
    lo = hi = None  # largest eps below the band, smallest above it
    eps = start
    trials = []
    for _ in range(max_trials):
        stats = cluster_stats(eps)
        size = float(stats["mean_cluster_size"])
        trials.append({"distance_threshold": eps, "mean_cluster_size": size, "num_clusters": int(stats["num_clusters"])})
        _LOG.info("eps calibration: eps=%.6f mean cluster size %.2f", eps, size)
        if lo_size <= size <= hi_size:
            return eps, trials
        if size < lo_size:
            lo = eps if lo is None else max(lo, eps)
        else:
            hi = eps if hi is None else min(hi, eps)
        nxt = None
        if len(trials) >= 2:
            (e0, s0), (e1, s1) = [(t["distance_threshold"], t["mean_cluster_size"]) for t in trials[-2:]]
            if s0 > 0 and s1 > 0 and s0 != s1 and e0 != e1:
                slope = (np.log(s1) - np.log(s0)) / (np.log(e1) - np.log(e0))
                if slope > 0:
                    nxt = float(np.exp(np.log(e1) + (np.log(target) - np.log(s1)) / slope))
        if nxt is None:
            nxt = eps * 2 if hi is None else (eps / 2 if lo is None else float(np.sqrt(lo * hi)))
        if (lo is not None and nxt <= lo) or (hi is not None and nxt >= hi):
            nxt = float(np.sqrt(lo * hi)) if lo is not None and hi is not None else (eps * 2 if hi is None else eps / 2)
        eps = nxt
    raise RuntimeError(f"eps calibration did not reach a mean cluster size in [{lo_size}, {hi_size}]: {trials}")


# ----------------------------------------------------------------------------- one curve
def run_curve(setting: str, strategy: str, seed: int, data: Data, config: Config, results_dir: str, work_dir: str,
              command: str, keep_batches: bool = True) -> dict:
    """Runs one AL curve to the budget and writes its JSON; returns the record."""
    import al_model

    pool = data.pool(setting)
    work = os.path.join(work_dir, f"{setting}__{strategy}__seed{seed}-{config.key()}")
    os.makedirs(work, exist_ok=True)
    calibration_path = os.path.join(results_dir, "label_efficiency", f"calibration-{config.key()}.json")
    selector = Selector(strategy, setting, seed, data, config, work, calibration_path)
    labeled = np.zeros(pool.size, dtype=bool)
    seed_set = np.sort(np.random.default_rng([seed, 0]).choice(pool.size, config.seed_size, replace=False))
    labeled[seed_set] = True
    labels, accuracies, batches, round_seconds = [], [], [], []
    start = time.time()
    for r in range(config.rounds + 1):
        t0 = time.time()
        idx = np.flatnonzero(labeled)
        # Same training seed for every strategy at a (seed, round): differences come from the labels only.
        model = al_model.train_cnn(pool.images[idx], pool.labels[idx], config.cnn, seed=seed * 1000 + r)
        acc = al_model.accuracy(model, data.test_x, data.test_y)
        labels.append(int(idx.size))
        accuracies.append(acc)
        _LOG.info("%s/%s/seed%d round %d: %d labels, test accuracy %.4f", setting, strategy, seed, r, idx.size, acc)
        if r < config.rounds:
            batch = selector.select(model, labeled, r, config.batch_size)
            _verify_batch(batch, labeled, config.batch_size, f"{setting}/{strategy}/seed{seed} round {r}")
            batches.append(batch.tolist())
            labeled[batch] = True
        round_seconds.append(time.time() - t0)
    batch_base = [[int(pool.base_index[i]) for i in b] for b in batches]
    record = {
        "setting": setting, "strategy": strategy, "seed": seed, "config_key": config.key(),
        "config": dataclasses.asdict(config), "command": command,
        "labels": labels, "accuracy": accuracies,
        "seed_set": seed_set.tolist(),
        "batches": batches if keep_batches else None,
        # For the redundant pool: how many distinct source images each batch holds.
        "distinct_sources_per_batch": [len(set(b)) for b in batch_base],
        "round_seconds": round_seconds, "seconds": time.time() - start,
        "selector": selector.info,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(curve_path(results_dir, setting, strategy, seed), record)
    return record


def _verify_batch(batch: np.ndarray, labeled: np.ndarray, k: int, what: str) -> None:
    if batch.size != k or np.unique(batch).size != k:
        raise RuntimeError(f"{what}: batch has {np.unique(batch).size} distinct of {batch.size} ids, expected {k}")
    if batch.min() < 0 or batch.max() >= labeled.size:
        raise RuntimeError(f"{what}: batch has ids outside the pool")
    if labeled[batch].any():
        raise RuntimeError(f"{what}: {int(labeled[batch].sum())} selected examples were already labeled")


# ----------------------------------------------------------------------------- report
def load_curves(results_dir: str, config: Config) -> List[dict]:
    out = []
    directory = curves_dir(results_dir)
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            record = _read_json(os.path.join(directory, name))
            if record.get("config_key") == config.key():
                out.append(record)
    return out


def labels_to_reach(labels: Sequence[float], acc: Sequence[float], target: float) -> Optional[float]:
    """Labels at which the (mean) curve first reaches `target`, linear between points; None if never."""
    for i, a in enumerate(acc):
        if a >= target:
            if i == 0:
                return float(labels[0])
            a0, a1, l0, l1 = acc[i - 1], a, labels[i - 1], labels[i]
            return float(l0 + (target - a0) / (a1 - a0) * (l1 - l0))
    return None


def aggregate(curves: List[dict], settings: Sequence[str], strategies: Sequence[str], config: Config, command: str):
    """The issue's JSON: per setting, per strategy mean and standard error over completed seeds."""
    out = {"command": command, "settings": []}
    details = {"config_key": config.key(), "config": dataclasses.asdict(config), "settings": []}
    for setting in settings:
        mine = [c for c in curves if c["setting"] == setting]
        entry = {"name": setting, "batch_size": config.batch_size, "seed_size": config.seed_size,
                 "seeds": sorted({c["seed"] for c in mine}), "curves": {}}
        detail = {"name": setting, "curves": {}}
        for strategy in strategies:
            runs = sorted((c for c in mine if c["strategy"] == strategy), key=lambda c: c["seed"])
            if not runs:
                continue
            acc = np.array([r["accuracy"] for r in runs])
            n = acc.shape[0]
            sem = (acc.std(axis=0, ddof=1) / np.sqrt(n)).tolist() if n > 1 else [None] * acc.shape[1]
            entry["curves"][strategy] = {"labels": runs[0]["labels"], "accuracy_mean": acc.mean(axis=0).tolist(),
                                         "accuracy_sem": sem}
            detail["curves"][strategy] = {
                "seeds": [r["seed"] for r in runs], "accuracy_per_seed": acc.tolist(),
                "distinct_sources_per_batch": [r["distinct_sources_per_batch"] for r in runs],
                "minutes_per_curve": [round(r["seconds"] / 60, 2) for r in runs],
                "selector": [r["selector"] for r in runs],
            }
        out["settings"].append(entry)
        details["settings"].append(detail)
    return out, details


def savings_at_margin_final(curves: Dict[str, dict]) -> Optional[dict]:
    """Labels Cluster-Margin saves (>0) or loses (<0) vs Margin and Random at Margin's final accuracy."""
    if "margin" not in curves or "cluster_margin" not in curves:
        return None
    target = curves["margin"]["accuracy_mean"][-1]
    need = {s: labels_to_reach(c["labels"], c["accuracy_mean"], target) for s, c in curves.items()}
    budget = curves["margin"]["labels"][-1]
    result = {"target_accuracy": target, "labels_needed": need, "budget": budget}
    for other in ("margin", "random"):
        if other not in need:
            continue
        a, b = need["cluster_margin"], need[other]
        if a is not None and b is not None:
            result[f"saved_vs_{other}"] = b - a
        elif a is not None:  # the other never reached it: Cluster-Margin saves at least budget - a
            result[f"saved_vs_{other}_at_least"] = budget - a
        elif b is not None:
            result[f"lost_vs_{other}_at_least"] = budget - b
    return result


def plot(setting_entry: dict, path: str, complete_note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for strategy, curve in setting_entry["curves"].items():
        x = np.array(curve["labels"])
        y = np.array(curve["accuracy_mean"])
        line, = ax.plot(x, y, marker="o", ms=3, label=strategy)
        if all(s is not None for s in curve["accuracy_sem"]):
            s = np.array(curve["accuracy_sem"])
            ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy (mean ± s.e.)")
    ax.set_title(f"Fashion-MNIST, {setting_entry['name']} pool, batch {setting_entry['batch_size']}\n{complete_note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt_labels(value: Optional[float], budget: int) -> str:
    return f"> {budget:,}" if value is None else f"{int(round(value)):,}"


def readme_section(result: dict, details: dict, config: Config, targets: Sequence[float], expected_seeds: Sequence[int],
                   strategies: Sequence[str], plot_paths: Dict[str, str]) -> str:
    c = config
    lines = [
        "## Label efficiency on Fashion-MNIST",
        "",
        "An active-learning simulation (`benchmarks/label_efficiency.py`): a random seed set of "
        f"{c.seed_size:,} labels, then {c.rounds} batches of {c.batch_size:,}; after each, a small CNN "
        f"(2 conv + {c.cnn.embedding_dim}-d dense) is trained from scratch for {c.cnn.epochs} epochs on all labels so "
        f"far and scored on {c.test_size:,} Fashion-MNIST test images. `margin` and `cluster_margin` select through the product's own "
        "`cm-embed` (every round), `cm-cluster` (once per run, on the seed model's embeddings) and `cm-select` "
        f"(the labeled set as `--exclude`; Cluster-Margin with k_m = {c.margin_pool_factor:g} k_t and eps set once "
        f"per setting so that the mean cluster size is in [{c.cluster_size_tolerance[0]:g}, {c.cluster_size_tolerance[1]:g}]). "
        "`random`, `coreset` (k-center greedy on the embeddings) and `badge` (k-means++ seeding on last-layer "
        f"gradient embeddings) are in-memory baselines in `benchmarks/al_baselines.py`. Settings: `plain` = {c.pool_size:,} "
        f"Fashion-MNIST training images; `redundant` = {c.pool_size // c.redundant_copies:,} training images, each as "
        f"{c.redundant_copies} near-duplicates (shift up to {c.max_shift} px, pixel noise sd {c.noise_std:g}).",
        "",
        f"Command: `{result['command']}` (2 shared CPU cores; each curve under `flock /tmp/cm-bench.lock`). "
        "Data: `benchmarks/results/label_efficiency.json`; per-seed curves, cluster statistics and timings: "
        "`benchmarks/results/label_efficiency_details.json`. A rerun of the command resumes: finished curves "
        "(`benchmarks/results/label_efficiency/curves/`) are skipped; `--report_only` rewrites the JSON, the plots "
        "and this section from them. `--quick` runs the whole loop on a tiny budget in about a minute "
        "(`tests/test_label_efficiency_quick.py`).",
        "",
    ]
    for entry, detail in zip(result["settings"], details["settings"]):
        name = entry["name"]
        budget = c.seed_size + c.rounds * c.batch_size
        done = {s: detail["curves"].get(s, {}).get("seeds", []) for s in strategies}
        lines.append(f"### `{name}` pool")
        lines.append("")
        lines.append("Completed curves (seeds): " + ", ".join(
            f"{s} {len(done[s])}/{len(expected_seeds)}" for s in strategies) + ".")
        lines.append("")
        if not entry["curves"]:
            lines += ["No curve of this setting completed yet.", ""]
            continue
        header = "| strategy | seeds | " + " | ".join(f"labels to {t:.0%}" for t in targets) + f" | accuracy at {budget:,} |"
        lines += [header, "|" + "---|" * (len(targets) + 3)]
        for s, curve in entry["curves"].items():
            cells = [_fmt_labels(labels_to_reach(curve["labels"], curve["accuracy_mean"], t), budget) for t in targets]
            sem = curve["accuracy_sem"][-1]
            final = f"{curve['accuracy_mean'][-1]:.4f}" + (f" ± {sem:.4f}" if sem is not None else "")
            lines.append(f"| {s} | {len(done[s])} | " + " | ".join(cells) + f" | {final} |")
        lines.append("")
        cm_info = [sel.get("clusters") for sel in detail["curves"].get("cluster_margin", {}).get("selector", [])]
        cm_info = [x for x in cm_info if x]
        if cm_info:
            lines.append("Clusters (cm-cluster on each seed model's pool embeddings): " + "; ".join(
                f"eps {x['distance_threshold']:.4f}, {x['num_clusters']:,} clusters, mean size {x['mean_cluster_size']:.2f}, "
                f"largest {x['max_cluster_size']:,}, {x['singletons']:,} singletons" for x in cm_info) + ".")
            lines.append("")
        drops = [(max(0.0, max(a - b for a, b in zip(acc[:-1], acc[1:]))), s)
                 for s, d in detail["curves"].items() for acc in d["accuracy_per_seed"]]
        if drops and min(len(d["seeds"]) for d in detail["curves"].values()) < 2:
            worst = max(drops)
            lines.append(f"Noise: a curve with one seed has no error band; the largest accuracy drop between two consecutive "
                         f"rounds of a single curve here is {worst[0]:.4f} ({worst[1]}), a measure of how noisy one training run is.")
            lines.append("")
        if name == "redundant" and detail["curves"]:
            distinct = {s: float(np.mean(d["distinct_sources_per_batch"])) for s, d in detail["curves"].items()
                        if d.get("distinct_sources_per_batch")}
            lines.append(f"Distinct source images per batch of {c.batch_size:,} (mean over rounds and seeds; "
                         f"each source has {c.redundant_copies} near-copies in the pool): "
                         + ", ".join(f"{s} {v:,.0f}" for s, v in distinct.items()) + ".")
            lines.append("")
        diag = details.get("cluster_diagnostics") or {}
        cm, m = diag.get(f"{name}/cluster_margin"), diag.get(f"{name}/margin")
        if cm and m:
            text = (f"What Cluster-Margin picked (`benchmarks/cluster_margin_diagnostics.py`, "
                    f"`label_efficiency/cluster_diagnostics.json`, {cm['curves']} curve(s)): with k_m = "
                    f"{c.margin_pool_factor:g} k_t = {c.margin_pool_factor * c.batch_size:,.0f} the margin pool is "
                    f"{c.margin_pool_factor * c.batch_size / c.pool_size:.0%} of the pool, and the round robin spreads the "
                    f"batch over all of it: the median uncertainty rank of its picks among the unlabeled pool is "
                    f"{cm['median_uncertainty_rank']:,.0f} (Margin's {m['median_uncertainty_rank']:,.0f}), only "
                    f"{cm['share_in_top_k_t']:.0%} of them are among the {c.batch_size:,} most uncertain, and "
                    f"{cm['share_from_singleton_clusters']:.0%} come from singleton clusters. The clusters at the "
                    f"calibrated eps are lopsided: {cm['share_in_size_over_100']:.0%} of the pool sits in clusters of "
                    f"more than 100 points")
            if "mean_clusters_per_source" in cm:
                text += (f"; the {c.redundant_copies} near-copies of a source image are spread over "
                         f"{cm['mean_clusters_per_source']:.1f} clusters on average and all share one cluster for only "
                         f"{cm['share_sources_in_one_cluster']:.1%} of the sources, so one pick per cluster does not "
                         "keep copies out of a batch")
            lines.append(text + ".")
            lines.append("")
        saving = savings_at_margin_final(entry["curves"])
        if saving:
            lines.append(_saving_sentence(saving, budget, entry["curves"]))
            lines.append("")
        if name in plot_paths:
            lines.append(f"![{name}]({plot_paths[name]})")
            lines.append("")
    lines.append("Labels to reach an accuracy: where the mean curve first reaches it, interpolated linearly between the "
                 f"measured points (every {c.batch_size:,} labels, so a rough reading); "
                 f"`> {c.seed_size + c.rounds * c.batch_size:,}` = not reached within the budget. "
                 "± is the standard error over seeds.")
    return "\n".join(lines) + "\n"


def _saving_sentence(saving: dict, budget: int, curves: Dict[str, dict]) -> str:
    need = saving["labels_needed"]
    final = {k: c["accuracy_mean"][-1] for k, c in curves.items()}
    text = (f"At Margin's final accuracy ({saving['target_accuracy']:.4f}): Margin needs "
            f"{_fmt_labels(need.get('margin'), budget)} labels, Cluster-Margin {_fmt_labels(need.get('cluster_margin'), budget)}")
    if "random" in need:
        text += f", Random {_fmt_labels(need.get('random'), budget)}"
    text += "."
    cm = need.get("cluster_margin")
    for other in ("margin", "random"):
        if other not in need:
            continue
        name = other.capitalize()
        if f"saved_vs_{other}" in saving:
            v = saving[f"saved_vs_{other}"]
            text += f" Against {name}, Cluster-Margin {'saves' if v >= 0 else 'loses'} {abs(v):,.0f} labels."
        elif f"saved_vs_{other}_at_least" in saving:
            text += (f" Against {name} (which does not reach it within {budget:,}), Cluster-Margin saves at least "
                     f"{saving[f'saved_vs_{other}_at_least']:,.0f} labels.")
        elif cm is None and need.get(other) is not None:
            text += (f" Against {name}, Cluster-Margin loses: it does not reach that accuracy within the {budget:,}-label "
                     f"budget (it ends at {final['cluster_margin']:.4f}), so how many labels it would need is not measured.")
        elif cm is None:
            text += (f" Neither Cluster-Margin ({final['cluster_margin']:.4f} at {budget:,}) nor {name} "
                     f"({final[other]:.4f}) reaches it within the budget, so no label count can be compared with {name} there.")
    return text


def update_readme(readme_path: str, section: str) -> None:
    with open(readme_path) as f:
        text = f.read()
    start = text.index(README_MARKER) + len(README_MARKER)
    nxt = text.find("<!-- section:", start)
    end = len(text) if nxt < 0 else nxt
    new = text[:start] + "\n\n" + section + ("\n" if nxt >= 0 else "") + text[end:]
    with open(readme_path, "w") as f:
        f.write(new)


def write_report(results_dir: str, config: Config, settings, strategies, seeds, targets, command: str,
                 readme_path: Optional[str]) -> dict:
    curves = load_curves(results_dir, config)
    commands = sorted({c["command"] for c in curves})
    result, details = aggregate(curves, settings, strategies, config, commands[0] if len(commands) == 1 else (commands or [command])[0])
    details["commands"] = commands
    details["report_command"] = command
    details["expected"] = {"settings": list(settings), "strategies": list(strategies), "seeds": list(seeds)}
    details["complete"] = sorted(f"{c['setting']}/{c['strategy']}/seed{c['seed']}" for c in curves)
    details["savings_at_margin_final_accuracy"] = {e["name"]: savings_at_margin_final(e["curves"]) for e in result["settings"]}
    calibration = os.path.join(results_dir, "label_efficiency", f"calibration-{config.key()}.json")
    details["eps_calibration"] = _read_json(calibration) if os.path.exists(calibration) else None
    diagnostics = os.path.join(results_dir, "label_efficiency", "cluster_diagnostics.json")
    details["cluster_diagnostics"] = _read_json(diagnostics)["summary"] if os.path.exists(diagnostics) else None
    os.makedirs(results_dir, exist_ok=True)
    _write_json(os.path.join(results_dir, "label_efficiency.json"), result)
    _write_json(os.path.join(results_dir, "label_efficiency_details.json"), details)
    plot_paths = {}
    for entry, detail in zip(result["settings"], details["settings"]):
        if not entry["curves"]:
            continue
        done = sum(len(d.get("seeds", [])) for d in detail["curves"].values())
        note = f"{done}/{len(strategies) * len(seeds)} curves complete"
        path = os.path.join(results_dir, f"label_efficiency_{entry['name']}.png")
        plot(entry, path, note)
        plot_paths[entry["name"]] = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path
    if readme_path:
        update_readme(readme_path, readme_section(result, details, config, targets, seeds, strategies, plot_paths))
    return {"result": result, "details": details}


# ----------------------------------------------------------------------------- main
def schedule(settings: Sequence[str], strategies: Sequence[str], seeds: Sequence[int]):
    """(seed, setting, strategy) in the order that makes a cut-short run most useful.

    The headline comparison (cluster_margin vs margin vs random) comes first, seed by
    seed; the in-memory baselines of a seed follow the headline curves of the next
    seed: core(s0), core(s1), baselines(s0), core(s2), baselines(s1), ...
    """
    core = [s for s in strategies if s in ("random", "margin", "cluster_margin")]
    rest = [s for s in strategies if s not in core]
    order = []
    for i, seed in enumerate(list(seeds) + [None]):
        if seed is not None:
            order += [(seed, setting, s) for setting in settings for s in core]
        if i >= 1 and rest:
            order += [(seeds[i - 1], setting, s) for setting in settings for s in rest]
    return order


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny budget (minutes): for the end-to-end test.")
    p.add_argument("--report_only", "--report-only", action="store_true", help="Rewrite JSON/plots/README from completed curves.")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default=None, help="Comma-separated AL seeds (default 0,1,2; quick: 0).")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--work_dir", default="/tmp/cm-label-efficiency", help="Scratch: pool Parquet, models, stage outputs.")
    p.add_argument("--data_dir", default=al_data.FASHION_MNIST_DIR)
    p.add_argument("--lock", default=None, help=f"flock file held per curve (default {DEFAULT_LOCK}; quick: none; '' = none).")
    p.add_argument("--readme", default=None, help="README to update (default: the repo's with --report_only, else none; '' = none).")
    p.add_argument("--keep_going", type=lambda t: t.lower() in ("1", "true", "yes"), default=None,
                   help="Continue with the next curve when one fails (default: true, false in --quick).")
    p.add_argument("--targets", default=",".join(str(t) for t in DEFAULT_TARGETS))
    args = p.parse_args(argv)
    for name, allowed in (("settings", SETTINGS), ("strategies", STRATEGIES)):
        values = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: unknown {bad}; choose from {','.join(allowed)}")
        setattr(args, name, values)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s != ""]
    args.targets = [float(t) for t in args.targets.split(",") if t]
    if args.lock is None:
        args.lock = "" if args.quick else DEFAULT_LOCK
    if args.keep_going is None:
        args.keep_going = not args.quick
    if args.readme is None:
        # Only an explicit report rewrites README.md: a background run must not race
        # with the other engineers' edits of the file.
        args.readme = os.path.join(ROOT, "benchmarks", "README.md") if args.report_only and not args.quick else ""
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    command = " ".join(["python", "benchmarks/label_efficiency.py"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    report_kwargs = dict(results_dir=args.results_dir, config=config, settings=args.settings, strategies=args.strategies,
                         seeds=args.seeds, targets=args.targets, readme_path=args.readme or None)
    if args.report_only:
        return write_report(command=command, **report_kwargs)
    data = None
    ran, failed = [], []
    for seed, setting, strategy in schedule(args.settings, args.strategies, args.seeds):
        if os.path.exists(curve_path(args.results_dir, setting, strategy, seed)):
            done = _read_json(curve_path(args.results_dir, setting, strategy, seed))
            if done.get("config_key") == config.key():
                continue
        name = f"{setting}/{strategy}/seed{seed}"
        with bench_lock(args.lock) as waited:
            if data is None:
                data = Data(config, args.data_dir, args.work_dir)
            _LOG.info("curve %s (waited %.0fs for the lock)", name, waited)
            try:
                record = run_curve(setting, strategy, seed, data, config, args.results_dir, args.work_dir, command)
            except Exception as e:  # noqa: BLE001 - one broken curve must not stop the others
                if not args.keep_going:
                    raise
                _LOG.exception("curve %s failed; continuing with the next", name)
                failed.append({"curve": name, "error": f"{type(e).__name__}: {e}"})
                _write_json(os.path.join(args.results_dir, "label_efficiency", "failed.json"), failed)
                continue
        ran.append(name)
        _LOG.info("curve %s done in %.1f min: %s", ran[-1], record["seconds"] / 60, record["accuracy"])
        write_report(command=command, **report_kwargs)
    report = write_report(command=command, **report_kwargs)
    report["ran"] = ran
    report["failed"] = failed
    return report


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run(argv)
    print(json.dumps({"ran": report.get("ran", []), "failed": report.get("failed", []),
                      "complete": report["details"]["complete"]}, indent=1))


if __name__ == "__main__":
    main()
