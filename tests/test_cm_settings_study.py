"""The settings study's rule, applied to synthetic curves: what it runs next and what it picks."""

import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cm_settings_study as st  # noqa: E402
import label_efficiency as le  # noqa: E402

BASE = le.FULL


def _write(out, pool, v, seed, score):
    cm = v.cm(BASE.cm)
    key = dataclasses.replace(BASE, cm=cm).curve_key(BASE.setting(pool), "cluster_margin")
    le._write_json(st.curve_file(out, pool, v.label, seed), {
        "curve_key": key, "setting": pool, "label": v.label, "strategy": "cluster_margin", "seed": seed,
        "labels": [1000, 3000, 5000, 7000, 9000], "accuracy": [0.7] + [score] * 4,
        "config": {"cluster_margin": dataclasses.asdict(cm)}, "distinct_sources_per_batch": [], "selector": {},
        "seconds": 1.0, "command": "test", "completed_at": "now"})


def test_only_calibration_pools_and_the_full_grid_run_first(tmp_path):
    todo, state = st.plan(str(tmp_path), BASE)
    assert state["stage1"] is None
    assert {t[1] for t in todo} == set(st.POOLS) == {"redundant_cal", "zipf_cal"}
    assert all(le.SETTINGS[t[1]].role == "calibration" for t in todo)
    labels = {t[3] for t in todo if t[2] == "cluster_margin"}
    assert len(labels) == len(st.FACTORS) * len(st.SIZES) == 12
    assert {t[0] for t in todo} == {0}


def test_rule_ranks_ties_and_stages(tmp_path):
    out = str(tmp_path)
    def s1(v):  # factor 2 is best; factor 1.25 within the tie margin of factor 4
        return 0.80 + 0.01 * (v.factor == 2.0) + 0.0003 * (v.factor == 1.25) + 0.001 * (v.size == 10.0)
    for v in st.GRID:
        for pool in st.POOLS:
            _write(out, pool, v, 0, s1(v))
    todo, state = st.plan(out, BASE)
    ranked = [s["label"] for s in state["stage1"]]
    assert ranked[:3] == ["cm_f2_s10", "cm_f2_s30", "cm_f2_s3"]  # s30 / s3 tie: the larger size first
    assert ranked.index("cm_f1.25_s10") < ranked.index("cm_f4_s10")  # within 0.0005: the smaller k_m first
    assert state["stage2"] is None
    more = [t for t in todo if t[0] in (1, 2)]
    assert sorted({t[3] for t in more}) == ["cm_f2_s10", "cm_f2_s3", "cm_f2_s30"] and len(more) == 12
    # Stage 2: on seeds 1 and 2 the size-3 cut wins by a margin.
    for v in (s["variant"] for s in state["stage1"][:3]):
        for pool in st.POOLS:
            for seed in (1, 2):
                _write(out, pool, v, seed, 0.83 if v.size == 3.0 else 0.80)
    todo, state = st.plan(out, BASE)
    assert state["stage2"][0]["label"] == "cm_f2_s3"
    assert "final" in state and state["final"] is None
    recluster = [t for t in todo if t[3] == "cm_f2_s3_recluster"]
    assert len(recluster) == 6 and all(t[4].cm.recluster for t in recluster)
    # Re-clustering scores the same: it ties, and no re-clustering wins the tie.
    lead = state["stage2"][0]["variant"]
    for pool in st.POOLS:
        for seed in (0, 1, 2):
            score = st.score([le._read_json(st.curve_file(out, pool, lead.label, seed))])
            _write(out, pool, dataclasses.replace(lead, recluster=True), seed, score)
    _, state = st.plan(out, BASE)
    assert state["choice"]["label"] == "cm_f2_s3"
    result = st.report(out, str(tmp_path / "results"), BASE, "test")
    assert result["complete"] and result["choice"]["margin_pool_factor"] == 2.0
    assert result["rule"] == st.RULE and len(result["curves"]) == 24 + 12 + 6
