"""The glibc malloc settings reach this process's workers, and never override the user's."""

import os
import subprocess
import sys

import pytest

CODE = """
import os, subprocess, sys
from cm_beam.runtime import malloc_tuning
print(malloc_tuning.tune_malloc())
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('MALLOC_MMAP_THRESHOLD_'))"],
                       capture_output=True, text=True, check=True)
print(child.stdout.strip())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_worker_processes_inherit_the_settings_and_user_values_win():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "True", "glibc should accept mallopt"
    assert out[1] == "2 1048576"
    env["MALLOC_ARENA_MAX"] = "4"
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "4 1048576", "a value set by the user must be kept"
