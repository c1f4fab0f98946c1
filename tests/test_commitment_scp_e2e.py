"""The router as Storage Commitment SCP toward modalities, as a real process
(``dicom-router run``) with real destinations: a pynetdicom modality, Orthanc
as the modality, and ``delivered`` mode with a destination that is down.

A modality deletes what the report says committed, so nothing may be
reported committed that is not (docs/guarantees.md, "Commitment to modalities").
"""

from __future__ import annotations

import queue

import pytest

from router.kernel.commitment.messages import NO_SUCH_OBJECT_INSTANCE, PROCESSING_FAILURE, Reference
from tests import data
from tests.modality import Modality
from tests.peers import LOOPBACK, free_port, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

CT = "1.2.840.10008.5.1.4.1.1.2"


def _requests(router: RouterProcess) -> list:
    folder = router.spool / "commitments" / "requests"
    return sorted(folder.rglob("*.json")) if folder.is_dir() else []


def test_pynetdicom_modality_gets_its_report_on_the_same_association(tmp_path, redis_url, storescp_factory,
                                                                      small_series):
    """C-STOREs then an N-ACTION on one association kept open (received mode, the
    default): the stored instances are reported committed on that association and
    a UID the router never received fails with 0x0112."""
    pacs = storescp_factory()
    config = router_config(tmp_path, {"pacs": destination(pacs.port)}, redis_url=redis_url)
    modality = Modality()
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        try:
            status, uid, refs = modality.store_and_request(router.port, small_series(3),
                                                           extra=[Reference(CT, "1.2.826.0.1.3680043.99.1")])
            assert status == 0
            report, how = modality.report(timeout=20)
            # Before the modality goes: its answer to the report is sent after the report is seen.
            wait_until(lambda: not _requests(router), 30, "the request record removed")
        finally:
            modality.stop()
        assert (how, report.transaction_uid) == ("same", uid)
        assert report.committed == refs[:3] and report.failed == [(refs[3], NO_SUCH_OBJECT_INSTANCE)]
        pacs.wait_for_files(3)


def test_orthanc_as_the_modality_sees_its_instances_committed(tmp_path, redis_url, storescp_factory,
                                                              orthanc_factory, small_series):
    """Orthanc sends with ``"StorageCommitment": true`` and releases after the
    N-ACTION-RSP; the router reports on a new association to Orthanc's entry under
    ``modalities:``, and Orthanc's /storage-commitment shows every instance committed."""
    pacs = storescp_factory()
    router_port = free_port()
    orthanc = orthanc_factory(ae_title="ORTHANC_MOD", modalities={"router": [ROUTER_AE, LOOPBACK, router_port]})
    ids = [orthanc.post("/instances", f.read_bytes())["ID"] for f in small_series(3)]
    config = router_config(tmp_path, {"pacs": destination(pacs.port)}, redis_url=redis_url, port=router_port)
    config["modalities"] = {"ORTHANC_MOD": {"host": LOOPBACK, "port": orthanc.dicom_port}}
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        answer = orthanc.post("/modalities/router/store", {"Resources": ids, "StorageCommitment": True})
        transaction = answer["StorageCommitmentTransactionUID"]
        state = wait_until(lambda: (s := orthanc.rest(f"/storage-commitment/{transaction}"))["Status"] != "Pending"
                           and s, 20, "Orthanc's commitment report")
        assert state["Status"] == "Success", state
        assert len(state["Success"]) == 3 and not state["Failures"]
        # Orthanc's state changes as it takes the report, before it answers: the router's log follows.
        wait_until(lambda: f"{transaction} sent to ORTHANC_MOD on a new association" in router.log_text(), 10,
                   "the router's record of the report's delivery")
        wait_until(lambda: not _requests(router), 10, "the request record removed")


