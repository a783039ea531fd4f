"""Airflow DAG: the nightly Cluster-Margin labeling batch (`cm-nightly`).

One task runs `python -m pipelines.nightly` through the Apache Beam provider's
BeamRunPythonPipelineOperator. cm-nightly is a driver: it submits one Beam job per
stage (embed, cluster when needed, select) to the runner and waits for each, so the
task succeeds exactly when the batch is complete. The batch is named by the run's
logical date (`{{ ds }}`): a retried or cleared task resumes the same batch (stages
that finished are reused from their manifests) and yields the same examples.

Settings are Airflow Variables (Admin -> Variables), read when the task runs:

    cm_nightly_pool, cm_nightly_model, cm_nightly_work_dir, cm_nightly_exclude,
    cm_nightly_batch_size (default 100000), cm_nightly_runner (DataflowRunner),
    cm_nightly_project, cm_nightly_region, cm_nightly_temp_location,
    cm_nightly_sdk_container_image. The worker's `python3` must have cm-beam installed.

Requirements on the Airflow side: apache-airflow-providers-apache-beam and
apache-airflow-providers-google (the Beam operator refuses to be built without it,
whatever the runner; it monitors the Dataflow jobs through `google_cloud_default`).
Cloud Composer ships both.

Drop this file into the DAGs folder. Airflow 3 (airflow.sdk) and Airflow 2.x both load it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

DAG_ID = "cm_nightly"
SCHEDULE = "0 2 * * *"  # 02:00 UTC, after the day's labels are exported


def _var(name: str, default: str | None = None) -> str:
    """A Jinja reference to an Airflow Variable, rendered when the task runs (not at parse time)."""
    if default is None:
        return "{{ var.value.cm_nightly_%s }}" % name
    return "{{ var.value.get('cm_nightly_%s', '%s') }}" % (name, default)


# cm-nightly's own flags, then the Beam/Dataflow options (Beam ignores the first set,
# cm-nightly passes the second to every stage's job).
PIPELINE_OPTIONS = {
    "pool": _var("pool"),
    "model": _var("model"),
    "work_dir": _var("work_dir"),
    "exclude": _var("exclude"),
    "batch_size": _var("batch_size", "100000"),
    "margin_pool_factor": _var("margin_pool_factor", "10"),
    "batch_name": "{{ ds }}",
    "temp_location": _var("temp_location"),
    "sdk_container_image": _var("sdk_container_image"),
    "sdk_location": "container",
}

with DAG(
    dag_id=DAG_ID,
    description="Cluster-Margin nightly labeling batch: embed, cluster (once), select",
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # One run at a time: two drivers must never write the same work dir.
    max_active_runs=1,
    default_args={
        "owner": "ml-data",
        "retries": 2,
        "retry_delay": timedelta(minutes=15),
        "execution_timeout": timedelta(hours=12),
    },
    tags=["cm-beam", "active-learning"],
) as dag:
    nightly = BeamRunPythonPipelineOperator(
        task_id="cm_nightly",
        py_file="pipelines.nightly",
        py_options=["-m"],
        # Not a templated field: the interpreter of the Airflow worker's environment
        # that has cm-beam installed (pip install cm-beam[cpu]).
        py_interpreter="python3",
        runner=_var("runner", "DataflowRunner"),
        pipeline_options=PIPELINE_OPTIONS,
        dataflow_config={
            "job_name": "cm-nightly",
            "project_id": _var("project"),
            "location": _var("region", "us-central1"),
            # cm-nightly submits one job per stage (<job_name>-embed, -cluster, -select).
            "multiple_jobs": True,
            "wait_until_finished": True,
        },
    )
