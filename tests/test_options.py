"""Typed stage options and the command lines built on them.

* every command fails on a flag that is neither its own nor a Beam pipeline option,
  naming it (Beam alone would warn "Discarding unparseable args" and run with the
  defaults), while Beam's own options (--runner, --direct_num_workers) pass through;
* each stage's options check themselves when built and name the parameter at fault;
* --help gives every flag a line with its default;
* cm-nightly validates every stage's options before its first stage starts.
"""

import argparse
import dataclasses
import json
import os
import re

import pytest

from cm_beam.errors import InputError
from cm_beam.runtime import runner as cm_runner
from cm_beam.selection.options import SelectOptions, margin_pool_size_for
from tests.conftest import write_selection_inputs

COMMANDS = ["pipelines.embed_pool", "pipelines.build_clusters", "pipelines.select_batch", "pipelines.nightly"]


def _module(name):
    import importlib

    return importlib.import_module(name)


# --- Unknown flags and Beam's options ------------------------------------------------


def test_unknown_beam_args_are_the_ones_no_pipeline_option_takes():
    assert cm_runner.unknown_beam_args(["--runner=FnApiRunner", "--direct_num_workers", "2",
                                        "--direct_running_mode=multi_processing", "--project", "p",
                                        "--job_name=n", "--save_main_session"]) == []
    assert cm_runner.unknown_beam_args(["--batch_sise", "50"]) == ["--batch_sise", "50"]
    assert cm_runner.unknown_beam_args(["--runner=FnApiRunner", "--seeds=3"]) == ["--seeds=3"]
    assert cm_runner.unknown_beam_args(["stray"]) == ["stray"]


def test_dask_options_are_known_once_the_runner_names_dask():
    pytest.importorskip("dask.distributed")
    assert cm_runner.unknown_beam_args(["--runner=DaskRunner", "--dask_client_address=127.0.0.1:1"]) == []


def test_one_runner_alias_table():
    assert cm_runner.resolve_runner("DaskRunner") == "cm_beam.runtime.dask_runner.DaskRunner"
    assert cm_runner.resolve_runner("apache_beam.runners.dask.dask_runner.DaskRunner") == \
        "cm_beam.runtime.dask_runner.DaskRunner"
    assert cm_runner.resolve_runner("DataflowRunner") == "DataflowRunner"
    assert cm_runner.rewrite_runner(["--runner", "DaskRunner", "--x=1"]) == [
        "--runner=cm_beam.runtime.dask_runner.DaskRunner", "--x=1"]
    from cm_beam.runtime.dask_runner import DaskRunner  # the alias names a class that exists

    assert DaskRunner.__module__ == "cm_beam.runtime.dask_runner"


