"""`StageTimer`: wall time inside a block of a DoFn, added to a Beam counter.

cm-cluster reports, per stage, the time spent inside its DoFns summed over workers
(`timings.stage_seconds` in its manifest) from the counters `cm_cluster/ms_<stage>`;
comparing their sum with the job's wall time shows how much of it is the runner's.
"""

import time

from apache_beam.metrics import Metrics


class StageTimer:
    """Adds the wall time spent in a `with` block to the counter `<namespace>/ms_<name>`
    (milliseconds)."""

    def __init__(self, name: str, namespace: str = "cm_cluster"):
        self._counter = Metrics.counter(namespace, f"ms_{name}")

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._counter.inc(int(1000 * (time.perf_counter() - self._t)))
        return False
