"""cm-beam: Cluster-Margin batch active learning as Apache Beam pipelines.

Stages (each a PTransform in this package and a command in `pipelines/`):

* embed + score (`cm-embed`): images -> embedding, margin, predicted class.
* cluster (`cm-cluster`): embeddings -> average-linkage HAC clusters at a distance
  threshold, through a sharded kNN graph and reciprocal-nearest-neighbour rounds.
* select (`cm-select`): scores + clusters + exclusions -> the next labeling batch,
  by Cluster-Margin's round-robin over clusters of the most uncertain examples.

Modules whose names end in `_kernels` (and `uncertainty`, `hashing`) are pure numpy:
they import no Beam and hold all of the math; the Beam modules only arrange them.
"""

__version__ = "0.1.0"
