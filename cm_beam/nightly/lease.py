"""One nightly run per work directory: a lease taken atomically before any stage.

The lease is a small JSON file `<work_dir>/nightly.lease` naming the holder (host,
pid, start time, batch) and a random token. It is created with a write that fails
when the file exists: `O_CREAT | O_EXCL` on a local disk, an upload with
`ifGenerationMatch=0` on gs://. So of two runs started together exactly one gets
it; the other refuses at once and says who holds it.

The holder renews the lease (rewrites `renewed_at`) every `renew_seconds` while it
runs (stages take hours on a large pool, and the runner waits for each). A lease
not renewed for `timeout_seconds` was left by a run that died (SIGKILL, a lost
machine): the next run takes it over. So does `take_over=True` (an operator who
knows the holder is gone). A take-over is itself exclusive: the taker first
creates `nightly.lease.taken-<token of the stale lease>` with the same atomic
create, so of two runs that find the same stale lease only one proceeds.

Staleness compares the lease's `renewed_unix` (the holder's clock) with the
reader's clock: hosts sharing a work dir must have clocks within a small
fraction of the timeout (NTP gives milliseconds).

A holder whose lease was taken over (it stalled past the timeout) notices at its
next renewal or `check()`, and the nightly stops before it commits anything.

The lease is per work directory, not per batch: two batches built at once would
not exclude each other's examples (an image could go to labelers twice) and would
share the embeddings cache directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

from cm_beam.errors import InputError

_LOG = logging.getLogger("cm_beam.nightly.lease")

LEASE_NAME = "nightly.lease"
DEFAULT_TIMEOUT_SECONDS = 900.0


class LeaseHeld(InputError):
    """Another run holds the work directory's lease (and it is not stale)."""

    def __init__(self, message: str, holder: Dict[str, Any]):
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must not commit anything."""


# ---------------------------------------------------------------------------
# Storage: create-if-absent, read with a version, replace-if-version, delete-if-version.


class _LocalStore:
    def create(self, path: str, data: bytes) -> bool:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self, path: str) -> Optional[Tuple[bytes, Any]]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data  # the content is the version: a renewal changes renewed_at

    def replace(self, path: str, data: bytes, version: Any) -> bool:
        current = self.read(path)
        if current is None or current[1] != version:
            return False
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: readers see the old or the new lease, whole
        return True

    def delete(self, path: str, version: Any) -> bool:
        current = self.read(path)
        if current is None or current[1] != version:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True


class _GcsStore:
    """google-cloud-storage with generation preconditions (honours STORAGE_EMULATOR_HOST)."""

    def __init__(self):
        from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            self._client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "cm-beam-test"),
                                          credentials=AnonymousCredentials())
        else:
            self._client = storage.Client()

    def _blob(self, path: str):
        bucket, _, name = path[len("gs://"):].partition("/")
        return self._client.bucket(bucket).blob(name)

    def create(self, path: str, data: bytes) -> bool:
        from google.api_core import exceptions

        try:
            self._blob(path).upload_from_string(data, content_type="application/json", if_generation_match=0)
        except exceptions.PreconditionFailed:
            return False
        return True

    def read(self, path: str) -> Optional[Tuple[bytes, Any]]:
        from google.api_core import exceptions

        blob = self._blob(path)
        try:
            data = blob.download_as_bytes()
        except exceptions.NotFound:
            return None
        return data, blob.generation

    def replace(self, path: str, data: bytes, version: Any) -> bool:
        from google.api_core import exceptions

        try:
            self._blob(path).upload_from_string(data, content_type="application/json", if_generation_match=version)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        return True

    def delete(self, path: str, version: Any) -> bool:
        from google.api_core import exceptions

        try:
            self._blob(path).delete(if_generation_match=version)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        return True


def _store(root: str):
    if root.startswith("gs://"):
        return _GcsStore()
    if "://" in root:
        raise InputError(f"--work_dir: {root}: the run lease needs a local directory or gs:// "
                         "(a create that fails when the object exists)")
    return _LocalStore()


def _now() -> float:
    return time.time()


def _iso(unix: float) -> str:
    return _dt.datetime.fromtimestamp(unix, _dt.timezone.utc).isoformat(timespec="seconds")


def describe(holder: Dict[str, Any], now: Optional[float] = None) -> str:
    now = _now() if now is None else now
    age = now - float(holder.get("renewed_unix", 0))
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, batch {holder.get('batch_name')!r}, "
            f"started {holder.get('started_at')}, last renewed {holder.get('renewed_at')} ({age:.0f} s ago)")


class Lease:
    """A held lease; `release()` it (also in `finally`), `check()` before committing."""

    def __init__(self, store, path: str, record: Dict[str, Any], version: Any, renew_seconds: float):
        self._store, self.path, self.record, self._version = store, path, record, version
        self._lock = threading.Lock()
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if renew_seconds > 0:
            self._thread = threading.Thread(target=self._renew_loop, args=(renew_seconds,),
                                            name="cm-nightly-lease", daemon=True)
            self._thread.start()

    @property
    def token(self) -> str:
        return self.record["token"]

    def renew(self) -> None:
        with self._lock:
            if self._lost:
                return
            now = _now()
            record = dict(self.record, renewed_unix=now, renewed_at=_iso(now))
            data = _encode(record)
            if not self._store.replace(self.path, data, self._version):
                self._lost = self._lost_reason()
                _LOG.error("cm-nightly: %s", self._lost)
                return
            self.record = record
            current = self._store.read(self.path)
            self._version = current[1] if current else None

    def _lost_reason(self) -> str:
        current = self._store.read(self.path)
        if current is None:
            return f"the lease {self.path} was removed by another run"
        holder = _decode(current[0])
        return f"the lease {self.path} was taken over by another run ({describe(holder)})"

    def _renew_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.renew()
            except Exception as e:  # a transient storage error: the next renewal retries
                _LOG.warning("cm-nightly: cannot renew the lease %s: %s", self.path, e)

    def check(self) -> None:
        """Raises LeaseLost if another run took this lease over."""
        with self._lock:
            lost = self._lost
        if lost is None:
            current = self._store.read(self.path)
            if current is None or _decode(current[0]).get("token") != self.token:
                with self._lock:
                    self._lost = lost = self._lost_reason()
        if lost:
            raise LeaseLost(f"cm-nightly: {lost}; this run stops without committing anything")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._lost:
                return
            current = self._store.read(self.path)
            if current is not None and _decode(current[0]).get("token") == self.token:
                self._store.delete(self.path, current[1])


def _encode(record: Dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode("utf-8")


def _decode(data: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
        return value if isinstance(value, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}  # a torn or foreign file: treated as a lease of unknown age, i.e. stale


def acquire(root: str, batch_name: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
            take_over: bool = False, renew_seconds: Optional[float] = None) -> Lease:
    """Takes the work directory's lease, or raises LeaseHeld naming its holder."""
    store = _store(root)
    path = root.rstrip("/") + "/" + LEASE_NAME
    if renew_seconds is None:
        renew_seconds = max(0.5, min(60.0, timeout_seconds / 4))
    now = _now()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "batch_name": batch_name,
              "started_at": _iso(now), "started_unix": now, "renewed_at": _iso(now), "renewed_unix": now,
              "token": uuid.uuid4().hex, "timeout_seconds": timeout_seconds}
    data = _encode(record)
    for _ in range(3):  # a holder may release between our create and our read
        if store.create(path, data):
            current = store.read(path)
            return Lease(store, path, record, current[1] if current else None, renew_seconds)
        current = store.read(path)
        if current is None:
            continue
        holder = _decode(current[0])
        age = _now() - float(holder.get("renewed_unix", 0))
        if not take_over and age < timeout_seconds:
            raise LeaseHeld(
                f"--work_dir: {root} is in use by another cm-nightly run ({describe(holder)}); the lease "
                f"{path} is taken over when it has not been renewed for --lease_timeout {timeout_seconds:g} s "
                f"(a run that died), or now with --take_over_lease if that run is gone", holder)
        # Stale (or forced): of all runs that saw this lease, only the one that creates
        # the take-over marker may remove it.
        marker = f"{path}.taken-{holder.get('token') or 'unreadable-' + uuid.uuid4().hex}"
        if not store.create(marker, data):
            raise LeaseHeld(f"--work_dir: {root}: another run is taking over the stale lease {path} "
                            f"({describe(holder)}) at this moment", holder)
        why = "--take_over_lease" if take_over and age < timeout_seconds else f"not renewed for {age:.0f} s"
        _LOG.warning("cm-nightly: taking over the lease %s (%s; %s)", path, describe(holder), why)
        print(f"cm-nightly: taking over the lease of {describe(holder)} ({why})", flush=True,
              file=sys.stderr)
        store.delete(path, current[1])
    raise LeaseHeld(f"--work_dir: {root}: could not take the lease {path} (other runs keep taking it)", {})
