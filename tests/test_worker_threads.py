"""Local worker processes get cores // workers BLAS threads, for the run only; user values win."""

import json
import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from cm_beam.runtime import runner as cm_runner
from cm_beam.runtime import worker_threads as wt
from tests.conftest import beam_args


def _options(*flags):
    return cm_runner.pipeline_options(list(flags))


def test_threads_per_worker_only_for_local_worker_processes():
    cores = wt.available_cores()
    assert wt.threads_per_worker(_options()) is None  # in-process FnApiRunner
    assert wt.threads_per_worker(_options("--direct_num_workers=2")) is None  # multi_threading: one process
    two = _options("--direct_num_workers=2", "--direct_running_mode=multi_processing")
    assert wt.threads_per_worker(two) == max(1, cores // 2)
    many = _options(f"--direct_num_workers={4 * cores}", "--direct_running_mode=multi_processing")
    assert wt.threads_per_worker(many) == 1
    remote = PipelineOptions(["--runner=DataflowRunner", "--direct_running_mode=multi_processing",
                              "--direct_num_workers=2"])
    assert wt.threads_per_worker(remote) is None


def _blas_threads_in_workers(out_dir):
    def report(_, path):
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        with open(os.path.join(path, f"{os.getpid()}.json"), "w") as f:
            json.dump({"blas": blas, "env": os.environ.get("OPENBLAS_NUM_THREADS")}, f)

    pipeline = beam.Pipeline(options=cm_runner.pipeline_options(beam_args(2)))
    (pipeline | beam.Create(range(8)) | beam.Reshuffle() | beam.Map(report, str(out_dir)))
    cm_runner.run_pipeline(pipeline, "probe")
    return [json.load(open(os.path.join(out_dir, f))) for f in os.listdir(out_dir)]


@pytest.mark.slow
def test_worker_processes_get_their_share_and_the_environment_is_restored(tmp_path, monkeypatch):
    for name in wt.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    reports = _blas_threads_in_workers(tmp_path)
    want = max(1, wt.available_cores() // 2)
    assert reports and all(r["env"] == str(want) and r["blas"] and set(r["blas"]) == {want} for r in reports)
    assert all(name not in os.environ for name in wt.THREAD_VARIABLES)  # only for the run


@pytest.mark.slow
def test_a_value_the_user_set_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    reports = _blas_threads_in_workers(tmp_path)
    assert reports and all(r["env"] == "3" for r in reports)
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
