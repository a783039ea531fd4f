"""`SelectOptions`: every parameter of the selection stage (cm-select), validated here.

The options are frozen and check themselves when built, so a bad value fails before
any input is read, naming the parameter (each is the cm-select flag of the same
name). `margin_pool_size_for` is the one place that knows how the margin pool k_m
follows from k_t (docs/design.md, "The margin pool"): `SelectBatch` uses it too.

    options = SelectOptions(scores="gs://b/scores/*.parquet", clusters="gs://b/clusters/*.parquet",
                            batch_size=100_000, output_dir="gs://b/batch-01")
    manifest = run_select(options, ["--runner=DataflowRunner", ...])   # cm_beam.selection.stage
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

from cm_beam.errors import InputError, check_choice, check_int, check_required
from cm_beam.selection.uncertainty import MULTILABEL_REDUCES, UNCERTAINTIES

STRATEGIES = ("cluster_margin", "margin", "random")
# k_m = factor x k_t when neither is given: the setting benchmarks/cm_settings_study.py chose
# on calibration pools (docs/design.md, "What the evidence says about the defaults").
DEFAULT_MARGIN_POOL_FACTOR = 1.25


def _bad(parameter: str, detail: str) -> InputError:
    return InputError.bad_parameter(parameter, detail)


def margin_pool_size_for(batch_size: int, margin_pool_size: Optional[int] = None,
                         margin_pool_factor: Optional[float] = None, strategy: str = "cluster_margin") -> int:
    """k_m for Cluster-Margin: `margin_pool_size`, else ceil(k_t x factor) (default 1.25);
    never below k_t (the batch is drawn from the margin pool). Plain Margin and
    Random have no clusters: their margin pool is the batch."""
    if margin_pool_size is None:
        factor = DEFAULT_MARGIN_POOL_FACTOR if margin_pool_factor is None else margin_pool_factor
        if not (factor >= 1.0 and math.isfinite(factor)):
            raise _bad("margin_pool_factor", f"must be >= 1 (k_m >= k_t), got {factor!r}")
        margin_pool_size = int(math.ceil(batch_size * factor))
    else:
        check_int("margin_pool_size", margin_pool_size)
        if margin_pool_size < batch_size:
            raise _bad("margin_pool_size", f"({margin_pool_size}) must be >= --batch_size ({batch_size})")
    return int(margin_pool_size) if strategy == "cluster_margin" else int(batch_size)


def check_selection(batch_size: int, strategy: str, uncertainty: str, multilabel_reduce: str,
                    margin_pool_size: Optional[int], margin_pool_factor: Optional[float]) -> int:
    """Checks the parameters that decide the batch; returns k_m (`margin_pool_size_for`)."""
    check_int("batch_size", batch_size)
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("uncertainty", uncertainty, UNCERTAINTIES)
    check_choice("multilabel_reduce", multilabel_reduce, MULTILABEL_REDUCES)
    return margin_pool_size_for(batch_size, margin_pool_size, margin_pool_factor, strategy)


@dataclasses.dataclass(frozen=True)
class SelectOptions:
    """The selection stage: which scores, clusters and exclusions, how many examples and how.

    scores: glob of Parquet files with example_id and the `uncertainty` column (or probs).
    clusters: glob of Parquet files with example_id, cluster_id (required by cluster_margin).
    exclude: globs of Parquet/CSV files with example_id to leave out (labeled, queued).
    batch_size: k_t. margin_pool_size (k_m) or margin_pool_factor (k_m = factor x k_t,
    default 1.25): the margin pool, at most one of the two.
    output_dir: where selection-*.parquet, rejected-*.parquet and manifest.json go;
    overwrite: replace its contents if it is not empty.
    """

    scores: str
    batch_size: int
    output_dir: str
    clusters: Optional[str] = None
    exclude: Tuple[str, ...] = ()
    strategy: str = "cluster_margin"
    uncertainty: str = "margin"
    multilabel: bool = False
    multilabel_reduce: str = "min"
    margin_pool_size: Optional[int] = None
    margin_pool_factor: Optional[float] = None
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude or ()))
        self.validate()

    def validate(self) -> None:
        """Raises InputError naming the first parameter that is wrong."""
        for name in ("scores", "output_dir"):
            check_required(name, getattr(self, name))
        if self.strategy == "cluster_margin" and not self.clusters:
            check_choice("strategy", self.strategy, STRATEGIES)
            raise _bad("clusters", "is required with --strategy cluster_margin")
        if self.margin_pool_size is not None and self.margin_pool_factor is not None:
            raise _bad("margin_pool_factor", "not with --margin_pool_size (give one of the two)")
        check_int("seed", self.seed, low=-(2 ** 63))
        check_selection(self.batch_size, self.strategy, self.uncertainty, self.multilabel_reduce,
                        self.margin_pool_size, self.margin_pool_factor)

    @property
    def resolved_margin_pool_size(self) -> int:
        """k_m as the selection uses it (the batch size for margin and random)."""
        return margin_pool_size_for(self.batch_size, self.margin_pool_size, self.margin_pool_factor, self.strategy)
