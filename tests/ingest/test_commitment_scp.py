"""The ingest as Storage Commitment SCP toward modalities, with a
pynetdicom modality and the instances' histories in a real Redis (the whole router: tests/test_commitment_scp_e2e.py)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from click.testing import CliRunner

from router.cli import cli
from router.kernel import history
from router.kernel.commitment.from_modalities import CONNECT_TIMEOUT, Request, decide
from router.kernel.commitment.messages import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    Reference,
)
from tests.modality import Modality
from tests.peers import LOOPBACK, free_port, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def start_scp(start_ingest):
    """``start_scp(modalities={AE: port}, **RouterSettings fields)``: an ingest
    serving commitment requests; stopped after the test."""

    def make(modalities: dict[str, int] | None = None, **overrides):
        return start_ingest(modalities or {}, **overrides)

    return make


def _requests(scp) -> list[Path]:
    return sorted((scp.spool.root / "commitments" / "requests").rglob("*.json"))


def test_modality_gets_its_report_on_its_own_association(start_scp, small_series):
    """C-STOREs then an N-ACTION on one association kept open: Success at once, then
    an N-EVENT-REPORT on that association — the stored ones committed, an unknown
    UID failed 0x0112, a wrong SOP class 0x0119 — and the request record goes."""
    scp = start_scp()
    files = small_series(3)
    mismatch = pydicom.dcmread(files[0]).SOPInstanceUID
    modality = Modality()
    try:
        status, uid, refs = modality.store_and_request(
            scp.port, files, extra=[Reference(CT, "1.2.3.4.5.6.7.8.9"), Reference(MR, str(mismatch))])
        assert status == 0
        report, how = modality.report(timeout=15)
    finally:
        modality.stop()
    assert how == "same" and report.transaction_uid == uid
    assert report.committed == refs[:3]
    assert report.failed == [(refs[3], NO_SUCH_OBJECT_INSTANCE), (refs[4], CLASS_INSTANCE_CONFLICT)]
    wait_until(lambda: not _requests(scp), 10, "the request record removed")


def test_reports_crossing_the_modalitys_next_stores_on_its_association(start_scp, small_series):
    """A modality stores a batch, asks to commit it, and goes on storing the next batch
    on the same association while the report comes: every C-STORE is answered Success
    (none taken for the answer to a report), and every batch's report arrives, committed."""
    scp = start_scp()
    files = small_series(48)
    batches = [files[n:n + 3] for n in range(0, len(files), 3)]
    modality = Modality()
    try:
        asked = modality.store_and_request_in_turns(scp.port, batches)
        reports = {}
        for _ in batches:
            report, how = modality.report(timeout=15)
            assert how == "same"
            reports[report.transaction_uid] = report
    finally:
        modality.stop()
    assert all(status == 0 for status, _, _ in asked)
    for _, uid, refs in asked:
        assert reports[uid].committed == refs and reports[uid].failed == []
    wait_until(lambda: not _requests(scp), 10, "the request records removed")


def test_an_instance_accepted_with_a_leading_zero_uid_is_committed_too(start_scp, small_series):
    """The ingest tolerates UID components with leading zeros (real archives hold them):
    a modality asking for such an instance's commitment gets it committed, with the
    rest of its request, not a failure of the whole N-ACTION."""
    scp = start_scp()
    files = small_series(2)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.0042.07"
    ds.save_as(files[0])
    modality = Modality()
    try:
        status, uid, refs = modality.store_and_request(scp.port, files)
        assert status == 0
        report, how = modality.report(timeout=15)
    finally:
        modality.stop()
    assert refs[0].sop_instance == "1.2.826.0.1.3680043.8.498.0042.07"
    assert (how, report.transaction_uid, report.committed, report.failed) == ("same", uid, refs, [])


def test_report_goes_on_a_new_association_once_the_modality_released(start_scp, small_series):
    """A modality that releases right after the N-ACTION-RSP gets its report on a new
    association to its entry under ``modalities:``, the router in the SCP role."""
    port = free_port()
    scp = start_scp(modalities={"LISTENER": port})
    modality = Modality("LISTENER", listen_port=port)
    modality.listen()
    try:
        status, uid, refs = modality.store_and_request(scp.port, small_series(2), keep_open=False)
        assert status == 0
        report, how = modality.report(timeout=15)
    finally:
        modality.stop()
    assert (how, report.transaction_uid, report.committed, report.failed) == ("new", uid, refs, [])
    # A report already under way on that association does not hold up the release.
    assert modality.released is True
    wait_until(lambda: not _requests(scp), 10, "the request record removed")


