"""Storage commitment toward destinations (the router as SCU), against real Orthanc.

Orthanc is a Storage Commitment SCP that answers the N-ACTION at once and
always reports on a new association to the requester, which it must know
among its ``DicomModalities`` (tests/../shared/notes/peers.md). The router's
copy of each instance may leave the spool only after that report says
committed (docs/guarantees.md, G2); what Orthanc reports failed is sent again.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pydicom
import pytest
import redis

from router.kernel import history
from tests import data
from tests.commitment_peer import CommitmentPeer
from tests.peers import LOOPBACK, free_port, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

COMMIT = {"timeout_seconds": 20, "max_requests": 50}


def _files(folder) -> list:
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def _orthanc_with_router(orthanc_factory, router_port: int, workdir=None, dicom_port=None, http_port=None,
                         declared: bool = True):
    modalities = {"router": [ROUTER_AE, LOOPBACK, router_port]} if declared else {}
    return orthanc_factory(workdir=workdir, modalities=modalities, dicom_port=dicom_port, http_port=http_port)


def test_orthanc_commits_and_only_then_the_spool_lets_go(tmp_path, redis_url, orthanc_factory, small_series):
    """Every instance is stored and committed by Orthanc; the report comes on a new
    association to the router's SCP, and only then are the spool copies gone."""
    files = small_series(8)
    router_port = free_port()
    orthanc = _orthanc_with_router(orthanc_factory, router_port)
    pacs = destination(orthanc.dicom_port, "ORTHANC", storage_commitment=COMMIT)
    config = router_config(tmp_path, {"pacs": pacs}, redis_url=redis_url, port=router_port)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 8, sent.stdout[-2000:]
        orthanc.wait_for_instances(8, timeout=30)
        wait_until(lambda: _reported(router.log_text()) == (8, 0), 30, "Orthanc's report of all 8")
        spool = router.spool
        assert not _files(spool / "commit" / "pacs") and not _files(spool / "out" / "pacs")
        assert not list((spool / "commit" / "pacs" / "tx").glob("*.json"))
        # The worker logs its request once the N-ACTION-RSP is in; Orthanc may report sooner.
        wait_until(lambda: _asked(router.log_text()) == 8, 10, "the requests for all 8 in the log")


def test_copies_wait_until_orthanc_can_report_and_a_deleted_instance_is_sent_again(
    tmp_path, redis_url, orthanc_factory, small_series
):
    """While Orthanc does not know the router (it aborts the N-ACTION), the stored
    copies stay in the spool, waiting for commitment. An instance then deleted from
    Orthanc through its REST API is reported failed (0x0112) once Orthanc knows the
    router, is sent again and committed: in the end Orthanc holds all, the spool none."""
    files = small_series(6)
    router_port = free_port()
    workdir = tmp_path / "orthanc"
    orthanc = _orthanc_with_router(orthanc_factory, router_port, workdir=workdir, declared=False)
    pacs = destination(orthanc.dicom_port, "ORTHANC", storage_commitment=COMMIT)
    config = router_config(tmp_path, {"pacs": pacs}, redis_url=redis_url, port=router_port)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, check=True)
        ids = orthanc.wait_for_instances(6, timeout=30)
        waiting = wait_until(lambda: len(_files(router.spool / "commit" / "pacs")) == 6, 30,
                             "six stored copies waiting for commitment")
        assert waiting
        wait_until(lambda: "not asked" in router.log_text(), 30, "an N-ACTION Orthanc refused")
        assert len(_files(router.spool / "commit" / "pacs")) == 6  # nothing let go without a report
        deleted = orthanc.rest(f"/instances/{ids[0]}/simplified-tags")["SOPInstanceUID"]
        orthanc.delete(f"/instances/{ids[0]}")
        assert orthanc.instance_count() == 5
        dicom_port, http_port = orthanc.dicom_port, orthanc.http_port
        orthanc.stop()
        orthanc = _orthanc_with_router(orthanc_factory, router_port, workdir=workdir, dicom_port=dicom_port,
                                       http_port=http_port)
        wait_until(lambda: not _files(router.spool / "commit" / "pacs")
                   and not _files(router.spool / "out" / "pacs"), 60, "every copy committed")
        assert orthanc.instance_count() == 6
        uids = {orthanc.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in orthanc.instances()}
        assert deleted in uids
        # 5 committed and 1 failed, then that one sent again and committed (each report's log
        # line is written once its copies are let go: wait for the last).
        wait_until(lambda: _reported(router.log_text()) == (6, 1), 30, "the log of both reports")
        log = router.log_text()
        assert "to send again; failed" in log and "0x0112" in log, log[-3000:]


# -- an archive that reports on the association the N-ACTION came on ----------


def _peer_destination(peer: CommitmentPeer, **extra) -> dict:
    return destination(peer.port, peer.ae_title, storage_commitment=extra.pop("commit", COMMIT), **extra)


def _reported(log: str) -> tuple[int, int]:
    """(committed, to send again) summed over the commitment reports in ``log``: one
    burst of instances may be routed, sent and asked to commit in more than one batch."""
    counts = re.findall(r": (\d+) committed, (\d+) to send again", log)
    return sum(int(c) for c, _ in counts), sum(int(f) for _, f in counts)


