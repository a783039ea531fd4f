"""Wall time and peak memory of a command's whole process tree (Linux /proc).

Beam's multi-process runners start worker processes, so the memory of the driver
alone understates the cost: this samples the summed RSS of the process and all of
its descendants every `interval` seconds and reports the peak.
"""

import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional


def _children_map() -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> int:
    children = _children_map()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_bytes(pid)
        stack.extend(children.get(pid, []))
    return total


def run_measured(cmd: List[str], interval: float = 0.2, env: Optional[dict] = None, log_path: Optional[str] = None,
                 kill_above_mb: Optional[float] = None, cwd: Optional[str] = None) -> Dict:
    """Runs `cmd`; returns {"wall_seconds", "peak_rss_mb", "returncode"}; raises if it fails.

    With `kill_above_mb`, the command's process group is killed as soon as its tree's
    RSS passes that many MB (the machine is shared: a runaway run must not take it all).
    """
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
    peak = [0]
    killed = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            if kill_above_mb is not None and peak[0] > kill_above_mb * 2**20 and not killed:
                killed.append(peak[0])
                os.killpg(proc.pid, signal.SIGKILL)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = proc.wait()
    wall = time.time() - start
    done.set()
    thread.join()
    if log_path:
        out.close()
    if killed:
        raise RuntimeError(f"{' '.join(cmd)} killed at {killed[0] / 2**20:.0f} MB (limit {kill_above_mb:.0f} MB)")
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}" + (f"; see {log_path}" if log_path else ""))
    return {"wall_seconds": round(wall, 3), "peak_rss_mb": round(peak[0] / 2**20, 1), "returncode": code}
