"""cm-beam: Cluster-Margin batch active learning on Apache Beam."""

from setuptools import find_packages, setup

# The Beam version, written once: the core dependency, the gcp extra and the Dataflow
# worker image (deploy/dataflow/Dockerfile, FROM apache/beam_python3.11_sdk:2.77.0) agree.
BEAM = "apache-beam>=2.77,<2.78"
TENSORFLOW_CPU = "tensorflow-cpu>=2.16,<2.22"
REPORT = ["matplotlib>=3.7"]
DASK = ["dask>=2024.1", "distributed>=2024.1"]
AIRFLOW = ["apache-airflow>=3.0", "apache-airflow-providers-apache-beam>=6.0"]
GCP = [BEAM.replace("apache-beam", "apache-beam[gcp]", 1)]

setup(
    name="cm-beam",
    version="0.1.0",
    description=(
        "Cluster-Margin batch active learning (Citovsky et al., NeurIPS 2021) "
        "as Apache Beam pipelines: embed, cluster, select."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cm_beam", "cm_beam.*", "pipelines", "pipelines.*"]),
    install_requires=[
        BEAM,
        # Bounded like apache-beam 2.77 bounds them (its own requirements), so pip never
        # picks a numpy or pyarrow Beam was not released against.
        "numpy>=1.24,<2.5.0",
        "pyarrow>=14,<26.0.0",
        # The demo pool's drawn images (cm_beam/testing/demo_pool.py).
        "pillow>=9",
    ],
    extras_require={
        # TensorFlow is only needed by the embedding stage.  Pick one flavour:
        # `cpu` for laptops and CPU workers, `gpu` for GPU workers (Dataflow).
        "cpu": [TENSORFLOW_CPU],
        "gpu": ["tensorflow[and-cuda]>=2.16,<2.22"],
        # The nightly job's report (PNG plots; on by default with --demo).
        "report": REPORT,
        # What `make demo` installs: the embedding stage and the report.
        "demo": [TENSORFLOW_CPU, *REPORT],
        # Submitting to Dataflow (and building a job offline with --dry_run=True).
        "gcp": GCP,
        # Beam's DaskRunner against a dask cluster.
        "dask": DASK,
        # The nightly DAG in deploy/airflow.
        "airflow": AIRFLOW,
        "test": [
            TENSORFLOW_CPU,
            *REPORT,
            *GCP,
            *DASK,
            *AIRFLOW,
            "pytest>=7",
            "scipy>=1.10",  # the exact HAC reference
            "fastcluster>=1.2",
            "scikit-learn>=1.3",
            "pyyaml>=6",
            "psutil>=5",  # benchmarks: memory of process trees
            "gcp-storage-emulator>=2024.8",  # tests/test_nightly_gcs.py: a GCS JSON API on loopback
        ],
    },
    entry_points={
        "console_scripts": [
            "cm-select=pipelines.select_batch:main",
            "cm-cluster=pipelines.build_clusters:main",
            "cm-embed=pipelines.embed_pool:main",
            "cm-nightly=pipelines.nightly:main",
        ]
    },
)
