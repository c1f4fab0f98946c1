"""What a router process costs before it does anything: checked on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

THREADS = "import os, router.cli, workers.worker, router.ingest.server; print(len(os.listdir('/proc/self/task')))"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts no thread on one core")
def test_a_router_process_starts_no_blas_threads_unless_asked():
    """Importing the router (pydicom, hence numpy) leaves one thread: OpenBLAS's
    per-core threads spin at start and the router does no linear algebra. An
    OPENBLAS_NUM_THREADS the operator sets still wins."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    alone = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "1", alone.stderr

    env["OPENBLAS_NUM_THREADS"] = "2"
    asked = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, check=True)
    assert asked.stdout.strip() == "2", asked.stderr
