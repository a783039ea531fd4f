"""The same nightly job on three engines gives the same batch.

One small demo pool, model and seed; the whole cm-nightly job (embed with
TensorFlow, cluster, select) runs on

1. the FnApiRunner with 2 worker processes (the DirectRunner's engine);
2. the DaskRunner against a `dask scheduler` and `dask worker --nworkers 2`
   processes this test starts on 127.0.0.1 and stops (`--runner=DaskRunner`);
3. the PortableRunner with an embedded job service (`--job_endpoint=embed`) and an
   EXTERNAL environment: a `worker_pool_main` process this test starts, which forks
   the SDK workers that run the stages' code.

Each later run must produce the first run's batch row for row (example_id,
cluster_id, round, rank), and leave evidence that the work ran on that engine
(tasks processed by the dask scheduler; SDK workers started by the pool).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cm_beam.io import artifacts
from cm_beam.testing import demo_pool
from cm_beam.io import table_io
from cm_beam.nightly import work_dir as nw
from cm_beam.runtime import runner as cm_runner
from pipelines import nightly

# Whole nightly jobs on Dask, portable and multi-process runners.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
POOL_SIZE = 120
BATCH = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env():
    """The project's environment first on PATH (worker_pool_main forks `python` from PATH)."""
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def start(argv, log_path):
    log = open(log_path, "wb")
    # Own process group: stopping it stops the processes this one forked (dask's
    # worker processes, the pool's SDK workers), and nothing else.
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                            start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for_port(port, proc, log_path, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited early:\n{open(log_path).read()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = tmp_path_factory.mktemp("runners")
    demo = demo_pool.make_demo_inputs(str(base / "demo"), POOL_SIZE, seed=11, seed_set_size=40, epochs=10)

    def run(name, beam_flags):
        summary = nightly.run([
            "--pool", demo["pool"], "--model", demo["model"], "--pool_format", "manifest", "--image_size", "32",
            "--work_dir", str(base / name), "--batch_size", str(BATCH), "--exclude", demo["labeled"],
            "--distance_threshold", "0.05", "--seed", "5", "--batch_name", "night"] + beam_flags)
        assert summary["status"] == "complete"
        assert all(s["status"] == "ran" for s in summary["stages"].values())
        table = table_io.read_table(nw.selection_glob(summary["batch_dir"])).sort_by("rank")
        rows = list(zip(*(table.column(c).to_pylist() for c in ("example_id", "cluster_id", "round", "rank"))))
        return summary, rows

    return {"base": base, "demo": demo, "run": run}


@pytest.fixture(scope="module")
def direct_two_workers(job):
    summary, rows = job["run"]("direct", ["--runner=FnApiRunner", "--direct_num_workers=2",
                                          "--direct_running_mode=multi_processing"])
    return summary, rows


def test_direct_runner_with_two_worker_processes(direct_two_workers, job):
    summary, rows = direct_two_workers
    assert len(rows) == BATCH and [r[3] for r in rows] == list(range(BATCH))
    labeled = set(open(job["demo"]["labeled"]).read().split()[1:])
    assert not {r[0] for r in rows} & labeled
    assert summary["counts"]["pool"] == POOL_SIZE


def test_dask_runner_on_a_local_dask_cluster(direct_two_workers, job, tmp_path):
    distributed = pytest.importorskip("distributed")
    base, port = job["base"], free_port()
    scheduler = start([os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                       "--no-dashboard"], base / "dask-scheduler.log")
    workers = None
    try:
        wait_for_port(port, scheduler, base / "dask-scheduler.log")
        workers = start([os.path.join(BIN, "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2",
                         "--nthreads", "2", "--no-dashboard", "--host", "127.0.0.1"], base / "dask-workers.log")
        with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            worker_pids = set(client.run(os.getpid).values())
            before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
            summary, rows = job["run"]("dask", ["--runner=DaskRunner", f"--dask_client_address=127.0.0.1:{port}"])
            after = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
            tagged_outputs_and_two_sinks(port, tmp_path)
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids
        assert after - before > 100  # the three jobs' tasks went through the scheduler to the workers
        assert rows == direct_two_workers[1]
        assert summary["counts"] == direct_two_workers[0]["counts"]
    finally:
        if workers is not None:
            stop(workers)
        stop(scheduler)


def tagged_outputs_and_two_sinks(port, tmp_path):
    """What Beam 2.77's DaskRunner gets wrong and cm_beam.runtime.dask_runner fixes, checked directly.

    A ParDo with a tagged output, each output to its own sink, a side input and a
    GroupByKey: every element must reach exactly its own sink.
    """
    import apache_beam as beam

    class Split(beam.DoFn):
        def process(self, x):
            yield beam.pvalue.TaggedOutput("three", x) if x % 3 == 0 else x

    out = str(tmp_path / "dask-check")
    p = beam.Pipeline(options=cm_runner.pipeline_options(
        ["--runner=cm_beam.runtime.dask_runner.DaskRunner", f"--dask_client_address=127.0.0.1:{port}"]))
    numbers = p | beam.Create(list(range(60)))
    total = numbers | beam.CombineGlobally(sum)
    parts = numbers | beam.ParDo(Split()).with_outputs("three", main="rest")
    (parts.rest | "WithTotal" >> beam.Map(lambda x, t: f"{x} {t}", t=beam.pvalue.AsSingleton(total))
     | "WriteRest" >> beam.io.WriteToText(out + "/rest"))
    (parts.three | beam.Map(lambda x: (x % 2, x)) | beam.GroupByKey()
     | beam.MapTuple(lambda k, v: f"{k} {sorted(v)}") | "WriteThree" >> beam.io.WriteToText(out + "/three"))
    assert p.run().wait_until_finish() == "DONE"
    rest = sorted(line for f in sorted(os.listdir(out)) if f.startswith("rest") for line in open(os.path.join(out, f)))
    three = sorted(line.strip() for f in sorted(os.listdir(out)) if f.startswith("three") for line in open(os.path.join(out, f)))
    assert rest == sorted(f"{x} 1770\n" for x in range(60) if x % 3)
    assert three == [f"0 {list(range(0, 60, 6))}", f"1 {list(range(3, 60, 6))}"]
    assert not [f for f in os.listdir(out) if f.startswith("beam-temp")]  # each sink finalised once


def test_portable_runner_with_an_external_worker_pool(direct_two_workers, job):
    base, port = job["base"], free_port()
    log = base / "worker-pool.log"
    pool = start([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"], log)
    try:
        wait_for_port(port, pool, log)
        summary, rows = job["run"]("portable", ["--runner=PortableRunner", "--job_endpoint=embed",
                                                "--environment_type=EXTERNAL", f"--environment_config=localhost:{port}"])
    finally:
        stop(pool)
    started = open(log).read().count("Starting worker")
    assert started >= 3  # one SDK worker per stage job at least, forked by the external pool
    assert rows == direct_two_workers[1]
    assert summary["counts"] == direct_two_workers[0]["counts"]
    assert artifacts.read_manifest(summary["batch_dir"])["stage"] == "select"