REQUIRED = {
    "pipelines.embed_pool": ["--pool", "p.csv", "--model", "m.keras", "--output_dir", "o"],
    "pipelines.build_clusters": ["--embeddings", "e.parquet", "--distance_threshold", "0.1", "--output_dir", "o"],
    "pipelines.select_batch": ["--scores", "s.parquet", "--clusters", "c.parquet", "--batch_size", "5",
                               "--output_dir", "o"],
    "pipelines.nightly": ["--pool", "p.csv", "--model", "m.keras", "--work_dir", "w", "--batch_size", "5",
                          "--distance_threshold", "0.1"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("typo", [["--batch_sise", "50"], ["--seeds=3"], ["--runer", "FnApiRunner"]])
def test_an_unknown_flag_fails_before_any_work_naming_it(command, typo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _module(command).run(REQUIRED[command] + typo + ["--runner=FnApiRunner"])
    assert exit_info.value.code == 2
    flag = typo[0].split("=")[0]
    err = capsys.readouterr().err
    assert f"unrecognized flag {flag}:" in err and "Beam pipeline option" in err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("command", COMMANDS)
def test_beam_options_pass_through_the_parser(command):
    beam = ["--runner", "DirectRunner", "--direct_num_workers=2", "--direct_running_mode", "multi_processing",
            "--job_name=x"]
    module = _module(command)
    args, rest = cm_runner.split_beam_args(module.build_parser(), REQUIRED[command] + beam)
    assert rest == beam


@pytest.mark.parametrize("command", COMMANDS)
def test_help_gives_every_flag_its_default(command, capsys):
    parser = _module(command).build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        # The flag's entry: its line in the options list and the indented lines below it.
        found = re.search(rf"^  {re.escape(flag)}\b.*(?:\n {{3,}}.*)*", out, re.M)
        assert found, f"{command} {flag} has no line in --help"
        block = " ".join(found.group(0).split())
        assert action.help, f"{command} {flag} has no help"
        assert "(required)" in block or "default" in block, f"{command} {flag}: no default in --help:\n{block}"


# --- SelectOptions ---------------------------------------------------------------------


def _select(**kw):
    base = dict(scores="s/*.parquet", clusters="c/*.parquet", batch_size=10, output_dir="o")
    return SelectOptions(**{**base, **kw})


@pytest.mark.parametrize("kw,parameter", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(margin_pool_size=5), "margin_pool_size"),
    (dict(margin_pool_factor=0.5), "margin_pool_factor"),
    (dict(margin_pool_factor=float("nan")), "margin_pool_factor"),
    (dict(margin_pool_size=20, margin_pool_factor=2.0), "margin_pool_factor"),
    (dict(strategy="coreset"), "strategy"),
    (dict(uncertainty="variance"), "uncertainty"),
    (dict(multilabel_reduce="max"), "multilabel_reduce"),
    (dict(clusters=None), "clusters"),
    (dict(scores=""), "scores"),
    (dict(output_dir=None), "output_dir"),
])
def test_select_options_name_the_parameter_at_fault(kw, parameter):
    with pytest.raises(InputError, match=f"^--{parameter}: ") as info:
        _select(**kw)
    assert info.value.parameter == parameter


def test_select_options_are_frozen_and_revalidated_on_replace():
    options = _select(exclude=["a.csv"])
    assert options.exclude == ("a.csv",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 3
    with pytest.raises(InputError, match="--margin_pool_size"):
        dataclasses.replace(options, margin_pool_size=9)
    assert _select(strategy="margin", clusters=None).resolved_margin_pool_size == 10


def test_the_margin_pool_rule():
    assert margin_pool_size_for(10) == 13  # ceil(10 x 1.25): the default factor
    assert margin_pool_size_for(10, margin_pool_factor=2.5) == 25
    assert margin_pool_size_for(10, margin_pool_size=10) == 10
    assert margin_pool_size_for(10, margin_pool_size=40, strategy="margin") == 10
    with pytest.raises(InputError, match=r"--margin_pool_size: \(9\) must be >= --batch_size \(10\)"):
        margin_pool_size_for(10, margin_pool_size=9)


def test_select_batch_transform_checks_with_the_same_rule():
    from cm_beam.selection.select_batch import SelectBatch

    with pytest.raises(InputError, match="--margin_pool_size"):
        SelectBatch(batch_size=10, margin_pool_size=9)
    with pytest.raises(ValueError, match="--strategy"):  # InputError is a ValueError
        SelectBatch(batch_size=10, strategy="coreset")
    assert SelectBatch.from_options(_select(margin_pool_factor=3.0)).margin_pool_size == 30


def test_run_select_from_options_equals_the_command(tmp_path):
    from cm_beam.selection.stage import run_select
    from pipelines import select_batch

    pool = write_selection_inputs(tmp_path / "pool")
    common = ["--scores", pool["scores"], "--clusters", pool["clusters"], "--batch_size", "30",
              "--margin_pool_size", "90", "--seed", "4"]
    by_command = select_batch.run(common + ["--output_dir", str(tmp_path / "cli"), "--runner=FnApiRunner"])
    options = SelectOptions(scores=pool["scores"], clusters=pool["clusters"], batch_size=30, margin_pool_size=90,
                            seed=4, output_dir=str(tmp_path / "api"))
    by_api = run_select(options, ["--runner=FnApiRunner"])
    from cm_beam.io import table_io

    rows = [table_io.read_table(str(tmp_path / d / "selection-*.parquet")).sort_by("rank").to_pylist()
            for d in ("cli", "api")]
    assert rows[0] == rows[1] and len(rows[0]) == 30
    assert by_command["parameters"] == by_api["parameters"]
    assert json.loads((tmp_path / "api" / "manifest.json").read_text())["parameters"]["exclude"] == []


# --- cm-nightly: every stage's options before the first stage -------------------------


def _nightly_fails(argv, tmp_path, capsys):
    from pipelines import nightly

    work = tmp_path / "work"
    base = ["--pool", str(tmp_path / "pool.csv"), "--model", str(tmp_path / "m.keras"), "--work_dir", str(work),
            "--batch_size", "10", "--distance_threshold", "0.1", "--runner=FnApiRunner"]
    with pytest.raises(SystemExit) as exit_info:
        nightly.run(base + argv)
    assert exit_info.value.code == 2
    assert not work.exists()  # no lease taken, no stage started
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["--metric", "cosin"], "--metric"),
    (["--cluster_arg=--metric=cosin"], "--metric"),
    (["--margin_pool_size", "5"], "--margin_pool_size"),
    (["--margin_pool_factor", "0.5"], "--margin_pool_factor"),
    (["--strategy", "coreset"], "--strategy"),
    (["--cluster_arg=--num_probes=0"], "--num_probes"),
    (["--cluster_arg=--knn_mode=lsh"], "--knn_mode"),
    (["--embed_arg=--fetch_threads=0"], "--fetch_threads"),
    (["--select_arg=--batch_sise=3"], "--batch_sise"),
    (["--embed_arg=--fetch_thread=3"], "--fetch_thread"),
    (["--embed_arg=--output_dir=/tmp/elsewhere"], "--output_dir"),
    (["--select_arg=--exclude=x.csv"], "--exclude"),
])
def test_nightly_checks_every_stage_before_the_first(argv, named, tmp_path, capsys):
    err = _nightly_fails(argv, tmp_path, capsys)
    assert named in err, err