def _asked(log: str) -> int:
    """How many instances the worker asked to commit, over all its requests in ``log``."""
    return sum(int(n) for n in re.findall(r"asked to commit (\d+) instance\(s\)", log))


def _spool_empty(router) -> bool:
    spool = router.spool
    return not (_files(spool / "out" / "pacs") or _files(spool / "commit" / "pacs")
                or list((spool / "commit" / "pacs" / "tx").glob("*.json")))


def test_a_report_on_the_same_association_commits_everything(tmp_path, redis_url, small_series):
    """The archive reports on our association: the sender answers it there, and every copy goes."""
    files = small_series(8)
    with CommitmentPeer() as peer:
        config = router_config(tmp_path, {"pacs": _peer_destination(peer)}, redis_url=redis_url)
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, check=True)
            expected = {data.sop_instance_uid(f) for f in files}
            wait_until(lambda: _spool_empty(router) and peer.committed == expected, 30,
                       "an empty spool and the report acknowledged")
            assert sum(committed for _, committed, _ in peer.reports) == 8
            assert peer.store_requests == 8
            wait_until(lambda: _reported(router.log_text()) == (8, 0), 10, "the reports in the log")
            # Each instance's journey, found by its SOP Instance UID, tells it all in order.
            connection = redis.Redis.from_url(redis_url)
            ids = history.find(connection, data.sop_instance_uid(files[0]))
            assert len(ids) == 1
            steps = history.journey(connection, ids[0])
            assert [s.step for s in steps] == ["received", "routed", "sent", "committed"]
            assert steps[0].detail.startswith("from STORESCU@127.0.0.1")
            assert steps[1].detail == "rules: everything everywhere -> pacs"
            assert steps[2].destination == "pacs" and steps[2].status == 0
            assert steps[3].destination == "pacs" and steps[3].detail.startswith("transaction 2.25.")
            study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            assert ids[0] in history.find(connection, study)


def test_a_late_report_is_waited_for_on_an_association_kept_open(tmp_path, redis_url, small_series):
    """The report comes seconds after the association would have been released as idle:
    the association stays open for it, and it commits everything."""
    files = small_series(4)
    with CommitmentPeer(report_delay=6.0) as peer:
        pacs = _peer_destination(peer, idle_timeout=1)
        config = router_config(tmp_path, {"pacs": pacs}, redis_url=redis_url)
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, check=True)
            wait_until(lambda: peer.actions, 30, "the N-ACTION")
            time.sleep(2.5)
            assert len(_files(router.spool / "commit" / "pacs")) == 4  # nothing let go before the report
            # The peer records a report once our answer to it is in; the spool may empty first.
            expected = {data.sop_instance_uid(f) for f in files}
            wait_until(lambda: _spool_empty(router) and peer.committed == expected, 30,
                       "an empty spool and every report acknowledged")
            assert all(failed == 0 for _, _, failed in peer.reports)


def test_a_first_transaction_reported_failed_is_sent_and_committed_again(tmp_path, redis_url, small_series):
    """Every reference of the first transaction is reported failed (0x0110): each
    instance is sent again, committed in a second transaction, and only then let go."""
    files = small_series(5)
    with CommitmentPeer(fail_first=True) as peer:
        config = router_config(tmp_path, {"pacs": _peer_destination(peer)}, redis_url=redis_url)
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, check=True)
            wait_until(lambda: _spool_empty(router) and len(peer.committed) == 5, 30, "everything committed")
            first = peer.reports[0]
            assert first[0] == peer.actions[0] and first[1] == 0 and first[2] > 0  # the first, all failed
            assert peer.committed == {data.sop_instance_uid(f) for f in files}
            assert peer.store_requests == 5 + first[2]  # each failed one sent again
            wait_until(lambda: f"0 committed, {first[2]} to send again" in router.log_text(), 10,
                       "the first report in the log")


def test_kill_9_of_the_worker_between_n_action_and_report_loses_nothing(tmp_path, redis_url, small_series):
    """The forwarding worker dies after asking and before the report (which is then lost
    with its association): after the restart the transaction, recorded on disk, is asked
    again when its deadline passes, and everything is committed."""
    files = small_series(6)
    with CommitmentPeer(report_delay=3.0) as peer:
        pacs = _peer_destination(peer, commit={"timeout_seconds": 4, "max_requests": 10})
        config = router_config(tmp_path, {"pacs": pacs}, redis_url=redis_url)
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, check=True)
            wait_until(lambda: peer.actions, 30, "the N-ACTION")
            worker = next(pid for pid, cmd in router.children().items() if "--queue pacs" in cmd)
            # One burst may be asked in more than one N-ACTION: all 6 stored, then the kill.
            wait_until(lambda: len(_files(router.spool / "commit" / "pacs")) == 6, 10, "all six stored")
            os.kill(worker, signal.SIGKILL)
            assert len(_files(router.spool / "commit" / "pacs")) == 6
            expected = {data.sop_instance_uid(f) for f in files}
            wait_until(lambda: _spool_empty(router) and peer.committed == expected, 60,
                       "an empty spool after the restart and every report acknowledged")
            assert len(peer.actions) >= 2
            wait_until(lambda: "no report for transaction" in router.log_text(), 10, "the re-request in the log")