def test_malformed_and_foreign_requests_are_refused(start_scp):
    """An N-ACTION of another action type, on another instance or without readable
    data is answered with a failure status and nothing is recorded."""
    scp = start_scp()
    service = scp.commitments

    class Nowhere:
        def send_report(self, report):
            return None

    assert service.take_request(2, "1.2.840.10008.1.20.1.1", b"", "1.2.840.10008.1.2", "M", LOOPBACK, Nowhere()) == 0x0123
    assert service.take_request(1, "1.2.3", b"", "1.2.840.10008.1.2", "M", LOOPBACK, Nowhere()) == 0x0117
    assert service.take_request(1, "1.2.840.10008.1.20.1.1", b"\x01\x02", "1.2.840.10008.1.2", "M", LOOPBACK,
                                Nowhere()) == PROCESSING_FAILURE
    assert not _requests(scp)


def _record(destinations: dict[str, str], sop_class: str = CT, routed: bool = True,
            outcome: str = "forwarded") -> history.Record:
    return history.Record("id", "1.2.3", sop_class, 100.0, 101.0 if routed else None, outcome, destinations)


def test_delivered_mode_waits_for_every_destination_until_the_deadline():
    """Delivered mode: committed only when every chosen destination has it for good;
    until the deadline it waits, then what is missing fails; an unknown UID fails with
    0x0112 after the grace, as in received mode, never holding the report to the deadline."""
    ref = Reference(CT, "1.2.3")
    request = Request("9.9", "M", LOOPBACK, (ref,), received=100.0, deadline=200.0)
    half = _record({"a": history.Delivery.DELIVERED, "b": history.Delivery.STORED})
    assert decide(ref, half, "delivered", request, 150.0) is None
    assert decide(ref, half, "delivered", request, 200.0) == PROCESSING_FAILURE
    assert decide(ref, _record({"a": history.Delivery.DELIVERED}), "delivered", request, 150.0) == 0
    assert decide(ref, _record({}, routed=False), "delivered", request, 150.0) is None
    assert decide(ref, _record({}), "delivered", request, 150.0) == PROCESSING_FAILURE  # quarantined
    assert decide(ref, None, "delivered", request, 101.0) is None
    assert decide(ref, None, "delivered", request, 103.0) == NO_SUCH_OBJECT_INSTANCE  # not the deadline
    assert decide(ref, _record({}, routed=False), "received", request, 100.0) == 0
    assert decide(ref, None, "received", request, 103.0) == NO_SUCH_OBJECT_INSTANCE


def test_a_dropped_instance_is_never_reported_committed():
    """unrouted: drop received the instance and kept nothing: in neither mode does the
    router claim to hold it; a quarantined one is held (received mode only)."""
    ref = Reference(CT, "1.2.3")
    request = Request("9.9", "M", LOOPBACK, (ref,), received=100.0, deadline=200.0)
    dropped = _record({}, outcome="dropped")
    assert decide(ref, dropped, "received", request, 150.0) == PROCESSING_FAILURE
    assert decide(ref, dropped, "delivered", request, 150.0) == PROCESSING_FAILURE
    assert decide(ref, _record({}, outcome="quarantined"), "received", request, 150.0) == 0


def test_a_request_survives_a_restart_and_is_reported_then(start_scp, small_series, tmp_path, redis_url):
    """The ingest stops between the N-ACTION-RSP and the report: the next start finds
    the request on disk and reports it on a new association."""
    port = free_port()
    delivered = {"mode": "delivered", "timeout_seconds": 1}
    scp = start_scp(modalities={"LISTENER": port}, commitment=delivered)
    modality = Modality("LISTENER", listen_port=port)
    try:
        status, uid, refs = modality.store_and_request(scp.port, small_series(1), keep_open=False)
        assert status == 0
        scp.stop()
        assert [p.stem for p in _requests(scp)] == [uid]
        time.sleep(1.0)
        modality.listen()
        again = start_scp(modalities={"LISTENER": port}, commitment=delivered)
        report, how = modality.report(timeout=15)
    finally:
        modality.stop()
    assert how == "new" and report.transaction_uid == uid
    assert report.committed == [] and report.failed == [(refs[0], PROCESSING_FAILURE)]  # never routed here
    wait_until(lambda: not _requests(again), 10, "the request record removed")


