"""Shared test fixtures: Beam options pinned to the FnApiRunner (offline, deterministic)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def beam_args(workers: int = 1):
    """Pipeline flags for the FnApiRunner with `workers` worker processes."""
    args = ["--runner=FnApiRunner"]
    if workers > 1:
        args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return args


DATAFLOW_IMAGE = "us-central1-docker.pkg.dev/cm-beam-dry-run/cm-beam/cm-beam:test"
# Flags that make a stage translate its job for Dataflow without running it.
DATAFLOW_DRY_RUN = [
    "--runner=DataflowRunner", "--dry_run=True", "--project=cm-beam-dry-run", "--region=us-central1",
    "--temp_location=gs://cm-beam-dry-run/tmp", f"--sdk_container_image={DATAFLOW_IMAGE}", "--sdk_location=container",
]


@pytest.fixture
def fnapi_args():
    return beam_args(1)


# --- Shared data builders ------------------------------------------------------------

def gaussian_blobs(n: int, d: int, k: int, spread: float = 0.35, seed: int = 0):
    """n points around k standard-normal centres in d dimensions (float64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    return centers[rng.integers(0, k, n)] + spread * rng.normal(size=(n, d))


def write_embeddings(directory, x, ids, files=3, row_group=256, fixed=False):
    """cm-cluster input: Parquet files of (example_id, embedding) split into `files`
    files of `row_group`-row groups; `fixed` keeps fixed-size lists. Returns the glob."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for f in range(files):
        sl = slice(bounds[f], bounds[f + 1])
        values = pa.array(x[sl].ravel(), pa.float32())
        emb = pa.FixedSizeListArray.from_arrays(values, x.shape[1])
        if not fixed:
            emb = emb.cast(pa.list_(pa.float32()))
        pq.write_table(pa.table({"example_id": ids[sl], "embedding": emb}),
                       os.path.join(directory, f"part-{f}.parquet"), row_group_size=row_group)
    return os.path.join(directory, "*.parquet")


def write_selection_inputs(tmp_path, n=3000, num_clusters=500, seed=0, exclude_fraction=0.1, shards=3):
    """cm-select input: sharded scores and clusters of a synthetic pool (margins with 2
    decimals, so many exact ties) and two exclusion lists (Parquet and CSV), with the
    maps a reference implementation needs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cm_beam.testing.synthetic_pool import make_pool, write_sharded

    tables = make_pool(n, num_clusters, seed=seed, margin_decimals=2)  # 2 decimals: many exact ties
    d = tmp_path / "pool"
    scores = write_sharded(tables["scores"], str(d), "scores", num_shards=shards, row_group_size=700)
    clusters = write_sharded(tables["clusters"], str(d), "clusters", num_shards=2, row_group_size=900)
    rng = np.random.default_rng(seed + 100)
    ids = tables["scores"].column("example_id").to_pylist()
    excluded = sorted(rng.choice(ids, int(n * exclude_fraction), replace=False).tolist())
    half = len(excluded) // 2
    pq.write_table(pa.table({"example_id": excluded[:half]}), str(d / "labeled.parquet"))
    (d / "queued.csv").write_text("example_id\n" + "\n".join(excluded[half:]) + "\n")
    return {
        "scores": scores, "clusters": clusters,
        "exclude": [str(d / "labeled.parquet"), str(d / "queued.csv")],
        "score_map": dict(zip(ids, tables["scores"].column("margin").to_pylist())),
        "cluster_map": dict(zip(tables["clusters"].column("example_id").to_pylist(),
                                tables["clusters"].column("cluster_id").to_pylist())),
        "excluded": excluded,
    }


def keras_trunk(size, *, scale, offset=0.0, filters, emb_units, emb_activation):
    """The small image trunk of the test models: (inputs, embedding tensor).

    Input `image` (size x size x 3) -> Rescaling -> Conv2D `conv` -> global average
    pooling `pool` -> Dense `emb`. Layers are created in this order, so under the same
    `keras.utils.set_random_seed` the weights are the same wherever it is called.
    """
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(scale, offset=offset)(inputs)
    x = keras.layers.Conv2D(filters, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(emb_units, activation=emb_activation, name="emb")(x)
    return inputs, x
