"""The nightly job's work directory: what is cached where, and when a cache is valid.

`cm-nightly` runs the three stages (embed, cluster, select) against one work
directory, which it owns:

    <work_dir>/
      embeddings/<key>/            cm-embed output; <key> = hash(pool fingerprint,
                                   model sha256, embed parameters)
      clusters/<pool_key>/<key>/   cm-cluster output for one pool (<pool_key> = hash
                                   of the --pool pattern and format); <key> = hash(
                                   embeddings key, cluster parameters)
      batches/<batch_name>/        cm-select output: the batch sent to labelers
      batches/<batch_name>/report/ the demo report (PNG plots), optional
      nightly.lease                the running nightly's lease (cm_beam.nightly.lease)

Every directory is complete exactly when it holds the stage's `manifest.json`
(written last, only on success: `cm_beam.io.artifacts`). So:

* embeddings are reused only when a complete directory exists for the same pool
  content, the same model file and the same parameters, and its manifest agrees
  (input_fingerprint and model_fingerprint), i.e. a rerun after a failure re-embeds
  nothing, and a new model (every night) embeds again;
* clusters are built once per pool (the pool's location, not its content: a pool
  grows every day, and the examples missing from the clusters are singletons,
  counted by cm-select) and reused until `--recluster`; the newest complete one wins;
* a batch is complete when cm-select wrote its manifest; the nightly excludes every
  other complete batch automatically (so no image is queued for labeling twice)
  unless it was passed in an --exclude list (it is labeled then, and the labeled
  list covers it). Incomplete batch directories (a run that died) are ignored and
  overwritten by the rerun.
* nightly.json and report/report.json, written after the batch's manifest, name
  that manifest's sha256: the next run regenerates them when they are missing or
  describe another batch. Before a batch is recomputed its manifest goes first,
  then its summary, report and temp files.
* paths inside the work dir are stored relative to it (nightly.json, the demo's
  demo.json; a pool inside the work dir is keyed by its relative path), so a work
  dir runs from any directory and a moved or copied one uses its own files.

No Beam pipeline here: only paths, hashes and manifests, via Beam's FileSystems
(local and gs:// alike).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from cm_beam.io import artifacts
from cm_beam.errors import InputError

EMBEDDINGS = "embeddings"
CLUSTERS = "clusters"
BATCHES = "batches"
REPORT = "report"
NIGHTLY_SUMMARY = "nightly.json"  # written into the batch directory after its manifest
_BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def stable_hash(payload: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable payload (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def check_batch_name(name: str) -> str:
    if not _BATCH_NAME.match(name or ""):
        raise InputError(
            f"--batch_name: {name!r} is not a valid name (letters, digits, '.', '_', '-'; "
            "it becomes a directory name under <work_dir>/batches/)"
        )
    return name


def _subdirs(directory: str) -> List[str]:
    """Immediate subdirectories of `directory` (local or object store), sorted."""
    if not artifacts.dir_exists(directory):
        return []
    pattern = FileSystems.join(directory, "*", artifacts.MANIFEST_NAME)
    found = FileSystems.match([pattern])[0].metadata_list
    dirs = {m.path[: -len(artifacts.MANIFEST_NAME)].rstrip("/") for m in found}
    # Directories without a manifest are incomplete; callers that need them list them apart.
    return sorted(dirs)


def _all_subdirs(directory: str) -> List[str]:
    """Subdirectories holding at least one file (object stores have no empty ones)."""
    if not artifacts.dir_exists(directory):
        return []
    found = FileSystems.match([FileSystems.join(directory, "*", "*")])[0].metadata_list
    prefix = directory.rstrip("/") + "/"
    return sorted({prefix + m.path[len(prefix):].split("/", 1)[0] for m in found if m.path.startswith(prefix)})


@dataclasses.dataclass(frozen=True)
class CompleteDir:
    path: str
    manifest: Dict[str, Any]

    @property
    def completed_at(self) -> str:
        return str(self.manifest.get("completed_at", ""))


class WorkDir:
    """Paths and cache look-ups in one nightly work directory."""

    def __init__(self, root: str):
        if not root:
            raise InputError("--work_dir: required")
        self.root = root.rstrip("/") or root

    # Embeddings ---------------------------------------------------------------
    def embeddings_dir(self, key: str) -> str:
        return artifacts.join(self.root, EMBEDDINGS, key)

    def cached_embeddings(self, key: str, pool_sha256: str, model_sha256: str) -> Optional[CompleteDir]:
        """The complete embeddings for `key`, if their manifest matches pool and model."""
        directory = self.embeddings_dir(key)
        manifest = artifacts.read_manifest(directory)
        if manifest is None:
            return None
        pool_fp = (manifest.get("input_fingerprint") or {}).get("sha256")
        if pool_fp != pool_sha256 or manifest.get("model_fingerprint") != model_sha256:
            return None
        return CompleteDir(directory, manifest)

    def complete_embeddings(self) -> List[CompleteDir]:
        """Complete embedding directories, oldest first (by completion time)."""
        found = []
        for directory in _subdirs(artifacts.join(self.root, EMBEDDINGS)):
            manifest = artifacts.read_manifest(directory)
            if manifest is not None:
                found.append(CompleteDir(directory, manifest))
        return sorted(found, key=lambda d: (d.completed_at, d.path))

    def prune_embeddings(self, keep: int, in_use: str) -> List[str]:
        """Deletes complete embeddings beyond the newest `keep` (never `in_use`); returns them.

        Old nights' embeddings serve nothing once their batch is written (clusters and
        batches are self-contained), and each is the size of the pool's vectors.
        """
        if keep <= 0:
            return []
        complete = [d for d in self.complete_embeddings() if d.path.rstrip("/") != in_use.rstrip("/")]
        doomed = complete[: max(0, len(complete) - (keep - 1))]
        for directory in doomed:
            # Manifest first: an interrupted delete leaves an incomplete directory, never a
            # complete-looking one with missing shards.
            FileSystems.delete([artifacts.join(directory.path, artifacts.MANIFEST_NAME)])
            rest = artifacts.list_files(directory.path)
            if rest:
                FileSystems.delete(rest)
            if FileSystems.exists(directory.path):
                FileSystems.delete([directory.path])
        return [d.path for d in doomed]

    def remove_incomplete(self, keep: Sequence[str] = ()) -> List[str]:
        """Deletes embeddings and clusters directories without a manifest (left by runs that
        died, superseded by the complete ones); returns them. Only under the lease: no
        other run is writing one."""
        keep = {k.rstrip("/") for k in keep}
        roots = [artifacts.join(self.root, EMBEDDINGS)]
        roots += artifacts.subdirectories(artifacts.join(self.root, CLUSTERS))
        removed = []
        for root in roots:
            for directory in artifacts.subdirectories(root):
                if directory.rstrip("/") in keep or artifacts.read_manifest(directory) is not None:
                    continue
                artifacts.remove_tree(directory)
                removed.append(directory)
        return removed

    # Clusters -----------------------------------------------------------------
    def clusters_root(self, pool_key: str) -> str:
        return artifacts.join(self.root, CLUSTERS, pool_key)

    def clusters_dir(self, pool_key: str, key: str) -> str:
        return artifacts.join(self.clusters_root(pool_key), key)

    def complete_clusters(self, pool_key: str) -> List[CompleteDir]:
        """Complete clusterings of this pool, oldest first (by completion time)."""
        found = []
        for directory in _subdirs(self.clusters_root(pool_key)):
            manifest = artifacts.read_manifest(directory)
            if manifest is not None:
                found.append(CompleteDir(directory, manifest))
        return sorted(found, key=lambda d: (d.completed_at, d.path))

    # Batches ------------------------------------------------------------------
    def batches_root(self) -> str:
        return artifacts.join(self.root, BATCHES)

    def batch_dir(self, name: str) -> str:
        return artifacts.join(self.batches_root(), check_batch_name(name))

    def complete_batches(self) -> List[CompleteDir]:
        """Every batch whose cm-select manifest exists, by name."""
        out = []
        for directory in _subdirs(self.batches_root()):
            manifest = artifacts.read_manifest(directory)
            if manifest is not None and manifest.get("stage") == "select":
                out.append(CompleteDir(directory, manifest))
        return sorted(out, key=lambda d: d.path)

    def incomplete_batches(self) -> List[str]:
        complete = {d.path for d in self.complete_batches()}
        return [d for d in _all_subdirs(self.batches_root()) if d not in complete]


def dir_name(directory: str) -> str:
    """The last component of a directory path (local or gs://)."""
    return directory.rstrip("/").rsplit("/", 1)[-1]


batch_name_of = dir_name  # a batch is named by its directory


def selection_glob(batch_dir: str) -> str:
    return artifacts.join(batch_dir, "selection-*.parquet")


def _normalise(path: str) -> str:
    return path.rstrip("/").rstrip("*").rstrip("/")


def _absolute(pattern: str) -> str:
    if "://" in pattern or not pattern:
        return pattern
    import os

    return os.path.abspath(pattern)


def pending_batches(work: WorkDir, current: str, exclude: Sequence[str]) -> List[CompleteDir]:
    """Complete earlier batches that are not yet covered by an --exclude entry.

    A batch counts as labeled (covered) when an --exclude glob names its directory
    or its selection files; such a batch is excluded through that list already.
    """
    covered = set()
    for pattern in exclude:
        norm = _normalise(_absolute(pattern))
        covered.add(norm)
        if norm.endswith("selection-"):
            covered.add(norm.rsplit("/", 1)[0])
    pending = []
    for batch in work.complete_batches():
        name = batch_name_of(batch.path)
        if name == current:
            continue
        if _normalise(batch.path) in covered or _normalise(selection_glob(batch.path)) in covered:
            continue
        pending.append(batch)
    return pending


def pool_key(pool_pattern: str, pool_format: Optional[str], root: Optional[str] = None) -> str:
    """Identity of a pool across nights: where it lives, not what it holds today.

    A pool inside the work dir (the demo's) is named by its path relative to the work
    dir, so a moved or copied work dir still finds its clusters.
    """
    pattern = pool_pattern.rstrip("/")
    rel = relative_to(pattern, root) if root else None
    if rel is not None:
        return stable_hash({"pool_in_work_dir": rel, "format": pool_format or "auto"}, 12)
    return stable_hash({"pool": pattern, "format": pool_format or "auto"}, 12)


def relative_to(path: str, root: str) -> Optional[str]:
    """`path` relative to `root` if it lies below it, else None."""
    prefix = root.rstrip("/") + "/"
    if "://" not in path and "://" not in root:
        path = _absolute(path)
        prefix = _absolute(root).rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


# Batch integrity --------------------------------------------------------------
# A batch is complete when cm-select's manifest exists. What the nightly writes beside
# it afterwards (nightly.json, report/report.json) names the sha256 of that manifest,
# so a reader (and the next run) tells a current summary from one left by an earlier
# batch of the same name, and the next run regenerates a stale or missing one.


def batch_manifest_sha256(batch_dir: str) -> Optional[str]:
    path = artifacts.join(batch_dir, artifacts.MANIFEST_NAME)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return hashlib.sha256(f.read()).hexdigest()


def clear_batch_dir(batch_dir: str) -> None:
    """Before a batch is (re)computed: its manifest first (the batch stops being complete),
    then its summary, report and a killed job's temp files. cm-select's --overwrite
    clears the rest."""
    manifest = artifacts.join(batch_dir, artifacts.MANIFEST_NAME)
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    summary = artifacts.join(batch_dir, NIGHTLY_SUMMARY)
    if FileSystems.exists(summary):
        FileSystems.delete([summary])
    artifacts.remove_tree(artifacts.join(batch_dir, REPORT))
    remove_temp(batch_dir)


def remove_temp(directory: str) -> List[str]:
    return artifacts.remove_temp(directory)


def batch_clusters(batch_dir: str) -> int:
    """Distinct clusters the batch's examples come from (a singleton is its own cluster)."""
    import numpy as np

    from cm_beam.io import table_io

    table = table_io.read_table(selection_glob(batch_dir))
    if table.num_rows == 0 or "cluster_id" not in table.column_names:
        return 0
    return int(np.unique(table.column("cluster_id").to_numpy(zero_copy_only=False)).size)


def _rebase(glob_or_dir: Optional[str], root: str, top: str, depth: int) -> Optional[str]:
    """`.../<top>/<depth components>[/<file glob>]` -> the same directory under `root`."""
    if not glob_or_dir:
        return None
    parts = glob_or_dir.rstrip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == top and len(parts) - i - 1 in (depth, depth + 1):
            return artifacts.join(root, top, *parts[i + 1:i + 1 + depth])
    return None


def batch_inputs(work: WorkDir, manifest: Dict[str, Any]):
    """The embeddings and clusters directories a complete batch was selected from (in this work dir)."""
    params = manifest.get("parameters", {})
    return (_rebase(params.get("scores"), work.root, EMBEDDINGS, 1),
            _rebase(params.get("clusters"), work.root, CLUSTERS, 2))


# Keys of nightly.json that hold paths (stored relative to the work dir when inside it).
_SUMMARY_PATHS = ("batch_dir", "selection", "embeddings", "clusters")


def _relativize(value: Any, root: str) -> Any:
    if isinstance(value, str):
        if value.rstrip("/") == root.rstrip("/"):
            return "."
        rel = relative_to(value, root)
        return rel if rel is not None else value
    if isinstance(value, dict):
        return {k: _relativize(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relativize(v, root) for v in value]
    return value


def _resolve(value: Optional[str], root: str) -> Optional[str]:
    if not isinstance(value, str) or "://" in value or value.startswith("/"):
        return value
    return root if value == "." else artifacts.join(root, value)


def write_nightly_summary(work: WorkDir, batch_dir: str, summary: Dict[str, Any]) -> str:
    """Writes <batch_dir>/nightly.json with every path inside the work dir made relative to it."""
    stored = dict(_relativize(summary, work.root), paths_relative_to="work_dir")
    path = artifacts.join(batch_dir, NIGHTLY_SUMMARY)
    artifacts.write_json(path, stored)
    return path


def read_nightly_summary(work: WorkDir, batch_dir: str) -> Optional[Dict[str, Any]]:
    """<batch_dir>/nightly.json with its paths resolved against this work dir, or None."""
    path = artifacts.join(batch_dir, NIGHTLY_SUMMARY)
    if not FileSystems.exists(path):
        return None
    try:
        summary = artifacts.read_json(path)
    except ValueError:
        return None  # torn or foreign: regenerated
    if summary.get("paths_relative_to") == "work_dir":
        for key in _SUMMARY_PATHS:
            summary[key] = _resolve(summary.get(key), work.root)
        for stage in (summary.get("stages") or {}).values():
            if isinstance(stage, dict) and "output" in stage:
                stage["output"] = _resolve(stage["output"], work.root)
        report = summary.get("report")
        if isinstance(report, dict):
            report["plots"] = [_resolve(p, work.root) for p in report.get("plots", [])]
            report["numbers"] = _resolve(report.get("numbers"), work.root)
    return summary


def stage_beam_args(beam_args: Iterable[str], stage: str) -> List[str]:
    """The Beam flags for one stage's job.

    A --job_name gets the stage as suffix: Dataflow refuses two active jobs of one
    name, and distinct names keep the three jobs' monitoring pages apart.
    Runner names resolve through cm_beam.runtime.runner.RUNNER_ALIASES
    (`--runner=DaskRunner` means cm-beam's DaskRunner).
    """
    from cm_beam.runtime.runner import rewrite_runner

    out, it = [], iter(rewrite_runner(beam_args))
    for arg in it:
        if arg == "--job_name":
            arg = f"{arg}={next(it, '')}"
        out.append(f"{arg}-{stage}" if arg.startswith("--job_name=") else arg)
    return out