def test_a_hung_modality_does_not_hold_up_another_modalitys_report(start_scp, small_series):
    """Two modalities released after their N-ACTION: the first one's entry accepts TCP
    and never answers the A-ASSOCIATE-RQ (its report waits out the connect timeout), yet
    the second one's report arrives at once, on its own new association."""
    hung = socket.create_server((LOOPBACK, 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(hung.accept()[0]), daemon=True).start()
    port = free_port()
    scp = start_scp(modalities={"HUNG": hung.getsockname()[1], "LISTENER": port})
    silent = Modality("HUNG")
    modality = Modality("LISTENER", listen_port=port)
    modality.listen()
    try:
        status, _, _ = silent.store_and_request(scp.port, small_series(1), keep_open=False)
        assert status == 0
        wait_until(lambda: held, 10, "the router connecting to the hung modality")
        asked = time.monotonic()
        status, uid, refs = modality.store_and_request(scp.port, small_series(2), keep_open=False)
        assert status == 0
        report, how = modality.report(timeout=15)
        waited = time.monotonic() - asked
    finally:
        modality.stop()
        for sock in [*held, hung]:
            sock.close()
    assert (how, report.transaction_uid, report.committed) == ("new", uid, refs)
    assert waited < CONNECT_TIMEOUT / 2, f"the report waited {waited:.1f} s behind the hung modality's"


def test_a_report_owed_to_a_modality_not_under_modalities_is_said_once_and_shown_pending(
        start_scp, small_series, tmp_path, redis_url, caplog):
    """A modality missing from ``modalities:`` that releases after its N-ACTION: one WARNING names
    its AE title and the entry to add, its retries say it again only at DEBUG, and `queues --json`
    shows the report owed, retrying, with that problem."""
    retry = {"max_attempts": 100, "backoff_seconds": [0.1], "jitter": 0}
    scp = start_scp(modalities={}, commitment={"report_retry": retry})
    modality = Modality("UNDECLARED")
    # One reference the router never received: the report waits out the grace for it
    # (seconds), so it cannot be sent on the association before the modality releases it.
    unknown = Reference(CT, "1.2.3.4.5.6.7.8.9.0")
    with caplog.at_level(logging.DEBUG, logger="router.kernel.commitment.from_modalities"):
        status, uid, refs = modality.store_and_request(scp.port, small_series(2), extra=[unknown], keep_open=False)
        assert status == 0
        wait_until(lambda: _requests(scp) and json.loads(_requests(scp)[0].read_text())["attempts"] >= 3, 60,
                   "three failed deliveries of the report")
    said = [r for r in caplog.records if "UNDECLARED is not under modalities:" in r.getMessage()]
    assert [r.levelno for r in said][:3] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert sum(r.levelno >= logging.WARNING for r in said) == 1
    assert f"modalities: {{UNDECLARED: {{host: {LOOPBACK}, port: ...}}}}" in said[0].getMessage()

    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({
        "router": {"spool_dir": str(scp.spool.root), "redis_url": redis_url},
        "destinations": {"pacs": {"ae_title": "PACS", "host": LOOPBACK, "port": 104}}}))
    (owed,) = json.loads(CliRunner().invoke(cli, ["queues", "-c", str(config), "--json"]).output)["commitment_reports"]
    assert (owed["transaction_uid"], owed["calling_ae"], owed["address"], owed["references"]) == (
        uid, "UNDECLARED", LOOPBACK, len(refs))
    assert owed["state"] == "retrying" and owed["attempts"] >= 3 and owed["next_attempt"] >= owed["created"]
    assert owed["problem"] == "UNDECLARED is not under modalities: and its association has closed"
    text = CliRunner().invoke(cli, ["queues", "-c", str(config)]).output
    assert "storage commitment reports owed to modalities" in text and uid in text
