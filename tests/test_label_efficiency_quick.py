"""End-to-end check of benchmarks/label_efficiency.py on a tiny budget (`--quick`),
plus the in-memory baselines (k-center greedy, BADGE seeding) against naive references.

The quick run goes through the product's cm-embed, cm-cluster and cm-select exactly
like the full benchmark; it runs in a subprocess so its TensorFlow settings (op
determinism, 2 threads) do not leak into the rest of the suite.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

# The whole active-learning loop (TensorFlow training every round).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import al_baselines  # noqa: E402
import al_data  # noqa: E402

STRATEGIES = ["random", "margin", "cluster_margin", "coreset", "badge"]


# ----------------------------------------------------------------------------- baselines
def _coreset_naive(x, labeled, k):
    centers = list(np.flatnonzero(labeled))
    picks = []
    for _ in range(k):
        best, best_d = None, -1.0
        for i in range(x.shape[0]):
            if labeled[i] or i in picks:
                continue
            d = min(np.sum((x[i] - x[c]) ** 2) for c in centers)
            if d > best_d:
                best, best_d = i, d
        picks.append(best)
        centers.append(best)
    return picks


def test_coreset_matches_naive_k_center_greedy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5))
    labeled = np.zeros(60, bool)
    labeled[[1, 7, 30]] = True
    got = al_baselines.select_coreset(x, labeled, 8)
    assert got.tolist() == _coreset_naive(x, labeled, 8)


def test_badge_distances_equal_explicit_gradient_embeddings():
    rng = np.random.default_rng(4)
    n, d, c, k = 50, 6, 4, 7
    emb = rng.random((n, d))
    probs = rng.dirichlet(np.ones(c), size=n)
    labeled = np.zeros(n, bool)
    labeled[:5] = True
    got = al_baselines.select_badge(emb, probs, labeled, k, np.random.default_rng(11))
    # Naive k-means++ seeding on the materialised [n, c*d] gradient embeddings, same draws.
    a = probs.copy()
    a[np.arange(n), probs.argmax(1)] -= 1
    g = np.einsum("ic,id->icd", a, emb).reshape(n, -1)[~labeled]
    rng2 = np.random.default_rng(11)
    picks = [int(np.argmax(np.sum(g * g, axis=1)))]
    for _ in range(1, k):
        d2 = np.min([np.sum((g - g[p]) ** 2, axis=1) for p in picks], axis=0)
        d2[picks] = 0
        picks.append(int(rng2.choice(g.shape[0], p=d2 / d2.sum())))
    assert got.tolist() == np.flatnonzero(~labeled)[picks].tolist()
    assert not labeled[got].any() and len(set(got.tolist())) == k


# ----------------------------------------------------------------------------- quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not os.path.exists("/usr/share/datasets/fashion-mnist"):
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    results = tmp_path_factory.mktemp("results")
    work = tmp_path_factory.mktemp("work")
    # One setting keeps the test near a minute; the redundant pool is the one where
    # duplicates could leak into a batch. Both settings run in the full benchmark.
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "label_efficiency.py"), "--quick", "--settings", "redundant",
           "--results_dir", str(results), "--work_dir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results, work


def test_quick_outputs_issue_format(quick_run):
    results, _ = quick_run
    out = json.load(open(results / "label_efficiency.json"))
    assert set(out) == {"command", "settings"}
    assert "--quick" in out["command"]
    assert [s["name"] for s in out["settings"]] == ["redundant"]
    for setting in out["settings"]:
        assert set(setting) == {"name", "batch_size", "seed_size", "seeds", "curves"}
        assert setting["seeds"] == [0]
        assert sorted(setting["curves"]) == sorted(STRATEGIES)
        for curve in setting["curves"].values():
            assert set(curve) == {"labels", "accuracy_mean", "accuracy_sem"}
            labels = curve["labels"]
            assert labels[0] == setting["seed_size"]
            assert np.all(np.diff(labels) == setting["batch_size"])  # monotone: one batch per round
            assert all(0.0 <= a <= 1.0 for a in curve["accuracy_mean"])
            assert len(curve["accuracy_mean"]) == len(labels) == len(curve["accuracy_sem"])
        png = results / f"label_efficiency_{setting['name']}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same seed model starts every strategy of a seed: equal first accuracies.
    for setting in out["settings"]:
        firsts = {c["accuracy_mean"][0] for c in setting["curves"].values()}
        assert len(firsts) == 1


def test_quick_batches_disjoint_and_sized(quick_run):
    results, _ = quick_run
    files = sorted(glob.glob(str(results / "label_efficiency" / "curves" / "*.json")))
    assert len(files) == len(STRATEGIES)
    for path in files:
        rec = json.load(open(path))
        k = rec["config"]["batch_size"]
        labeled = set(rec["seed_set"])
        assert len(labeled) == rec["config"]["seed_size"]
        assert len(rec["batches"]) == rec["config"]["rounds"]
        for batch in rec["batches"]:
            assert len(batch) == k and len(set(batch)) == k, path
            assert not labeled & set(batch), path
            assert all(0 <= i < rec["config"]["pool_size"] for i in batch)
            labeled |= set(batch)
        assert rec["labels"][-1] == len(labeled)


def test_quick_product_strategies_used_the_pipelines(quick_run):
    results, work = quick_run
    for setting in ("redundant",):
        cm = json.load(open(results / "label_efficiency" / "curves" / f"{setting}__cluster_margin__seed0.json"))
        clusters = cm["selector"]["clusters"]
        assert clusters["num_clusters"] > 0 and clusters["distance_threshold"] > 0
        assert cm["selector"]["max_margin_error_vs_predict"] <= 1e-3
        margin = json.load(open(results / "label_efficiency" / "curves" / f"{setting}__margin__seed0.json"))
        # Margin via cm-select = the k smallest cm-embed margins among the unlabeled (numpy reference).
        # Round 0 scores come from the seed model's cm-embed output, shared by every strategy of the seed.
        embed_dir = margin["selector"]["embed_dirs"][0]
        assert embed_dir.startswith(str(work)) and cm["selector"]["embed_dirs"][0] == embed_dir
        table = pq.read_table(glob.glob(os.path.join(embed_dir, "embeddings-*.parquet")))
        ids = np.array([int(i) for i in table.column("example_id").to_pylist()])
        scores = table.column("margin").to_numpy()
        eligible = ~np.isin(ids, margin["seed_set"])
        k = margin["config"]["batch_size"]
        order = np.argsort(scores[eligible], kind="stable")
        kth = scores[eligible][order[k - 1]]
        chosen = set(margin["batches"][0])
        expected_sure = set(ids[eligible][scores[eligible] < kth].tolist())
        assert expected_sure <= chosen
        assert all(scores[ids == i][0] <= kth for i in chosen)


def test_calibration_and_heldout_pools_share_no_source_image():
    import label_efficiency as le

    train_x, train_y, _, _ = al_data.load_fashion_mnist()
    sources = {}
    for name in ("redundant_cal", "zipf_cal", "redundant_heldout", "zipf_heldout"):
        setting = le.SETTINGS[name]
        pool = al_data.build_pool(name, setting.pool, train_x, train_y)
        lo, hi = setting.pool.source_range
        assert lo <= pool.base_index.min() and pool.base_index.max() < hi
        assert np.array_equal(pool.labels, train_y[pool.base_index])
        sources[name] = set(pool.base_index.tolist())
        if setting.pool.kind == "zipf":
            _, counts = np.unique(pool.base_index, return_counts=True)
            assert counts.size == setting.pool.num_sources and counts.max() <= setting.pool.max_copies
            assert np.mean(counts <= 2) > 0.5 and counts.max() >= 20  # most once or twice, a few dozens of times
        else:
            assert pool.size == setting.pool.num_sources * setting.pool.copies
    assert le.SETTINGS["redundant_cal"].role == le.SETTINGS["zipf_cal"].role == "calibration"
    for cal in ("redundant_cal", "zipf_cal"):
        for held in ("redundant_heldout", "zipf_heldout"):
            assert not sources[cal] & sources[held]


def test_npz_pool_errors_name_the_array(tmp_path):
    good = dict(images=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 1, 2, 3]),
                test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([1, 2]))
    np.savez(tmp_path / "good.npz", **good)
    pool, test_x, test_y = al_data.load_npz_pool(str(tmp_path / "good.npz"))
    assert pool.size == 4 and pool.base_index.tolist() == [0, 1, 2, 3] and test_y.tolist() == [1, 2]
    for change, word in ((dict(labels=None), "'labels' missing"), (dict(images=np.zeros((4, 28, 28), np.float32)), "'images'"),
                         (dict(source=np.arange(3)), "'source'"), (dict(test_labels=np.array([1, 12])), "'test_labels'")):
        bad = {k: v for k, v in {**good, **change}.items() if v is not None}
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=word):
            al_data.load_npz_pool(str(tmp_path / "bad.npz"))


def test_pool_npz_runs_the_simulation_on_a_users_pool(tmp_path):
    train_x, train_y, test_x, test_y = al_data.load_fashion_mnist()
    np.savez(tmp_path / "mine.npz", images=train_x[:600], labels=train_y[:600], source=np.arange(600) // 2,
             test_images=test_x[:300], test_labels=test_y[:300])
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "label_efficiency.py"), "--quick", "--pool_npz",
           str(tmp_path / "mine.npz"), "--strategies", "random", "--results_dir", str(tmp_path / "r"),
           "--work_dir", str(tmp_path / "w")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.load(open(tmp_path / "r" / "label_efficiency.json"))
    assert [s["name"] for s in out["settings"]] == ["npz"]
    rec = json.load(open(tmp_path / "r" / "label_efficiency" / "curves" / "npz__random__seed0.json"))
    assert rec["config"]["pool_size"] == 600 and rec["config"]["test_size"] == 300
    # Distinct sources per batch are counted from the npz's `source` (pairs of rows).
    assert all(50 <= d <= 100 for d in rec["distinct_sources_per_batch"])
