"""The batch report: PNG plots a person looks at before sending a batch to labelers.

`write_report(out_dir, embeddings=..., clusters=..., selection=...)` writes

* `margin_distribution.png`: the pool's margins and the batch's (density
  histograms): a Cluster-Margin batch sits in the low-margin (uncertain) end;
* `cluster_sizes.png`: how many clusters of each size the clustering has (log-log),
  and the sizes of the clusters the batch drew from;
* `class_mix.png`: the share of each predicted class in the pool and in the batch
  (and, when true labels are given as in the demo, the batch's true classes);
* `report.json`: the numbers behind the plots, and cm-select's `batch_diagnostics`
  (picks per pass, share from clusters of size 1 in M, median uncertainty rank,
  clusters touched and with more than one pick) from the batch's manifest.

The artifacts are read one file at a time, column by column, and reduced to
histograms as they are read, so memory is bounded by one file plus the batch's
ids (the batch is the only set held whole). Matplotlib runs with the Agg backend
(no display).
"""

from __future__ import annotations

import io
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from cm_beam.io import artifacts
from cm_beam.io import table_io

MARGIN_BINS = np.linspace(0.0, 1.0, 41)


def _read(path: str, columns: List[str]) -> pa.Table:
    with FileSystems.open(path) as f:
        schema = pq.read_schema(f)
    with FileSystems.open(path) as f:
        present = [c for c in columns if c in schema.names]
        table = pq.read_table(f, columns=present)
    if "example_id" in table.column_names and not pa.types.is_string(table.schema.field("example_id").type):
        table = table.set_column(table.column_names.index("example_id"), "example_id", table.column("example_id").cast(pa.string()))
    return table


def _files(pattern: str, flag: str) -> List[str]:
    return table_io.expand_glob(pattern, flag)


