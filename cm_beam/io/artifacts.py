"""Output directories and manifests: the contract every cm-beam stage follows.

An output directory holds Parquet shards and a `manifest.json` written last. The
manifest is the commit marker: a directory without one is incomplete (a failed or
running job) and no stage or user should trust its shards. So:

* a stage refuses a non-empty output directory unless `--overwrite`;
* with `--overwrite` the old manifest is deleted *first*, then the old files and
  subdirectories (a report/, a killed job's beam-temp-*), so a crash in the middle
  never leaves an old manifest beside new shards, nor old files beside new ones;
* the manifest is written to a temporary name and renamed, so it is whole or absent.

All paths go through Beam's FileSystems, so local paths and gs:// work alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from typing import Any, Dict, List, Optional

from apache_beam.io.filesystems import FileSystems

from cm_beam.errors import InputError

MANIFEST_NAME = "manifest.json"


def join(path: str, *parts: str) -> str:
    return FileSystems.join(path, *parts)


def dir_exists(directory: str) -> bool:
    """Whether `directory` may hold files: on object stores a directory is only a name
    prefix (FileSystems.exists is false for it), so there it is always worth a listing."""
    if "://" in directory:
        return True
    return FileSystems.exists(directory)


def list_files(directory: str) -> List[str]:
    """Every file below `directory` (non-recursive for object stores, like `ls`)."""
    if not dir_exists(directory):
        return []
    result = FileSystems.match([FileSystems.join(directory, "*")])[0]
    return sorted(m.path for m in result.metadata_list)


def _is_local(path: str) -> bool:
    return "://" not in path


def subdirectories(directory: str) -> List[str]:
    """Immediate subdirectories of `directory` (on object stores: prefixes holding objects)."""
    if not dir_exists(directory):
        return []
    if _is_local(directory):
        import os

        return sorted(os.path.join(directory, n) for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))
    prefix = directory.rstrip("/") + "/"
    found = FileSystems.match([prefix + "**"])[0].metadata_list
    return sorted({prefix + m.path[len(prefix):].split("/", 1)[0] for m in found
                   if m.path.startswith(prefix) and "/" in m.path[len(prefix):]})


def remove_tree(directory: str) -> None:
    """Deletes `directory` and everything below it (no error if it does not exist)."""
    if _is_local(directory):
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        return
    found = FileSystems.match([directory.rstrip("/") + "/**"])[0].metadata_list
    if found:
        FileSystems.delete([m.path for m in found])


def remove_temp(directory: str) -> List[str]:
    """Deletes what a killed job leaves in an output directory: Beam's beam-temp-* and *.tmp."""
    removed = [d for d in subdirectories(directory) if d.rstrip("/").rsplit("/", 1)[-1].startswith("beam-temp-")]
    for d in removed:
        remove_tree(d)
    tmp = [p for p in list_files(directory) if p.endswith(".tmp")]
    if tmp:
        FileSystems.delete(tmp)
    return removed + tmp


def prepare_output_dir(directory: str, overwrite: bool, flag: str = "--output_dir") -> None:
    """Makes `directory` ready for a new run, or raises InputError naming `flag`."""
    existing = list_files(directory) + subdirectories(directory)
    if existing and not overwrite:
        raise InputError(
            f"{flag}: {directory} is not empty ({len(existing)} entries, e.g. "
            f"{existing[0]}); pass --overwrite to replace its contents"
        )
    if existing:
        manifest = join(directory, MANIFEST_NAME)
        if FileSystems.exists(manifest):
            FileSystems.delete([manifest])  # first: the directory is now marked incomplete
        subdirs = set(subdirectories(directory))
        rest = [p for p in existing if p != manifest and p not in subdirs and FileSystems.exists(p)]
        if rest:
            FileSystems.delete(rest)
        for subdir in sorted(subdirs):
            remove_tree(subdir)
    if _is_local(directory) and not FileSystems.exists(directory):
        FileSystems.mkdirs(directory)


def write_json(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True, default=_json_default).encode("utf-8"))
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_manifest(directory: str, manifest: Dict[str, Any]) -> str:
    """Writes `manifest.json` atomically; call it only after every shard is final."""
    path = join(directory, MANIFEST_NAME)
    manifest = dict(manifest)
    manifest.setdefault("completed_at", _dt.datetime.now(_dt.timezone.utc).isoformat())
    manifest.setdefault("versions", versions())
    write_json(path, manifest)
    return path


def read_manifest(directory: str) -> Optional[Dict[str, Any]]:
    """The manifest of a complete output directory, or None if there is none."""
    path = join(directory, MANIFEST_NAME)
    if not FileSystems.exists(path):
        return None
    return read_json(path)


def versions() -> Dict[str, str]:
    import apache_beam
    import numpy
    import pyarrow

    import cm_beam

    found = {
        "cm_beam": cm_beam.__version__,
        "apache_beam": apache_beam.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
    for name in ("scipy", "tensorflow", "keras"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            found[name] = module.__version__
    return found


def _json_default(value):
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
