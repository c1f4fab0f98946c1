"""Whose problem a refusal is: one instance's, or the destination's — against real peers.

Orthanc answers 0xA700 to an instance without Series Instance UID, every
time, while it stores the rest: that instance must become a dead letter on
its short ``instance_retry`` schedule, carrying the status in words, not
after the destination's hours. A destination that refuses every instance is
held instead, and its instances are kept, not dead-lettered.
"""

from __future__ import annotations

import json
import threading
import time

import pydicom
import pytest

from router.kernel.status import Status
from tests import data
from tests.peers import LOOPBACK, free_port, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

# The destination's own schedule is far too slow for the test to wait on:
# whatever finishes within the test's seconds came from instance_retry.
SLOW_DESTINATION = {"max_attempts": 12, "backoff_seconds": [600], "jitter": 0.0}


def _without_series_uid(path, target):
    ds = pydicom.dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return target


def test_an_instance_orthanc_refuses_while_taking_others_is_a_dead_letter_in_seconds(
    tmp_path, redis_url, orthanc_factory, ct_series
):
    """Orthanc stores a series but answers 0xA700 to the one instance without
    Series Instance UID: that instance is a dead letter after instance_retry's
    attempts (not the destination's 12 × 600 s), its record and the log name
    its SOP Instance UID, the destination, and 0xA700 in words."""
    files = ct_series(6, size_kib=16)
    bad = _without_series_uid(files[3], tmp_path / "no_series.dcm")
    bad_uid = data.sop_instance_uid(bad)
    orthanc = orthanc_factory()
    pacs = destination(orthanc.dicom_port, "ORTHANC", retry=SLOW_DESTINATION)
    config = router_config(tmp_path, {"orthanc": pacs}, redis_url=redis_url)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        sent = storescu(LOOPBACK, router.port, [*files[:3], bad, *files[3:]], called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 7, sent.stdout[-2000:]
        orthanc.wait_for_instances(6, timeout=30)
        # The reason is written before the copy is moved in: a .dcm there has its whole .json.
        letters = wait_until(lambda: list((router.spool / "dead" / "orthanc").glob("*.dcm")), 30, "a dead letter")
        record = json.loads(letters[0].with_suffix(".json").read_text())
        assert record["sop_instance_uid"] == bad_uid
        assert record["status"] == Status.OUT_OF_RESOURCES
        assert "0xA700 Refused: Out of Resources" in record["reason"]
        assert record["attempts"] == 3
        assert set(orthanc.sop_instance_uids()) == {data.sop_instance_uid(f) for f in files}
        # Buried, then recorded in Redis, then logged.
        log = wait_until(lambda: (text := router.log_text()) and any(
            bad_uid in line and "orthanc" in line and "dead letter" in line for line in text.splitlines()) and text,
            10, "the dead letter in the log")
        assert "holding" not in log  # the destination itself was never held


class _RefusingSCP:
    """A storage SCP that answers 0xA700 to every C-STORE: a full archive.

    No DCMTK or Orthanc option makes a real peer refuse every instance with a
    status, so pynetdicom plays this broken peer over a real association.
    """

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.refused = 0
        self._lock = threading.Lock()
        self.ae = AE(ae_title="FULL")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server((LOOPBACK, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._refuse)])

    def _refuse(self, event) -> int:
        with self._lock:
            self.refused += 1
        return Status.OUT_OF_RESOURCES

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def test_a_destination_refusing_every_instance_is_held_and_loses_nothing_to_dead_letters(
    tmp_path, redis_url, ct_series
):
    """An archive answering 0xA700 to every instance is the destination's
    problem: after a few refusals it is held on its own schedule, and no
    instance is dead-lettered on the short instance schedule."""
    files = ct_series(8, size_kib=16)
    full = _RefusingSCP()
    try:
        pacs = destination(full.port, "FULL", retry={"max_attempts": 12, "backoff_seconds": [600], "jitter": 0.0})
        config = router_config(tmp_path, {"full": pacs}, redis_url=redis_url)
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
            assert sent.stdout.count("Received Store Response (Success)") == len(files)
            wait_until(lambda: "refuses every instance" in router.log_text(), 30, "the destination to be held")
            refused_when_held = full.refused
            time.sleep(3)  # instance_retry (0.3, 0.6, 1.0 s) would have buried them by now
            assert not list((router.spool / "dead").rglob("*.dcm"))
            assert len(list((router.spool / "out" / "full").glob("*.dcm"))) == len(files)
            assert full.refused == refused_when_held < len(files)  # held: no hammering
    finally:
        full.stop()
