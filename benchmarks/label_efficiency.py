"""Label efficiency of Cluster-Margin against the paper's baselines, on Fashion-MNIST.

An active-learning simulation (Citovsky et al. 2021, section 5, at Fashion-MNIST
scale). Each curve = one (setting, strategy, seed):

1. a random seed set of `seed_size` pool examples is labeled;
2. a small CNN (benchmarks/al_model.py) is trained from scratch on all labels so far
   for a fixed number of epochs, and its accuracy on the test images is recorded;
3. the strategy picks the next `batch_size` examples from the unlabeled pool, whose
   labels are then revealed; 2-3 repeat until `rounds` batches were added.

Strategies:
* `margin`, `cluster_margin`: the product's own pipelines. The trained model is saved
  as `.keras` (outputs `embedding`, `probs`); `cm-embed` scores the pool (written once
  as Parquet of example_id + PNG); `cm-cluster` builds the average-linkage hierarchy of
  the *seed model's* embeddings once per curve (as in the paper; `recluster` builds it
  again on every round's model) and `cm-cluster --recut_from` cuts it at the mean
  cluster size `target_cluster_size`; `cm-select` picks the batch with the labeled set
  as `--exclude` (margin: k_m = k_t; cluster_margin: k_m = margin_pool_factor k_t).
* `random`, `coreset` (k-center greedy on embeddings), `badge` (k-means++ seeding on
  gradient embeddings): in-memory baselines in benchmarks/al_baselines.py.

The hierarchy is built up to `max_distance` (doubled until the target size is
reachable); every cut of it equals a direct clustering at the cut's eps.

Settings (`SETTINGS`): every pool is drawn from the Fashion-MNIST training split and
tested on its 10K test images.
* evaluation: `plain` (the 60K training images), `redundant` (12K training images x 5
  near-duplicates), `redundant_heldout` and `zipf_heldout` (sources from training
  images 30,000-59,999 only), `large_batch` (plain pool, batches of 6,000: a tenth of
  the pool per round, the regime of the paper's 1M-of-9M batches);
* calibration (benchmarks/cm_settings_study.py chooses Cluster-Margin's settings on
  these, never on an evaluation pool): `redundant_cal` and `zipf_cal`, sources from
  training images 0-29,999 only;
* `npz`: a user's own pool (`--pool_npz PATH`, see al_data.load_npz_pool).

Resume: every finished curve is written to `<results>/label_efficiency/curves/` and
skipped by a rerun whose curve key (the setting, the CNN, the test set and, for
cluster_margin, its settings) is the same. Each curve runs holding
`/tmp/cm-bench.lock` (flock), one curve at a time, so other benchmarks interleave.
After each curve the report (JSON, plots) is rewritten from all completed curves;
`--report_only` rewrites it, and the benchmarks README section, without running anything.

Usage:
    .venv/bin/python benchmarks/label_efficiency.py            # full run (hours)
    .venv/bin/python benchmarks/label_efficiency.py --report_only
    .venv/bin/python benchmarks/label_efficiency.py --pool_npz my_pool.npz --results_dir /tmp/r
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
from al_data import PoolSpec  # noqa: E402
from al_model import CnnConfig  # noqa: E402

_LOG = logging.getLogger("label_efficiency")

STRATEGIES = ("random", "margin", "cluster_margin", "coreset", "badge")
PRODUCT_STRATEGIES = ("margin", "cluster_margin")
DEFAULT_LOCK = "/tmp/cm-bench.lock"
README_MARKER = "<!-- section:label-efficiency -->"
# Accuracies at which the README table reports the labels each strategy needed.
DEFAULT_TARGETS = (0.80, 0.82, 0.84, 0.85, 0.86)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A pool and its budget: seed set, batch size, rounds."""

    name: str
    pool: PoolSpec
    batch_size: int = 2000
    seed_size: int = 1000
    rounds: int = 4
    role: str = "evaluation"  # or "calibration": only those may choose a setting

    @property
    def budget(self) -> int:
        return self.seed_size + self.rounds * self.batch_size


