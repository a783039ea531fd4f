"""deploy/: every manifest parses, and what it runs is what cm-nightly and Beam accept.

Not just "it parses": the commands in the Flink Job, the CronJob and the Airflow DAG
are rendered and parsed with cm-nightly's own parser and Beam's PipelineOptions, the
Flex Template metadata is checked against the parser both ways, and the images and
versions agree with the Beam version this package pins.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import types

import apache_beam
import pytest
import yaml
from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions

from pipelines import nightly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
SDK_IMAGE = f"apache/beam_python3.11_sdk:{apache_beam.__version__}"


def load_yaml(*parts):
    with open(os.path.join(DEPLOY, *parts)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert found, f"no {kind} {name or ''}"
    return found[0]


def parse_nightly(argv):
    """cm-nightly's flags and the rest, which must all be Beam pipeline options."""
    args, rest = nightly.build_parser().parse_known_args(argv)
    options = PipelineOptions(rest)
    known = set(options.get_all_options(retain_unknown_options=False))
    for flag in rest:
        name = flag.lstrip("-").split("=", 1)[0]
        assert name in known, f"{flag} is neither a cm-nightly flag nor a Beam option"
    return args, options.get_all_options()


# --- Dataflow --------------------------------------------------------------------

def test_dockerfile_pins_the_beam_version_and_installs_the_package():
    text = open(os.path.join(DEPLOY, "dataflow", "Dockerfile")).read()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == [SDK_IMAGE]  # the workers' Beam must equal the driver's
    setup = open(os.path.join(ROOT, "setup.py")).read()
    pin = re.search(r'"apache-beam[^"]*>=\s*([\d.]+)\s*,\s*<\s*([\d.]+)"', setup)
    assert pin and apache_beam.__version__.startswith(pin.group(1).rsplit(".", 1)[0])
    assert re.search(r'pip install [^\n]*"\.\[cpu\]"', text)
    for src in ("setup.py", "cm_beam", "pipelines"):
        assert re.search(rf"^COPY {src}\b", text, re.M), src
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text  # the SDK harness boot, as Dataflow expects
    py_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", text).group(1)
    assert py_file.endswith("pipelines/nightly.py")


def test_flex_template_metadata_describes_every_cm_nightly_parameter():
    with open(os.path.join(DEPLOY, "dataflow", "metadata.json")) as f:
        meta = json.load(f)
    actions = {a.dest: a for a in nightly.build_parser()._actions if a.dest != "help"}
    params = {p["name"]: p for p in meta["parameters"]}
    assert len(params) == len(meta["parameters"]), "duplicate parameter names"
    assert set(params) == set(actions)
    for name, p in params.items():
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", name)
        assert p["label"] and p["helpText"], name
        action = actions[name]
        assert p["isOptional"] == (name not in {"pool", "model", "work_dir", "batch_size"}), name
        if action.choices:
            (pattern,) = p["regexes"]
            for choice in action.choices:
                assert re.fullmatch(pattern, choice), (name, choice)
            assert not re.fullmatch(pattern, "not-a-choice")
    # Templates pass each parameter once as --name=value: switches and lists must accept that.
    args, _ = parse_nightly(["--work_dir=w", "--recluster=true", "--multilabel=false", "--exclude=a/*.csv,b/*.parquet"])
    assert args.recluster is True and args.multilabel is False