def test_delivered_mode_reports_success_only_once_the_destination_has_it(tmp_path, redis_url, storescp_factory,
                                                                          small_series):
    """``delivered`` mode with the destination down: no report while it is down;
    once it is started, the report says committed."""
    pacs_port = free_port()
    patient = {"max_attempts": 100, "backoff_seconds": [0.5, 1.0], "jitter": 0.1}  # held, never a dead letter
    config = router_config(tmp_path, {"pacs": destination(pacs_port, retry=patient)}, redis_url=redis_url,
                           commitment={"mode": "delivered", "timeout_seconds": 60})
    modality = Modality()
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        try:
            status, uid, refs = modality.store_and_request(router.port, small_series(2))
            assert status == 0
            with pytest.raises(queue.Empty):  # nothing reported while the destination is down
                modality.report(timeout=3)
            assert _requests(router)
            pacs = storescp_factory(port=pacs_port)
            report, how = modality.report(timeout=40)
            assert (how, report.transaction_uid, report.committed, report.failed) == ("same", uid, refs, [])
            pacs.wait_for_files(2)
            # Before the modality goes: its answer to the report is sent after the report is seen.
            wait_until(lambda: not _requests(router), 30, "the request record removed")
        finally:
            modality.stop()


def test_delivered_mode_reports_an_unknown_uid_at_once_not_at_the_deadline(tmp_path, redis_url, storescp_factory,
                                                                            small_series):
    """``delivered`` mode with an hour's timeout: a request naming five instances the
    storescp has and one UID never received is answered within seconds, the five
    committed and the unknown one 0x0112, not held back to the deadline."""
    pacs = storescp_factory()
    config = router_config(tmp_path, {"pacs": destination(pacs.port)}, redis_url=redis_url,
                           commitment={"mode": "delivered", "timeout_seconds": 3600})
    modality = Modality()
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        try:
            status, uid, refs = modality.store_and_request(router.port, small_series(5),
                                                           extra=[Reference(CT, "1.2.826.0.1.3680043.99.2")])
            assert status == 0
            report, how = modality.report(timeout=60)  # a bound for a loaded machine, far below the hour
            # Before the modality goes: its answer to the report is sent after the report is seen.
            wait_until(lambda: not _requests(router), 30, "the request record removed")
        finally:
            modality.stop()
        assert (how, report.transaction_uid) == ("same", uid)
        assert report.committed == refs[:5] and report.failed == [(refs[5], NO_SUCH_OBJECT_INSTANCE)]
        pacs.wait_for_files(5)


def test_delivered_mode_reports_what_is_missing_at_the_timeout(tmp_path, redis_url, small_series):
    """``delivered`` mode, a short timeout and the destination never up: every
    instance is reported failed (0x0110), none committed."""
    config = router_config(tmp_path, {"pacs": destination(free_port())}, redis_url=redis_url,
                           commitment={"mode": "delivered", "timeout_seconds": 3})
    modality = Modality()
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        try:
            status, uid, refs = modality.store_and_request(router.port, small_series(2))
            assert status == 0
            report, how = modality.report(timeout=20)
        finally:
            modality.stop()
        assert (how, report.transaction_uid, report.committed) == ("same", uid, [])
        assert report.failed == [(ref, PROCESSING_FAILURE) for ref in refs]


def test_instances_received_while_redis_was_away_are_reported_committed_once_it_is_back(
        tmp_path, redis_factory, storescp_factory, small_series):
    """The ingest answers C-STOREs while Redis is down (its history cannot be
    written); once a Redis that kept nothing is back, the reconciler records them from
    their file meta, so a commitment request for them says committed — not 0x0112."""
    server = redis_factory(persistent=False)
    pacs = storescp_factory()
    config = router_config(tmp_path, {"pacs": destination(pacs.port)}, redis_url=server.url)
    files = small_series(3)
    modality = Modality()
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        server.stop()
        storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, check=True)
        # Redis comes back only once the ingest has found it gone (it records a
        # batch's receipts a moment after answering: sooner, and it would succeed).
        wait_until(lambda: "stay in the spool for the reconciler" in router.log_text()
                   or "stays in the spool for the reconciler" in router.log_text(), 20,
                   "the ingest to find Redis gone")
        server.start()  # same port, empty
        pacs.wait_for_files(3, timeout=60)
        refs = [Reference(CT, data.sop_instance_uid(f)) for f in files]
        try:
            status, uid, _ = modality.store_and_request(router.port, [], extra=refs)
            assert status == 0
            report, how = modality.report(timeout=20)
        finally:
            modality.stop()
        assert (how, report.transaction_uid) == ("same", uid)
        assert report.committed == refs and report.failed == []
        wait_until(lambda: "had no history (Redis was away, or the ingest" in router.log_text(), 10,
                   "the late history record in the log")