SETTINGS: Dict[str, Setting] = {s.name: s for s in (
    Setting("plain", PoolSpec("plain")),
    Setting("redundant", PoolSpec("redundant", num_sources=12000)),
    Setting("redundant_heldout", PoolSpec("redundant", (30000, 60000), 12000, data_seed=30001)),
    Setting("zipf_heldout", PoolSpec("zipf", (30000, 60000), 6000, data_seed=30002)),
    Setting("large_batch", PoolSpec("plain"), batch_size=6000),
    Setting("redundant_cal", PoolSpec("redundant", (0, 30000), 12000, data_seed=10001), role="calibration"),
    Setting("zipf_cal", PoolSpec("zipf", (0, 30000), 6000, data_seed=10002), role="calibration"),
)}
EVALUATION_SETTINGS = tuple(n for n, s in SETTINGS.items() if s.role == "evaluation")
CALIBRATION_SETTINGS = tuple(n for n, s in SETTINGS.items() if s.role == "calibration")
NPZ_SETTING = "npz"


@dataclasses.dataclass(frozen=True)
class ClusterMarginConfig:
    """How the `cluster_margin` strategy runs the product (benchmarks/cm_settings_study.py
    chose these defaults on the calibration pools)."""

    margin_pool_factor: float = 1.25  # k_m / k_t (the study's choice; cm-select's default)
    target_cluster_size: float = 30.0  # mean cluster size of the cut (the study's choice)
    recluster: bool = False  # re-cluster on every round's model instead of the seed model's only
    max_distance: float = 0.03  # first max eps of the hierarchy (doubled until the target is reachable)
    num_neighbors: int = 0  # 0: cm-cluster's default
    # Exact candidates: the clusters the design promises, whatever the pool size (cm-cluster's
    # approximate path above 50K points is measured separately, benchmarks/cluster_bench.py).
    knn_mode: str = "exact"

    def label(self) -> str:
        return (f"cm_f{self.margin_pool_factor:g}_s{self.target_cluster_size:g}"
                + ("_recluster" if self.recluster else ""))