def collect(embeddings: str, clusters: str, selection: str, labels: Optional[str] = None) -> Dict:
    """The report's numbers, from the three artifacts' globs (and a labels CSV)."""
    batch = pa.concat_tables([_read(p, ["example_id", "margin", "cluster_id"]) for p in _files(selection, "selection")])
    batch_ids = batch.column("example_id").combine_chunks()
    pool_margin = np.zeros(len(MARGIN_BINS) - 1, np.int64)
    pool_classes: Dict[int, int] = {}
    batch_classes: Dict[int, int] = {}
    pool_rows = 0
    for path in _files(embeddings, "embeddings"):
        table = _read(path, ["example_id", "margin", "predicted_class"])
        pool_rows += table.num_rows
        margin = table.column("margin").to_numpy(zero_copy_only=False)
        pool_margin += np.histogram(np.clip(margin, 0.0, 1.0), MARGIN_BINS)[0]
        if "predicted_class" in table.column_names:
            classes = table.column("predicted_class").to_numpy(zero_copy_only=False)
            for c, n in zip(*np.unique(classes, return_counts=True)):
                pool_classes[int(c)] = pool_classes.get(int(c), 0) + int(n)
            in_batch = pc.is_in(table.column("example_id"), value_set=batch_ids).to_numpy(zero_copy_only=False)
            for c, n in zip(*np.unique(classes[in_batch], return_counts=True)):
                batch_classes[int(c)] = batch_classes.get(int(c), 0) + int(n)
    batch_margin = np.histogram(np.clip(batch.column("margin").to_numpy(zero_copy_only=False), 0.0, 1.0), MARGIN_BINS)[0]

    # Clusters per size: with cluster_size, rows of size s / s; otherwise count ids.
    sizes_by_cluster: Dict[int, int] = {}
    rows_by_size: Dict[int, int] = {}
    clustered_rows = 0
    for path in _files(clusters, "clusters"):
        table = _read(path, ["cluster_id", "cluster_size"])
        clustered_rows += table.num_rows
        if "cluster_size" in table.column_names:
            for s, n in zip(*np.unique(table.column("cluster_size").to_numpy(zero_copy_only=False), return_counts=True)):
                rows_by_size[int(s)] = rows_by_size.get(int(s), 0) + int(n)
        else:
            for c, n in zip(*np.unique(table.column("cluster_id").to_numpy(zero_copy_only=False), return_counts=True)):
                sizes_by_cluster[int(c)] = sizes_by_cluster.get(int(c), 0) + int(n)
    if sizes_by_cluster:
        for s in sizes_by_cluster.values():
            rows_by_size[s] = rows_by_size.get(s, 0) + s
    clusters_by_size = {s: n // s for s, n in sorted(rows_by_size.items()) if s > 0}
    batch_cluster_ids = batch.column("cluster_id").to_numpy(zero_copy_only=False)
    batch_clusters, picks_per_cluster = np.unique(batch_cluster_ids, return_counts=True)

    numbers = {
        "pool_rows": pool_rows,
        "batch_rows": batch.num_rows,
        "margin_bins": MARGIN_BINS.tolist(),
        "pool_margin_hist": pool_margin.tolist(),
        "batch_margin_hist": batch_margin.tolist(),
        "clustered_rows": clustered_rows,
        "clusters_by_size": {str(k): v for k, v in clusters_by_size.items()},
        "num_clusters": int(sum(clusters_by_size.values())),
        "batch_clusters": int(batch_clusters.size),
        "batch_unclustered": int((batch_cluster_ids < 0).sum()),
        "batch_max_picks_per_cluster": int(picks_per_cluster.max()) if picks_per_cluster.size else 0,
        "pool_predicted_classes": {str(k): v for k, v in sorted(pool_classes.items())},
        "batch_predicted_classes": {str(k): v for k, v in sorted(batch_classes.items())},
    }
    numbers["batch_diagnostics"] = _batch_diagnostics(selection)
    if labels:
        import csv

        wanted = set(batch_ids.to_pylist())
        true_classes: Dict[int, int] = {}
        with FileSystems.open(labels) as f:
            for row in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")):
                if row["example_id"] in wanted:
                    true_classes[int(row["label"])] = true_classes.get(int(row["label"]), 0) + 1
        numbers["batch_true_classes"] = {str(k): v for k, v in sorted(true_classes.items())}
    return numbers


def _batch_diagnostics(selection: str) -> Optional[Dict]:
    """cm-select's batch_diagnostics, from the manifest beside the selection files (None if absent)."""
    directory = selection.rsplit("/", 1)[0] if "/" in selection else "."
    manifest = artifacts.read_manifest(directory)
    return (manifest or {}).get("batch_diagnostics")


def _save(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with FileSystems.create(path) as f:
        f.write(buffer.getvalue())


def plot(numbers: Dict, out_dir: str, class_names: Optional[List[str]] = None) -> List[str]:
    """Writes the three PNGs into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    bins = np.asarray(numbers["margin_bins"])
    centers, width = (bins[:-1] + bins[1:]) / 2, np.diff(bins)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, label, color in (("pool_margin_hist", f"pool ({numbers['pool_rows']})", "#999999"),
                              ("batch_margin_hist", f"batch ({numbers['batch_rows']})", "#d62728")):
        hist = np.asarray(numbers[key], float)
        density = hist / max(hist.sum(), 1) / width
        ax.bar(centers, density, width=width, alpha=0.55, label=label, color=color, edgecolor="none")
    ax.set_xlabel("margin p(top1) - p(top2)  (small = uncertain)")
    ax.set_ylabel("density")
    ax.set_title("Margin distribution: pool vs batch")
    ax.legend()
    paths.append(artifacts.join(out_dir, "margin_distribution.png"))
    _save(fig, paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sizes = np.array([int(s) for s in numbers["clusters_by_size"]], int)
    counts = np.array(list(numbers["clusters_by_size"].values()), int)
    if sizes.size:
        ax.scatter(sizes, counts, s=14, color="#1f77b4")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("cluster size (examples)")
    ax.set_ylabel("number of clusters")
    ax.set_title(f"Cluster sizes: {numbers['num_clusters']} clusters over {numbers['clustered_rows']} examples\n"
                 f"batch drew from {numbers['batch_clusters']} clusters, at most "
                 f"{numbers['batch_max_picks_per_cluster']} per cluster", fontsize=10)
    paths.append(artifacts.join(out_dir, "cluster_sizes.png"))
    _save(fig, paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    series = [("pool, predicted", numbers["pool_predicted_classes"], "#999999"),
              ("batch, predicted", numbers["batch_predicted_classes"], "#d62728")]
    if "batch_true_classes" in numbers:
        series.append(("batch, true class", numbers["batch_true_classes"], "#2ca02c"))
    classes = sorted({int(k) for _, d, _ in series for k in d})
    x = np.arange(len(classes))
    w = 0.8 / len(series)
    for i, (label, counts_by_class, color) in enumerate(series):
        total = max(sum(counts_by_class.values()), 1)
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [counts_by_class.get(str(c), 0) / total for c in classes],
               width=w, label=label, color=color)
    names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in classes]
    ax.set_xticks(x, names)
    ax.set_ylabel("share")
    ax.set_title("Class mix: the batch against the pool")
    ax.legend(fontsize=8)
    paths.append(artifacts.join(out_dir, "class_mix.png"))
    _save(fig, paths[-1])
    plt.close(fig)
    return paths


def write_report(out_dir: str, embeddings: str, clusters: str, selection: str, labels: Optional[str] = None,
                 class_names: Optional[List[str]] = None, stamp: Optional[Dict] = None) -> Dict:
    """Collects the numbers, writes the plots and report.json into `out_dir`.

    `stamp` (e.g. the batch's name and manifest sha256) is copied into report.json,
    so a reader can tell which batch the report describes.
    """
    if labels and class_names is None:
        from cm_beam.testing.demo_pool import CLASSES

        class_names = list(CLASSES)
    numbers = collect(embeddings, clusters, selection, labels)
    if not FileSystems.exists(out_dir):
        FileSystems.mkdirs(out_dir)
    plots = plot(numbers, out_dir, class_names)
    artifacts.write_json(artifacts.join(out_dir, "report.json"), {**numbers, **(stamp or {})})
    return {"plots": plots, "numbers": artifacts.join(out_dir, "report.json")}
