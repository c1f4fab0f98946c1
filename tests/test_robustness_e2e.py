"""Robust at the edge: crashed processes, hostile peers, configs that would fail later.

The router runs as real processes (``dicom-router run`` / ``ingest``); DCMTK
is the modality; a raw-socket peer (``tests/rawpeer.py``) plays the broken one.
"""

from __future__ import annotations

import time

import pytest

from tests.peers import free_port
from tests.rawpeer import associate, store_pdus
from tests.router_proc import RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return found


def test_a_partial_file_of_an_ingest_killed_mid_instance_goes_when_the_ingest_restarts(
    tmp_path, redis_url, ct_series
):
    """kill -9 of the ingest halfway through an instance leaves a partial file;
    the next ingest removes it at once (its writer is gone), not an hour later."""
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url)
    ingest = RouterProcess(tmp_path, config, "ingest", name="ingest1").start()
    pdus = store_pdus(ct_series(1, size_kib=512)[0])
    sock = associate(ingest.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)])
    sock.sendall(b"".join(pdus[: len(pdus) // 2]))
    tmp = ingest.spool / "tmp"
    _wait(lambda: list(tmp.iterdir()), 10, "the partial file")
    ingest.kill()
    sock.close()
    assert len(list(tmp.iterdir())) == 1
    with RouterProcess(tmp_path, config, "ingest", name="ingest2"):
        _wait(lambda: not list(tmp.iterdir()), 10, "the partial file to be swept")
        assert not list((ingest.spool / "incoming").iterdir())
