"""`run_select`: the selection stage (cm-select) as one Beam job, from `SelectOptions`.

Reads the scores, clusters and exclusion lists named by the options, runs
`SelectBatch`, and writes to `options.output_dir`: `selection-*.parquet`
(example_id, cluster_id, margin, round, rank), `rejected-*.parquet` (scores rows
that are not valid, with a reason) and `manifest.json` last. Everything that can be
wrong with the inputs (columns, types, a non-empty output directory) fails before
the job starts, naming the parameter.

    from cm_beam.selection.options import SelectOptions
    from cm_beam.selection.stage import run_select

    manifest = run_select(SelectOptions(scores=..., clusters=..., batch_size=100, output_dir=...),
                          ["--runner=FnApiRunner", "--direct_num_workers=2"])
"""

from __future__ import annotations

import logging
import math
import time
from typing import Dict, List, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from cm_beam.errors import InputError
from cm_beam.io import artifacts
from cm_beam.io import table_io
from cm_beam.runtime import runner as cm_runner
from cm_beam.selection.options import SelectOptions
from cm_beam.selection.select_batch import REJECTED_SCHEMA, SELECTION_SCHEMA, SelectBatch

_LOG = logging.getLogger("cm_beam.selection.select_batch")
STATS_NAME = "_stats.json"
ROWS_PER_JOIN_BUCKET = 200_000
OUTPUTS = {"selection": SELECTION_SCHEMA, "rejected": REJECTED_SCHEMA}


class ScoreSource(NamedTuple):
    """Where the scores come from: the uncertainty's own column (`score_column`), or
    computed from `probs` (score_column None, with `num_classes` classes)."""

    score_column: Optional[str]
    num_classes: Optional[int]

    @property
    def read_column(self) -> str:
        return self.score_column or "probs"


def score_source(files: List[table_io.InputFile], uncertainty: str) -> ScoreSource:
    """Which column the scores come from: the uncertainty's own column, else probs."""
    if all(uncertainty in f.columns for f in files):
        table_io.check_columns(files, "--scores", {uncertainty: "float"})
        return ScoreSource(uncertainty, None)
    if all("probs" in f.columns for f in files):
        table_io.check_columns(files, "--scores", {"probs": "vector"})
        first = next((f for f in files if f.num_rows), None)
        num_classes = None
        if first is not None:
            table = table_io.read_table(first.path, "--scores", columns=["probs"]).slice(0, 1)
            num_classes = len(table.column("probs")[0].as_py() or [])
        return ScoreSource(None, num_classes or 1)
    bad = next((f for f in files if uncertainty not in f.columns and "probs" not in f.columns), files[0])
    raise InputError(
        f"--scores: {bad.path} has neither column '{uncertainty}' nor 'probs' "
        f"(columns: {', '.join(bad.columns)}); all files must carry the same one")


class _WriteStatsFn(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, stats):
        artifacts.write_json(self._path, stats)


def run_select(options: SelectOptions, beam_options: cm_runner.BeamOptions = None) -> Dict:
    """Runs the selection stage; returns the manifest it wrote (last) to options.output_dir."""
    start = time.time()
    # Everything that can fail on bad input is checked before any work is done.
    score_files = table_io.inspect_inputs([options.scores], "--scores", {"example_id": "id"})
    source = score_source(score_files, options.uncertainty)
    cluster_files = (table_io.inspect_inputs([options.clusters], "--clusters", {"example_id": "id", "cluster_id": "int"})
                     if options.clusters else [])
    exclude_files = (table_io.inspect_inputs(list(options.exclude), "--exclude", {"example_id": "id"})
                     if options.exclude else [])
    pool_rows = sum(f.num_rows for f in score_files)
    join_buckets = int(min(4096, max(1, math.ceil(pool_rows / ROWS_PER_JOIN_BUCKET))))
    transform = SelectBatch.from_options(options, score_column=source.score_column, num_classes=source.num_classes,
                                         num_join_buckets=join_buckets)
    pipeline_options, _ = cm_runner.as_pipeline_options(beam_options)
    artifacts.prepare_output_dir(options.output_dir, options.overwrite)
    stats_path = artifacts.join(options.output_dir, STATS_NAME)

    pipeline = beam.Pipeline(options=pipeline_options)
    inputs = {"scores": pipeline | "ReadScores" >> table_io.ReadTableBlocks(
        score_files, ["example_id", source.read_column])}
    if cluster_files:
        inputs["clusters"] = pipeline | "ReadClusters" >> table_io.ReadTableBlocks(cluster_files, ["example_id", "cluster_id"])
    if exclude_files:
        inputs["exclude"] = pipeline | "ReadExclusions" >> table_io.ReadTableBlocks(exclude_files, ["example_id"])
    result = inputs | "SelectBatch" >> transform
    for name, schema in OUTPUTS.items():
        result[name] | f"Write{name.title()}" >> table_io.WriteBlockFiles(artifacts.join(options.output_dir, name), schema)
    result["stats"] | "WriteStats" >> beam.ParDo(_WriteStatsFn(stats_path))
    _LOG.info("cm-select: %d scores rows in %d files; selecting %d (%s)", pool_rows, len(score_files),
              options.batch_size, options.strategy)
    pipeline_seconds = cm_runner.run_pipeline(pipeline, "cm-select")

    for name, schema in OUTPUTS.items():
        table_io.ensure_output_file(artifacts.join(options.output_dir, name), schema)
    stats = artifacts.read_json(stats_path)
    FileSystems.delete([stats_path])
    manifest = {
        "stage": "select",
        "parameters": {
            "scores": options.scores, "clusters": options.clusters, "exclude": list(options.exclude),
            "uncertainty": options.uncertainty, "multilabel": options.multilabel,
            "multilabel_reduce": options.multilabel_reduce,
            "batch_size": options.batch_size, "margin_pool_size": transform.margin_pool_size,
            "margin_pool_factor": options.margin_pool_factor, "strategy": options.strategy, "seed": options.seed,
            "score_source": source.read_column,
        },
        "counts": stats["counts"],
        "rounds": stats["rounds"],
        "candidate_cluster_size_histogram": stats["candidate_cluster_size_histogram"],
        "batch_smaller_than_requested": stats["batch_smaller_than_requested"],
        "batch_diagnostics": stats["batch_diagnostics"],
        "notes": (["batch_size exceeds the candidates: all candidates were selected"]
                  if stats["batch_smaller_than_requested"] else []),
        "outputs": {"selection": "selection-*.parquet", "rejected": "rejected-*.parquet"},
        "timings": {"pipeline_seconds": round(pipeline_seconds, 3), "wall_seconds": round(time.time() - start, 3)},
    }
    artifacts.write_manifest(options.output_dir, manifest)
    return manifest
