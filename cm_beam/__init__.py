"""cm-beam: Cluster-Margin batch active learning as Apache Beam pipelines.

One subpackage per stage, each a PTransform here and a command in `pipelines/`:

* `embedding` (`cm-embed`): images -> embedding, margin, predicted class
  (`EmbedAndScore`, over RunInference with `KerasModelHandler`).
* `clustering` (`cm-cluster`): embeddings -> average-linkage HAC clusters at a distance
  threshold, through a sharded kNN graph and reciprocal-nearest-neighbour rounds
  (`BuildClusters`; `CutHierarchy` re-cuts a recorded hierarchy).
* `selection` (`cm-select`): scores + clusters + exclusions -> the next labeling batch,
  by Cluster-Margin's round-robin over clusters of the most uncertain examples
  (`SelectBatch`).

Around them: `io` (tables and manifests), `runtime` (runners, threads, malloc),
`nightly` (the work dir, lease and report of `cm-nightly`) and `testing` (demo and
synthetic pools). `errors.InputError` is the one error type for bad input; it names
the parameter at fault (`--name`, the command's flag of the same name).

Each stage also has one frozen options type, validated when built, and a function
that runs the stage from it as one Beam job (what the commands call):

    from cm_beam import SelectOptions, run_select

    manifest = run_select(SelectOptions(scores="s/*.parquet", clusters="c/*.parquet",
                                        batch_size=100, output_dir="batch"),
                          ["--runner=FnApiRunner"])

Modules whose names end in `kernels` (and `selection.uncertainty`, `hashing`,
`array_ops`) are pure numpy: they import no Beam and hold all of the math; the Beam
modules only arrange them. The exports below are imported lazily, so `import cm_beam`
alone does not import Beam or TensorFlow.

    import apache_beam as beam
    from cm_beam import SelectBatch

    with beam.Pipeline() as p:
        ...  # see each transform's docstring
"""

import importlib as _importlib

__version__ = "0.1.0"

_EXPORTS = {
    "EmbedAndScore": "cm_beam.embedding.embed_pool",
    "KerasModelHandler": "cm_beam.embedding.keras_model_handler",
    "BuildClusters": "cm_beam.clustering.build_clusters",
    "CutHierarchy": "cm_beam.clustering.hierarchy",
    "SelectBatch": "cm_beam.selection.select_batch",
    "EmbedOptions": "cm_beam.embedding.options",
    "ClusterOptions": "cm_beam.clustering.options",
    "SelectOptions": "cm_beam.selection.options",
    "run_embed": "cm_beam.embedding.stage",
    "run_select": "cm_beam.selection.stage",
    "InputError": "cm_beam.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(_importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
