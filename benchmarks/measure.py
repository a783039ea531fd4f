"""Wall time and peak memory of a command's whole process tree (Linux /proc).

Beam's multi-process runners start worker processes, so the memory of the driver
alone understates the cost: this samples the summed RSS of the process and all of
its descendants every `interval` seconds and reports the peak.
"""

import os
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


def run_measured(cmd: List[str], interval: float = 0.2, env: Optional[dict] = None, log_path: Optional[str] = None) -> Dict:
    """Runs `cmd`; returns {"wall_seconds", "peak_rss_mb", "returncode"}; raises if it fails."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = proc.wait()
    wall = time.time() - start
    done.set()
    thread.join()
    if log_path:
        out.close()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}" + (f"; see {log_path}" if log_path else ""))
    return {"wall_seconds": round(wall, 3), "peak_rss_mb": round(peak[0] / 2**20, 1), "returncode": code}
