"""BLAS threads per worker process when a local runner starts several of them.

numpy's OpenBLAS starts one thread per core in every process that loads it. With
the FnApiRunner in `multi_processing` mode, `--direct_num_workers` N processes each
run their matrix products with that many threads, so N x cores threads spin on the
cores (OpenBLAS threads busy-wait). The cost on cm-cluster is measured side by side
in benchmarks/results/cluster.json (`blas_threads`: `cluster_bench.py --part
blas_threads`). Dask's nanny sets the same variables to 1 for its worker processes
for this reason.

`local_worker_blas_threads` sets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS /
MKL_NUM_THREADS to max(1, cores // N) in the environment that the runner's worker
processes inherit, for the duration of the run only (the runner process itself
keeps its threads; later processes the caller starts are not affected). A value the
user already set wins; in-process and remote runners are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

_LOG = logging.getLogger(__name__)

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_LOCAL_RUNNERS = ("", "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_processes(options) -> int:
    """How many worker processes the local runner will start (0: none, in-process)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = options.view_as(StandardOptions).runner or ""
    if isinstance(runner, str) and runner.rsplit(".", 1)[-1] not in _LOCAL_RUNNERS:
        return 0
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 0
    # Beam: 0 workers means one per core.
    return direct.direct_num_workers or available_cores()


def threads_per_worker(options) -> Optional[int]:
    """BLAS threads each local worker process should use, or None to leave them alone."""
    workers = worker_processes(options)
    if workers <= 1:
        return None
    return max(1, available_cores() // workers)


@contextlib.contextmanager
def local_worker_blas_threads(options) -> Iterator[Optional[int]]:
    """While active, worker processes a local runner starts use `threads_per_worker`."""
    threads = threads_per_worker(options)
    saved = {}
    if threads is not None:
        for name in THREAD_VARIABLES:
            if name not in os.environ:  # the user's choice wins
                saved[name] = None
                os.environ[name] = str(threads)
        if saved:
            _LOG.debug("local worker processes: %d BLAS thread(s) each", threads)
    try:
        yield threads
    finally:
        for name in saved:
            os.environ.pop(name, None)