def test_nightly_raw_stage_flags_reach_the_stage_options(tmp_path):
    from pipelines import nightly

    parser = nightly.build_parser()
    args, beam_args = cm_runner.split_beam_args(parser, [
        "--pool", "p.csv", "--model", "m.keras", "--work_dir", str(tmp_path / "w"), "--batch_size", "10",
        "--margin_pool_factor", "3", "--multilabel", "--margin_reduce", "mean", "--metric", "sqeuclidean",
        "--distance_threshold", "0.3", "--embed_arg=--fetch_threads=4", "--embed_arg=--direct_num_workers=1",
        "--cluster_arg=--num_shards=4", "--select_arg=--seed=5", "--runner=FnApiRunner"])
    nightly._validate(args, parser, beam_args)
    stages = nightly.stage_options(args, parser)
    assert stages.embed.fetch_threads == 4 and stages.embed.multilabel and stages.embed.margin_reduce == "mean"
    assert stages.cluster.metric == "sqeuclidean" and stages.cluster.num_shards == 4
    assert stages.cluster.distance_threshold == 0.3
    assert stages.select.margin_pool_factor == 3 and stages.select.seed == 5
    assert stages.select.multilabel and stages.select.multilabel_reduce == "mean"
    assert stages.beam_args == {"embed": ["--direct_num_workers=1"], "cluster": [], "select": []}
    assert nightly._stage_beam_args(stages, ["--job_name", "n"], "embed") == ["--direct_num_workers=1", "--job_name=n-embed"]


def test_nightly_without_a_cut_has_no_cluster_options(tmp_path):
    from pipelines import nightly

    parser = nightly.build_parser()
    args, beam_args = cm_runner.split_beam_args(parser, ["--pool", "p.csv", "--model", "m.keras", "--work_dir",
                                                         str(tmp_path / "w"), "--batch_size", "10"])
    nightly._validate(args, parser, beam_args)
    stages = nightly.stage_options(args, parser)
    assert stages.cluster is None  # the work dir's clusters are reused
    # A cut decided during the run (e.g. the cached clustering's eps) completes them.
    later = nightly.cluster_options(stages, distance_threshold=0.2, embeddings="e/*.parquet", output_dir="o")
    assert later.distance_threshold == 0.2 and later.metric == "cosine"
    with pytest.raises(InputError, match="exactly one of --distance_threshold"):
        nightly.cluster_options(stages, embeddings="e/*.parquet", output_dir="o")


def test_nightly_demo_checks_options_before_generating_the_demo(tmp_path, capsys):
    from pipelines import nightly

    work = tmp_path / "work"
    with pytest.raises(SystemExit):
        nightly.run(["--demo", "--work_dir", str(work), "--margin_pool_size", "50"])  # demo batch: 200
    assert "--margin_pool_size" in capsys.readouterr().err and not work.exists()


@pytest.mark.parametrize("flag", [["--dry_run", "True"], ["--template_location=gs://b/t.json"]])
def test_nightly_refuses_a_job_that_would_only_be_built(flag, tmp_path):
    from pipelines import nightly

    work = tmp_path / "work"
    with pytest.raises(InputError, match=flag[0].split("=")[0]):
        nightly.run(["--pool", "p.csv", "--model", "m.keras", "--work_dir", str(work), "--batch_size", "10",
                     "--distance_threshold", "0.1", "--runner=DataflowRunner"] + flag)
    assert not work.exists()