@dataclasses.dataclass(frozen=True)
class Config:
    """What every curve shares; a curve's key adds its setting (and cluster_margin's config)."""

    test_size: int = 10000
    cnn: CnnConfig = CnnConfig()
    cm: ClusterMarginConfig = ClusterMarginConfig()
    quick: bool = False

    def setting(self, name: str, pool_npz: Optional[str] = None) -> Setting:
        if name == NPZ_SETTING:
            if not pool_npz:
                raise ValueError("setting 'npz' needs --pool_npz")
            setting = Setting(NPZ_SETTING, PoolSpec("npz"))
        else:
            setting = SETTINGS[name]
        if not self.quick:
            return setting
        # Quick: minutes, for the end-to-end test. A 1,000-row pool, batches of 100.
        pool = setting.pool
        if pool.kind in ("plain", "redundant"):
            pool = dataclasses.replace(pool, num_sources=1000 // (pool.copies if pool.kind == "redundant" else 1))
        elif pool.kind == "zipf":
            pool = dataclasses.replace(pool, num_sources=200)
        return dataclasses.replace(setting, pool=pool, batch_size=100, seed_size=200, rounds=2)

    def curve_key(self, setting: Setting, strategy: str, pool_npz: Optional[str] = None) -> str:
        blob = {"setting": dataclasses.asdict(setting), "test_size": self.test_size,
                "cnn": dataclasses.asdict(self.cnn), "strategy": strategy}
        if strategy == "cluster_margin":
            blob["cm"] = dataclasses.asdict(self.cm)
        if setting.name == NPZ_SETTING:
            blob["pool_npz"] = _file_digest(pool_npz)
        return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


FULL = Config()
# Quick: eps small enough for a 1,000-row pool; a 32-d CNN trained for 4 epochs.
QUICK = Config(test_size=1000, quick=True, cm=ClusterMarginConfig(max_distance=0.05),
               cnn=CnnConfig(conv1=8, conv2=16, embedding_dim=32, epochs=4, batch_size=32))

# The configuration of the curves recorded before settings had their own keys
# (config a2656e5666): a baseline curve recorded under it is the same curve today.
LEGACY_CONFIG = {"pool_size": 60000, "redundant_copies": 5, "max_shift": 2, "noise_std": 10.0, "test_size": 10000,
                 "seed_size": 1000, "batch_size": 2000, "rounds": 4}


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


def code_commit() -> Optional[str]:
    """The commit of the code running this benchmark ('+dirty' if its code has edits), so
    every recorded curve names what produced it; None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results", ":!benchmarks/README.md"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


@contextlib.contextmanager
def curve_claim(path: str):
    """A non-blocking flock on `<curve>.running`: yields False when another process is
    running this curve, so several benchmark processes can share one list of curves."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".running", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def curve_matches(record: dict, key: str, strategy: str, config: Config) -> bool:
    """A recorded curve counts for `key`: same key, or a baseline recorded before curve
    keys existed (LEGACY_CONFIG) under exactly today's pool, budget, CNN and test set."""
    if record.get("curve_key") == key:
        return True
    if "curve_key" in record or strategy == "cluster_margin" or record.get("setting") not in ("plain", "redundant"):
        return False
    legacy = record.get("config") or {}
    return (not config.quick and config.test_size == LEGACY_CONFIG["test_size"]
            and all(legacy.get(k) == v for k, v in LEGACY_CONFIG.items())
            and legacy.get("cnn") == dataclasses.asdict(config.cnn) == dataclasses.asdict(FULL.cnn))


# ----------------------------------------------------------------------------- data
class Data:
    """Test set and pools, built once per process; pool Parquet written once; the seed
    model and its cm-embed output shared by every curve of a (setting, seed)."""

    def __init__(self, config: Config, data_dir: str, work_dir: str, pool_npz: Optional[str] = None):
        self.config = config
        self.work_dir = work_dir
        self.pool_npz = pool_npz
        train_x, train_y, test_x, test_y = al_data.load_fashion_mnist(data_dir)
        self.train_x, self.train_y = train_x, train_y
        self._npz = None
        if pool_npz:
            self._npz = al_data.load_npz_pool(pool_npz)
            test_x, test_y = self._npz[1], self._npz[2]
        if config.test_size < test_x.shape[0]:
            idx = np.sort(np.random.default_rng(7).choice(test_x.shape[0], config.test_size, replace=False))
            test_x, test_y = test_x[idx], test_y[idx]
        self.test_x, self.test_y = test_x, test_y
        self._pools: Dict[str, al_data.Pool] = {}
        self._seed_models: Dict[tuple, object] = {}
        self._seed_embeddings: Dict[tuple, str] = {}
        self._hierarchies: Dict[tuple, dict] = {}

    def setting(self, name: str) -> Setting:
        return self.config.setting(name, self.pool_npz)

    def pool(self, name: str) -> al_data.Pool:
        if name not in self._pools:
            if name == NPZ_SETTING:
                self._pools[name] = self._npz[0]
            else:
                self._pools[name] = al_data.build_pool(name, self.setting(name).pool, self.train_x, self.train_y)
        return self._pools[name]

    def _setting_dir(self, name: str) -> str:
        key = self.config.curve_key(self.setting(name), "pool", self.pool_npz)
        return os.path.join(self.work_dir, f"pool-{name}-{key}")

    def pool_parquet(self, name: str) -> str:
        path = os.path.join(self._setting_dir(name), "pool.parquet")
        if not os.path.exists(path):
            al_data.write_png_parquet(self.pool(name), path)
        return path

    def seed_model(self, name: str, seed: int, labeled_idx: np.ndarray):
        """The round-0 model of (setting, seed): every strategy of a seed starts from it."""
        import al_model

        key = (name, seed)
        if key not in self._seed_models:
            pool = self.pool(name)
            self._seed_models[key] = al_model.train_cnn(pool.images[labeled_idx], pool.labels[labeled_idx],
                                                        self.config.cnn, seed=seed * 1000)
        return self._seed_models[key]

    def seed_embeddings(self, name: str, seed: int, model) -> tuple:
        """(cm-embed output dir of the seed model, seconds spent now): embedded once."""
        import al_model
        import al_product

        key = (name, seed)
        if key in self._seed_embeddings:
            return self._seed_embeddings[key], 0.0
        t0 = time.time()
        out = os.path.join(self._setting_dir(name), f"seed{seed}-round0")
        model_path = al_model.save_for_embedding(model, os.path.join(out, "model.keras"))
        al_product.embed_pool(self.pool_parquet(name), model_path, os.path.join(out, "embed"))
        self._seed_embeddings[key] = os.path.join(out, "embed")
        return self._seed_embeddings[key], time.time() - t0

    def hierarchy(self, embed_dir: str, out_dir: str, cm: ClusterMarginConfig) -> dict:
        """cm-cluster's hierarchy of `embed_dir`, built once, up to a max eps at which the
        mean cluster size reaches cm.target_cluster_size (doubled from cm.max_distance)."""
        import al_product

        key = (embed_dir, cm.num_neighbors, cm.knn_mode)
        known = self._hierarchies.get(key)
        if known and known["mean_cluster_size"] >= cm.target_cluster_size:
            return known
        eps = max(cm.max_distance, known["max_distance"] * 2) if known else cm.max_distance
        for _ in range(8):
            t0 = time.time()
            stats = al_product.build_clusters(embed_dir, out_dir, eps, cm.num_neighbors or None, knn_mode=cm.knn_mode)
            built = {"dir": out_dir, "max_distance": eps, "build_s": time.time() - t0,
                     "mean_cluster_size": stats["mean_cluster_size"], "num_clusters": stats["num_clusters"]}
            self._hierarchies[key] = built
            _LOG.info("hierarchy of %s up to eps %.4f: mean cluster size %.2f", embed_dir, eps, stats["mean_cluster_size"])
            if stats["mean_cluster_size"] >= cm.target_cluster_size:
                return built
            eps *= 2
        raise RuntimeError(f"{embed_dir}: mean cluster size {cm.target_cluster_size} not reached up to eps {eps / 2}")


# ----------------------------------------------------------------------------- strategies
class Selector:
    """Chooses `k` unlabeled pool indices given the model trained on the labels so far."""

    def __init__(self, strategy: str, setting: str, seed: int, data: Data, config: Config, work: str):
        self.strategy, self.setting, self.seed = strategy, setting, seed
        self.data, self.config, self.work = data, config, work
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

    # The product path: cm-embed -> (cm-cluster, cut) -> cm-select.
    def _select_with_product(self, model, labeled, round_index, k) -> np.ndarray:
        import al_model
        import al_product

        pool = self.data.pool(self.setting)
        round_dir = os.path.join(self.work, f"round{round_index}")
        os.makedirs(round_dir, exist_ok=True)
        t0 = time.time()
        if round_index == 0:
            embed_dir, _ = self.data.seed_embeddings(self.setting, self.seed, model)
        else:
            model_path = al_model.save_for_embedding(model, os.path.join(round_dir, "model.keras"))
            embed_dir = os.path.join(round_dir, "embed")
            al_product.embed_pool(self.data.pool_parquet(self.setting), model_path, embed_dir)
        timings = {"embed_s": time.time() - t0}
        self.info.setdefault("embed_dirs", []).append(embed_dir)
        self._check_scores(model, embed_dir, pool)
        cm = self.strategy == "cluster_margin"
        if cm and (self._clusters_dir is None or self.config.cm.recluster):
            t1 = time.time()
            self._clusters_dir = self._cut_clusters(embed_dir, round_index)
            timings["cluster_s"] = time.time() - t1
        exclude = al_product.write_exclude(pool.example_ids[labeled], os.path.join(round_dir, "labeled.parquet"))
        t2 = time.time()
        result = al_product.select_batch(
            embed_dir, self._clusters_dir if cm else None, exclude, os.path.join(round_dir, "selection"), k,
            self.strategy, seed=self.seed * 1000 + round_index,
            margin_pool_factor=self.config.cm.margin_pool_factor if cm else None)
        timings["select_s"] = time.time() - t2
        self.info.setdefault("product_timings", []).append(timings)
        diagnostics = result["summary"].get("batch_diagnostics")
        if diagnostics is not None:
            self.info.setdefault("batch_diagnostics", []).append(diagnostics)
        ids = result["example_id"]
        return np.array([int(i) for i in ids], dtype=np.int64)

    def _cut_clusters(self, embed_dir: str, round_index: int) -> str:
        """The hierarchy of this round's embeddings (shared across curves of the seed model)
        cut at the configured mean cluster size."""
        import al_product

        cm = self.config.cm
        shared = round_index == 0  # the seed model's embeddings are shared by every curve of the seed
        base = os.path.dirname(embed_dir) if shared else os.path.join(self.work, f"round{round_index}")
        hierarchy = self.data.hierarchy(embed_dir, os.path.join(base, "hierarchy"), cm)
        out = os.path.join(self.work, f"round{round_index}", "clusters")
        summary = al_product.recut(hierarchy["dir"], out, cm.target_cluster_size)
        entry = {"built_on_round": round_index, "max_distance": hierarchy["max_distance"],
                 "hierarchy_build_s": hierarchy["build_s"], **summary}
        if round_index == 0 or cm.recluster:
            self.info.setdefault("clusters_per_round", []).append(entry)
        self.info.setdefault("clusters", entry)
        return out

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


# ----------------------------------------------------------------------------- one curve
def run_curve(setting_name: str, strategy: str, seed: int, data: Data, config: Config, out_dir: str, work_dir: str,
              command: str, keep_batches: bool = True, label: Optional[str] = None) -> dict:
    """Runs one AL curve to the budget and writes its JSON to `out_dir`; returns the record.

    `label` names the curve file in place of the strategy (the settings study runs
    several cluster_margin configurations side by side)."""
    import al_model

    setting = data.setting(setting_name)
    label = label or strategy
    pool = data.pool(setting_name)
    key = config.curve_key(setting, strategy, data.pool_npz)
    work = os.path.join(work_dir, f"{setting_name}__{label}__seed{seed}-{key}")
    os.makedirs(work, exist_ok=True)
    selector = Selector(strategy, setting_name, seed, data, config, work)
    labeled = np.zeros(pool.size, dtype=bool)
    seed_set = np.sort(np.random.default_rng([seed, 0]).choice(pool.size, setting.seed_size, replace=False))
    labeled[seed_set] = True
    labels, accuracies, batches, round_seconds = [], [], [], []
    start = time.time()
    for r in range(setting.rounds + 1):
        t0 = time.time()
        idx = np.flatnonzero(labeled)
        # Same training seed for every strategy at a (seed, round): differences come from the labels only.
        if r == 0:
            model = data.seed_model(setting_name, seed, idx)
        else:
            model = al_model.train_cnn(pool.images[idx], pool.labels[idx], config.cnn, seed=seed * 1000 + r)
        acc = al_model.accuracy(model, data.test_x, data.test_y)
        labels.append(int(idx.size))
        accuracies.append(acc)
        _LOG.info("%s/%s/seed%d round %d: %d labels, test accuracy %.4f", setting_name, label, seed, r, idx.size, acc)
        if r < setting.rounds:
            batch = selector.select(model, labeled, r, setting.batch_size)
            _verify_batch(batch, labeled, setting.batch_size, f"{setting_name}/{label}/seed{seed} round {r}")
            batches.append(batch.tolist())
            labeled[batch] = True
        round_seconds.append(time.time() - t0)
    batch_base = [[int(pool.base_index[i]) for i in b] for b in batches]
    record = {
        "setting": setting_name, "strategy": strategy, "label": label, "seed": seed, "curve_key": key,
        "config": {"pool_size": pool.size, "seed_size": setting.seed_size, "batch_size": setting.batch_size,
                   "rounds": setting.rounds, "test_size": int(data.test_y.size),
                   "setting": dataclasses.asdict(setting), "cnn": dataclasses.asdict(config.cnn),
                   "cluster_margin": dataclasses.asdict(config.cm) if strategy == "cluster_margin" else None},
        "command": command,
        "labels": labels, "accuracy": accuracies,
        "seed_set": seed_set.tolist(),
        "batches": batches if keep_batches else None,
        # How many distinct source images each batch holds (near-copies share a source).
        "distinct_sources_per_batch": [len(set(b)) for b in batch_base],
        "round_seconds": round_seconds, "seconds": time.time() - start,
        "selector": selector.info,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": code_commit(),
    }
    _write_json(os.path.join(out_dir, f"{setting_name}__{label}__seed{seed}.json"), record)
    return record


def _verify_batch(batch: np.ndarray, labeled: np.ndarray, k: int, what: str) -> None:
    if batch.size != k or np.unique(batch).size != k:
        raise RuntimeError(f"{what}: batch has {np.unique(batch).size} distinct of {batch.size} ids, expected {k}")
    if batch.min() < 0 or batch.max() >= labeled.size:
        raise RuntimeError(f"{what}: batch has ids outside the pool")
    if labeled[batch].any():
        raise RuntimeError(f"{what}: {int(labeled[batch].sum())} selected examples were already labeled")


# ----------------------------------------------------------------------------- report
def load_curves(results_dir: str, config: Config, settings: Sequence[str], strategies: Sequence[str],
                seeds: Sequence[int], pool_npz: Optional[str] = None) -> List[dict]:
    """The completed curves of the expected (setting, strategy, seed) under `config`."""
    out = []
    for name in settings:
        setting = config.setting(name, pool_npz)
        for strategy in strategies:
            key = config.curve_key(setting, strategy, pool_npz)
            for seed in seeds:
                path = curve_path(results_dir, name, strategy, seed)
                if os.path.exists(path):
                    record = _read_json(path)
                    if curve_matches(record, key, strategy, config):
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


def aggregate(curves: List[dict], settings: Sequence[str], strategies: Sequence[str], config: Config, command: str,
              pool_npz: Optional[str] = None):
    """Per setting, per strategy: mean and standard error over completed seeds; the
    details (per seed) and how Cluster-Margin compares at every budget point."""
    out = {"command": command, "settings": []}
    details = {"config": dataclasses.asdict(config), "settings": []}
    for name in settings:
        setting = config.setting(name, pool_npz)
        mine = [c for c in curves if c["setting"] == name]
        entry = {"name": name, "batch_size": setting.batch_size, "seed_size": setting.seed_size,
                 "seeds": sorted({c["seed"] for c in mine}), "curves": {}}
        detail = {"name": name, "setting": dataclasses.asdict(setting), "curves": {}}
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
        detail["cluster_margin_vs"] = compare_at_budgets(entry["curves"])
        detail["savings_at_margin_final_accuracy"] = savings_at_margin_final(entry["curves"])
        out["settings"].append(entry)
        details["settings"].append(detail)
    return out, details


def compare_at_budgets(curves: Dict[str, dict]) -> Optional[dict]:
    """Cluster-Margin's mean accuracy minus Margin's and Random's at every budget point."""
    if "cluster_margin" not in curves:
        return None
    cm = np.array(curves["cluster_margin"]["accuracy_mean"])
    out = {"labels": curves["cluster_margin"]["labels"]}
    for other in ("margin", "random"):
        if other in curves:
            diff = cm - np.array(curves[other]["accuracy_mean"])
            out[f"minus_{other}"] = diff.tolist()
            # The seed-set point is shared by construction; the claim is about the rest.
            out[f"at_or_above_{other}_after_seed_set"] = bool(np.all(diff[1:] >= 0))
    return out


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


def readme_section(result: dict, details: dict, config: Config, targets: Sequence[float], expected_seeds: Sequence[int],
                   strategies: Sequence[str], plot_paths: Dict[str, str]) -> str:
    cm = config.cm
    lines = [
        "## Label efficiency on Fashion-MNIST",
        "",
        "An active-learning simulation (`benchmarks/label_efficiency.py`): a random seed set of labels, then "
        "batches chosen by each strategy; after each, a small CNN "
        f"(2 conv + {config.cnn.embedding_dim}-d dense) is trained from scratch for {config.cnn.epochs} epochs on all "
        f"labels so far and scored on {config.test_size:,} Fashion-MNIST test images. `margin` and `cluster_margin` "
        "select through the product's own `cm-embed` (every round), `cm-cluster` (the hierarchy of the seed model's "
        "embeddings, cut with `--recut_from`) and `cm-select` (the labeled set as `--exclude`); Cluster-Margin with "
        f"k_m = {cm.margin_pool_factor:g} k_t and clusters cut at a mean size of {cm.target_cluster_size:g}"
        + (", re-clustered on every round's model" if cm.recluster else "")
        + " (the settings `benchmarks/cm_settings_study.py` chose on separate calibration pools). "
        "`random`, `coreset` (k-center greedy on the embeddings) and `badge` (k-means++ seeding on last-layer "
        "gradient embeddings) are in-memory baselines in `benchmarks/al_baselines.py`.",
        "",
        f"Command: `{result['command']}` (2 shared CPU cores; each curve under `flock /tmp/cm-bench.lock`). "
        "Data: `benchmarks/results/label_efficiency.json`; per-seed curves, cluster statistics and timings: "
        "`benchmarks/results/label_efficiency_details.json`. A rerun of the command resumes: finished curves "
        "(`benchmarks/results/label_efficiency/curves/`) are skipped; `--report_only` rewrites the JSON, the plots "
        "and this section from them.",
        "",
    ]
    for entry, detail in zip(result["settings"], details["settings"]):
        name = entry["name"]
        spec = detail["setting"]
        budget = spec["seed_size"] + spec["rounds"] * spec["batch_size"]
        done = {s: detail["curves"].get(s, {}).get("seeds", []) for s in strategies}
        pool = spec["pool"]
        lines.append(f"### `{name}`: {pool['kind']} pool, batches of {spec['batch_size']:,}")
        lines.append("")
        lines.append("Completed curves (seeds): " + ", ".join(
            f"{s} {len(done[s])}/{len(expected_seeds)}" for s in strategies) + ".")
        lines.append("")
        if not entry["curves"]:
            lines += ["No curve of this setting completed yet.", ""]
            continue
        labels = next(iter(entry["curves"].values()))["labels"]
        lines += ["| strategy | seeds | " + " | ".join(f"acc. at {x:,}" for x in labels) + " |",
                  "|" + "---|" * (len(labels) + 2)]
        for s, curve in entry["curves"].items():
            cells = [f"{a:.4f}" for a in curve["accuracy_mean"]]
            lines.append(f"| {s} | {len(done[s])} | " + " | ".join(cells) + " |")
        lines.append("")
        saving = detail.get("savings_at_margin_final_accuracy")
        if saving:
            lines.append(_saving_sentence(saving, budget, entry["curves"]))
            lines.append("")
        if name in plot_paths:
            lines.append(f"![{name}]({plot_paths[name]})")
            lines.append("")
    lines.append("Labels to reach an accuracy: where the mean curve first reaches it, interpolated linearly between the "
                 "measured points (a rough reading); `> budget` = not reached within the budget.")
    return "\n".join(lines) + "\n"


def write_report(results_dir: str, config: Config, settings, strategies, seeds, targets, command: str,
                 readme_path: Optional[str], pool_npz: Optional[str] = None) -> dict:
    curves = load_curves(results_dir, config, settings, strategies, seeds, pool_npz)
    commands = sorted({c["command"] for c in curves})
    result, details = aggregate(curves, settings, strategies, config,
                                commands[0] if len(commands) == 1 else (commands or [command])[0], pool_npz)
    details["commands"] = commands
    details["report_command"] = command
    details["expected"] = {"settings": list(settings), "strategies": list(strategies), "seeds": list(seeds)}
    details["complete"] = sorted(f"{c['setting']}/{c['strategy']}/seed{c['seed']}" for c in curves)
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
        # Links relative to the README that shows them (benchmarks/README.md by default).
        plot_paths[entry["name"]] = os.path.relpath(path, os.path.dirname(readme_path)) if readme_path else path
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


def _split(text: str, allowed: Sequence[str], flag: str, p: argparse.ArgumentParser) -> List[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        p.error(f"{flag}: unknown {bad}; choose from {','.join(allowed)}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny budget (minutes): for the end-to-end test.")
    p.add_argument("--report_only", "--report-only", action="store_true", help="Rewrite JSON/plots/README from completed curves.")
    p.add_argument("--settings", default=None,
                   help=f"Comma-separated settings (default: {','.join(EVALUATION_SETTINGS)}; with --pool_npz: npz).")
    p.add_argument("--pool_npz", default=None,
                   help="A pool of your own (.npz with images uint8 [n,28,28], labels [n], optional source [n], "
                        "test_images, test_labels): runs the setting 'npz' on it.")
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
    if args.pool_npz and not os.path.isfile(args.pool_npz):
        p.error(f"--pool_npz: no such file {args.pool_npz!r}")
    default_settings = NPZ_SETTING if args.pool_npz else ",".join(EVALUATION_SETTINGS)
    args.settings = _split(args.settings or default_settings, list(SETTINGS) + [NPZ_SETTING], "--settings", p)
    if NPZ_SETTING in args.settings and not args.pool_npz:
        p.error("--settings npz needs --pool_npz")
    args.strategies = _split(args.strategies, STRATEGIES, "--strategies", p)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s != ""]
    args.targets = [float(t) for t in args.targets.split(",") if t]
    if args.lock is None:
        args.lock = "" if args.quick else DEFAULT_LOCK
    if args.keep_going is None:
        args.keep_going = not args.quick
    if args.readme is None:
        # Only an explicit report rewrites the README: a background run must not race
        # with the other engineers' edits of the file.
        args.readme = os.path.join(ROOT, "benchmarks", "README.md") if args.report_only and not args.quick else ""
    return args


def run_curves(todo, data_factory, out_dir: str, work_dir: str, command: str, lock: str,
               keep_going: bool, failed_path: str, after_each=None):
    """Runs each (seed, setting, strategy, label, config) of `todo` whose curve is not yet
    in `out_dir`; returns (ran, failed). `data_factory()` is called once, when needed."""
    data = None
    ran, failed = [], []
    for seed, setting, strategy, label, config in todo:
        path = os.path.join(out_dir, f"{setting}__{label}__seed{seed}.json")
        if data is None:
            data = data_factory()
        key = config.curve_key(data.setting(setting), strategy, data.pool_npz)
        if os.path.exists(path) and curve_matches(_read_json(path), key, strategy, config):
            continue
        name = f"{setting}/{label}/seed{seed}"
        with curve_claim(path) as mine, bench_lock(lock if mine else "") as waited:
            if not mine:
                _LOG.info("curve %s is being run by another process; skipped", name)
                continue
            if os.path.exists(path) and curve_matches(_read_json(path), key, strategy, config):
                continue  # finished by another process while this one waited
            _LOG.info("curve %s (waited %.0fs for the lock)", name, waited)
            try:
                record = run_curve(setting, strategy, seed, data, config, out_dir, work_dir, command, label=label)
            except Exception as e:  # noqa: BLE001 - one broken curve must not stop the others
                if not keep_going:
                    raise
                _LOG.exception("curve %s failed; continuing with the next", name)
                failed.append({"curve": name, "error": f"{type(e).__name__}: {e}"})
                _write_json(failed_path, failed)
                continue
        ran.append(name)
        _LOG.info("curve %s done in %.1f min: %s", name, record["seconds"] / 60, record["accuracy"])
        if after_each:
            after_each()
    return ran, failed


def run(argv=None) -> dict:
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    command = " ".join(["python", "benchmarks/label_efficiency.py"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    report_kwargs = dict(results_dir=args.results_dir, config=config, settings=args.settings, strategies=args.strategies,
                         seeds=args.seeds, targets=args.targets, readme_path=args.readme or None, pool_npz=args.pool_npz)
    if args.report_only:
        return write_report(command=command, **report_kwargs)
    todo = [(seed, setting, strategy, strategy, config) for seed, setting, strategy in
            schedule(args.settings, args.strategies, args.seeds)]
    ran, failed = run_curves(
        todo, lambda: Data(config, args.data_dir, args.work_dir, args.pool_npz), curves_dir(args.results_dir),
        args.work_dir, command, args.lock, args.keep_going,
        os.path.join(args.results_dir, "label_efficiency", "failed.json"),
        after_each=lambda: write_report(command=command, **report_kwargs))
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
