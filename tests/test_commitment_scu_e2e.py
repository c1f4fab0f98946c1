"""Storage commitment toward destinations (the router as SCU), against real Orthanc.

Orthanc is a Storage Commitment SCP that answers the N-ACTION at once and
always reports on a new association to the requester, which it must know
among its ``DicomModalities`` (tests/../shared/notes/peers.md). The router's
copy of each instance may leave the spool only after that report says
committed (docs/guarantees.md, G2); what Orthanc reports failed is sent again.
"""

from __future__ import annotations

import pytest

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
        wait_until(lambda: "8 committed, 0 to send again" in router.log_text(), 30, "Orthanc's report")
        spool = router.spool
        assert not _files(spool / "commit" / "pacs") and not _files(spool / "out" / "pacs")
        assert not list((spool / "commit" / "pacs" / "tx").glob("*.json"))
        log = router.log_text()
        assert log.index("asked to commit 8 instance(s)") < log.index("8 committed, 0 to send again")


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
        log = router.log_text()
        assert "5 committed, 1 to send again; failed" in log and "0x0112" in log