def test_build_and_run_script_is_valid_bash_and_points_at_real_files():
    script = os.path.join(DEPLOY, "dataflow", "build_and_run.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    for path in re.findall(r"(deploy/\S+?\.(?:json|py|sh)|deploy/dataflow/Dockerfile|tests/\S+?\.py)", text):
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert "--sdk_container_image=" in text and "-m pipelines.nightly" in text


# --- Flink -------------------------------------------------------------------------

def test_flink_session_cluster_has_a_worker_pool_sidecar():
    docs = load_yaml("flink", "flink-session-cluster.yaml")
    service = by_kind(docs, "Service", "flink-jobmanager")
    assert {p["port"] for p in service["spec"]["ports"]} >= {6123, 6124, 8081}
    jm = by_kind(docs, "Deployment", "flink-jobmanager")
    assert jm["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items() | jm["spec"]["template"]["metadata"]["labels"].items()
    tm = by_kind(docs, "Deployment", "flink-taskmanager")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in tm["containers"]}
    assert containers["taskmanager"]["args"] == ["taskmanager"]
    sidecar = containers["beam-worker-pool"]
    assert sidecar["args"] == ["--worker_pool"]
    assert 50000 in [p["containerPort"] for p in sidecar["ports"]]
    flink_image = containers["taskmanager"]["image"]
    version = re.match(r"flink:(\d+\.\d+)", flink_image).group(1)
    assert version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    config = yaml.safe_load(by_kind(docs, "ConfigMap", "flink-config")["data"]["config.yaml"])
    assert config["jobmanager.rpc.address"] == "flink-jobmanager" and config["rest.port"] == 8081
    claims = {v["persistentVolumeClaim"]["claimName"] for v in tm["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]}


def test_flink_submit_job_runs_cm_nightly_with_an_external_environment():
    cluster = load_yaml("flink", "flink-session-cluster.yaml")
    (job,) = load_yaml("flink", "submit-nightly-job.yaml")
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "pipelines.nightly"]
    args, beam = parse_nightly(container["args"])
    assert args.pool and args.model and args.work_dir and args.batch_size
    assert beam["runner"] == "FlinkRunner" and beam["environment_type"] == "EXTERNAL"
    assert beam["environment_config"] == "localhost:50000"  # the sidecar, in the TaskManager's pod
    assert beam["flink_master"] == "http://flink-jobmanager:8081"
    tm = by_kind(cluster, "Deployment", "flink-taskmanager")["spec"]["template"]["spec"]
    sidecar = [c for c in tm["containers"] if c["name"] == "beam-worker-pool"][0]
    assert beam["flink_version"] == re.match(r"flink:(\d+\.\d+)", tm["containers"][0]["image"]).group(1)
    assert container["image"] == sidecar["image"]  # driver and workers run the same code
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert args.work_dir.startswith(tuple(mounts)) and any(m["mountPath"] in mounts for m in sidecar["volumeMounts"])


# --- Kubernetes CronJob ------------------------------------------------------------------

def test_cronjob_forbids_overlap_and_runs_cm_nightly():
    docs = load_yaml("k8s", "cronjob.yaml")
    cron = by_kind(docs, "CronJob", "cm-nightly")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields)
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    config = by_kind(docs, "ConfigMap", "cm-nightly-config")["data"]
    assert container["envFrom"][0]["configMapRef"]["name"] == "cm-nightly-config"
    assert container["command"] == ["/bin/sh", "-c"]
    # What the shell runs, with the ConfigMap's values substituted.
    script = container["args"][0]
    rendered = re.sub(r'"?\$(\w+)"?', lambda m: shlex.quote(config[m.group(1)]) if m.group(0).startswith('"')
                      else config[m.group(1)], script)
    argv = shlex.split(rendered)
    assert argv[:4] == ["exec", "python", "-m", "pipelines.nightly"]
    args, beam = parse_nightly(argv[4:])
    assert args.pool == config["POOL"] and args.work_dir == config["WORK_DIR"]
    assert args.batch_size == int(config["BATCH_SIZE"]) and args.exclude == [config["EXCLUDE"]]
    assert beam["runner"] == "FlinkRunner" and beam["environment_type"] == "EXTERNAL"


# --- Airflow -----------------------------------------------------------------------------

class _Vars:
    """`var.value.get(...)` / `var.value.NAME` for rendering the DAG's templates."""

    def __init__(self, values):
        self._values = values

    def get(self, name, default=None):
        return self._values.get(name, default)

    def __getattr__(self, name):
        return self._values[name]


def _stub_airflow(monkeypatch, recorded):
    """A minimal airflow with the two names the DAG file imports, recording what it builds."""

    class DAG:
        def __init__(self, dag_id, **kwargs):
            self.dag_id, self.kwargs, self.tasks = dag_id, kwargs, []
            recorded["dag"] = self

        def __enter__(self):
            recorded["current"] = self
            return self

        def __exit__(self, *exc):
            recorded.pop("current", None)

    class BeamRunPythonPipelineOperator:
        template_fields = ("py_file", "runner", "pipeline_options", "default_pipeline_options", "dataflow_config")

        def __init__(self, *, task_id, **kwargs):
            self.task_id = task_id
            for k, v in kwargs.items():
                setattr(self, k, v)
            recorded["current"].tasks.append(self)

    modules = {
        "airflow": types.ModuleType("airflow"),
        "airflow.sdk": types.ModuleType("airflow.sdk"),
        "airflow.providers": types.ModuleType("airflow.providers"),
        "airflow.providers.apache": types.ModuleType("airflow.providers.apache"),
        "airflow.providers.apache.beam": types.ModuleType("airflow.providers.apache.beam"),
        "airflow.providers.apache.beam.operators": types.ModuleType("airflow.providers.apache.beam.operators"),
        "airflow.providers.apache.beam.operators.beam": types.ModuleType("airflow.providers.apache.beam.operators.beam"),
    }
    modules["airflow.sdk"].DAG = DAG
    modules["airflow.providers.apache.beam.operators.beam"].BeamRunPythonPipelineOperator = BeamRunPythonPipelineOperator
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def _beam_options_to_args(options):
    """The Beam provider's rendering of pipeline_options into flags (same rules)."""
    try:
        from airflow.providers.apache.beam.hooks.beam import beam_options_to_args

        return beam_options_to_args(options)
    except ImportError:
        argv = []
        for k, v in options.items():
            if v is None or v is False:
                continue
            if v is True:
                argv.append(f"--{k}")
            elif isinstance(v, list):
                argv += [f"--{k}={i}" for i in v]
            else:
                argv.append(f"--{k}={v}")
        return argv


def _load_dag(monkeypatch, tmp_path):
    import importlib.util

    path = os.path.join(DEPLOY, "airflow", "cm_nightly_dag.py")
    recorded = {}
    try:
        monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
        import airflow.providers.apache.beam.operators.beam as beam_operators

        # The Beam operator's constructor insists on the Google provider (it is needed
        # only to *execute* with DataflowRunner; a production Airflow has it). It pulls
        # a few hundred MB (ray, litellm, ...) that a test environment should not: stand
        # in for its presence, so the real DAG and operator classes are built.
        if not beam_operators.GOOGLE_PROVIDER:
            monkeypatch.setattr(beam_operators, "GOOGLE_PROVIDER", {"version": "stand-in"})
        mode = "airflow"
    except ImportError:
        _stub_airflow(monkeypatch, recorded)
        mode = "stub"
    spec = importlib.util.spec_from_file_location("cm_nightly_dag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, mode


def _renderer(context):
    """Jinja (Airflow's template engine) when present; else the three forms the DAG uses."""
    try:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        return lambda text: env.from_string(text).render(**context)
    except ImportError:
        values = context["var"].value

        def one(match):
            expr = match.group(1).strip()
            call = re.fullmatch(r"var\.value\.get\('(\w+)',\s*'([^']*)'\)", expr)
            if call:
                return str(values.get(call.group(1), call.group(2)))
            if expr.startswith("var.value."):
                return str(getattr(values, expr[len("var.value."):]))
            return str(context[expr])

        return lambda text: re.sub(r"\{\{(.*?)\}\}", one, text)


@pytest.mark.slow
def test_airflow_dag_loads_and_renders_a_valid_cm_nightly_command(monkeypatch, tmp_path):
    module, mode = _load_dag(monkeypatch, tmp_path)
    dag = module.dag
    assert dag.dag_id == "cm_nightly"
    if mode == "airflow":
        from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

        assert dag.max_active_runs == 1 and dag.catchup is False
        tasks = list(dag.tasks)
        assert len(tasks) == 1 and isinstance(tasks[0], BeamRunPythonPipelineOperator)
        schedule = getattr(dag, "timetable", None)
        assert "0 2 * * *" in (getattr(schedule, "summary", "") + str(getattr(dag, "schedule", "")))
    else:
        assert dag.kwargs["max_active_runs"] == 1 and dag.kwargs["catchup"] is False
        assert dag.kwargs["schedule"] == "0 2 * * *"
        tasks = dag.tasks
        assert len(tasks) == 1
    task = tasks[0]
    assert task.py_file == "pipelines.nightly" and task.py_options == ["-m"]
    for field in ("pipeline_options", "runner", "dataflow_config"):
        assert field in type(task).template_fields  # rendered when the task runs

    values = {"cm_nightly_pool": "gs://b/pool/*.tfrecord", "cm_nightly_model": "gs://b/m.keras",
              "cm_nightly_work_dir": "gs://b/work", "cm_nightly_exclude": "gs://b/labeled/*.parquet",
              "cm_nightly_temp_location": "gs://b/tmp", "cm_nightly_sdk_container_image": "r/cm-beam:1",
              "cm_nightly_project": "p"}
    context = {"var": types.SimpleNamespace(value=_Vars(values)), "ds": "2026-11-21"}
    render_text = _renderer(context)

    def render(value):
        return render_text(value) if isinstance(value, str) else value

    options = {k: render(v) for k, v in task.pipeline_options.items()}
    argv = _beam_options_to_args(options) + [f"--runner={render(task.runner)}"]
    args, beam = parse_nightly(argv)
    assert args.pool == values["cm_nightly_pool"] and args.work_dir == values["cm_nightly_work_dir"]
    assert args.batch_name == "2026-11-21"  # the logical date: a retry resumes the same batch
    assert args.exclude == [values["cm_nightly_exclude"]] and args.batch_size == 100000
    assert beam["runner"] == "DataflowRunner" and beam["sdk_container_image"] == "r/cm-beam:1"
    config = {k: render(v) for k, v in task.dataflow_config.items()}
    assert config["multiple_jobs"] is True and config["project_id"] == "p"
    print(f"DAG loaded with {mode}")
