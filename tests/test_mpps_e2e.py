"""The router as MPPS SCP, as a real process (``dicom-router ingest``, where the relay
lives; ``run`` for the dashboard's test): a pynetdicom
modality sends N-CREATE then N-SET, pynetdicom MPPS SCPs (tests/mpps_peer.py)
record what the router relays to them (docs/mpps.md).

Both up: each gets both, in order, and the modality hears their answer. One
down: the modality hears Success once the messages are on disk, and the
destination gets them once it is up, in order, after a kill -9 of the router too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from playwright.sync_api import expect
from prometheus_client.parser import text_string_to_metric_families

from router.kernel.status import Status
from router.kernel.uids import uid_problem
from tests.mpps_peer import MppsModality, MppsPeer, completed, in_progress
from tests.peers import LOOPBACK, free_port, wait_for_port, wait_until
from tests.rawpeer import associate, read_pdu, response, status
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config
from tests.test_dashboard_e2e import _cell, browser_page  # noqa: F401 - a fixture, used by name

pytestmark = pytest.mark.e2e

MPPS = "1.2.840.10008.3.1.2.3.3"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PATIENT_DATA = ("Test^Mpps", "MPPS-1")


def _config(tmp_path: Path, redis_url: str, peers: dict[str, int], **extra) -> dict:
    """A router relaying MPPS to ``peers`` (name -> port), in that order, retried quickly."""
    destinations = {name: destination(port, name.upper()) for name, port in peers.items()}
    config = router_config(tmp_path, destinations, redis_url=redis_url)
    config["mpps"] = {"forward": list(peers), "timeout": 10,
                      "retry": {"max_attempts": 100, "backoff_seconds": [0.2, 0.5, 1.0], "jitter": 0.1}}
    config.update(extra)
    return config


def _held(router: RouterProcess, name: str) -> list[Path]:
    folder = router.spool / "mpps" / "held" / name
    return sorted(folder.glob("*.mpps")) if folder.is_dir() else []


def _cli(router: RouterProcess, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "router", *args, "-c", str(router.config_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _no_patient_data(router: RouterProcess) -> None:
    log = router.log_text()
    for value in PATIENT_DATA:
        assert value not in log


def test_both_destinations_get_create_then_set_in_order_and_the_modality_hears_their_answer(tmp_path, redis_url):
    """Two destinations up: each gets the N-CREATE then the N-SET, same SOP Instance UID,
    the data sets' content; the modality hears Success and the first one's Attribute List."""
    ris, pacs = MppsPeer("RIS").start(), MppsPeer("PACS").start()
    try:
        config = _config(tmp_path, redis_url, {"ris": ris.port, "pacs": pacs.port})
        with RouterProcess(tmp_path, config, command="ingest", log_level="INFO") as router:
            modality = MppsModality(router.port, ROUTER_AE)
            uid = "1.2.826.0.1.3680043.10.511.2.1"
            created = modality.create(in_progress(), uid)
            done = modality.set(completed(), uid)
            modality.release()
            _no_patient_data(router)
        assert (created.status, created.sop_instance) == (0, uid)
        assert created.dataset is not None and created.dataset.PerformedProcedureStepStatus == "IN PROGRESS"
        assert (done.status, done.sop_instance) == (0, uid)
        for peer in (ris, pacs):
            first, second = peer.wait_for(2, timeout=5)
            assert [(m.command, m.sop_instance) for m in (first, second)] == [("N-CREATE", uid), ("N-SET", uid)]
            assert first.dataset.PerformedProcedureStepID == "PPS-ACC1"
            assert first.dataset.ScheduledStepAttributesSequence[0].AccessionNumber == "ACC1"
            assert first.dataset.PatientName == "Test^Mpps"
            assert second.dataset.PerformedProcedureStepStatus == "COMPLETED"
            assert first.calling_ae == ROUTER_AE
    finally:
        ris.stop()
        pacs.stop()


def test_an_upstream_failure_reaches_the_modality_naming_the_destination(tmp_path, redis_url):
    """One destination refuses (0x0106 with an Error Comment): the modality hears that
    status and a comment naming it; the other destination still got the message."""
    ris, pacs = MppsPeer("RIS").start(), MppsPeer("PACS").start()
    pacs.answer(0x0106, "bad value")
    try:
        config = _config(tmp_path, redis_url, {"ris": ris.port, "pacs": pacs.port})
        with RouterProcess(tmp_path, config, command="ingest", log_level="INFO") as router:
            modality = MppsModality(router.port, ROUTER_AE)
            answer = modality.create(in_progress(), "1.2.826.0.1.3680043.10.511.2.2")
            modality.release()
            assert not _held(router, "pacs")  # told to the modality, not kept to send again
        assert answer.status == 0x0106
        assert answer.comment.startswith("pacs: bad value")
        assert [m.status for m in ris.wait_for(1, timeout=5)] == [0]
        assert [m.status for m in pacs.wait_for(1, timeout=5)] == [0x0106]
    finally:
        ris.stop()
        pacs.stop()


def test_a_destination_down_gets_both_later_in_order(tmp_path, redis_url):
    """One destination down: the modality hears Success for both messages, the one up
    has them at once, `queues` shows the two held for the one down, which gets both once
    it is started on its port, in order."""
    ris = MppsPeer("RIS").start()
    pacs = MppsPeer("PACS")  # not started: its port refuses
    try:
        config = _config(tmp_path, redis_url, {"ris": ris.port, "pacs": pacs.port})
        with RouterProcess(tmp_path, config, command="ingest", log_level="INFO") as router:
            modality = MppsModality(router.port, ROUTER_AE)
            uid = "1.2.826.0.1.3680043.10.511.2.3"
            answers = [modality.create(in_progress(), uid), modality.set(completed(), uid)]
            modality.release()
            assert [(a.status, a.sop_instance) for a in answers] == [(0, uid), (0, uid)]
            assert [m.command for m in ris.arrived] == ["N-CREATE", "N-SET"]  # before the answers
            assert len(_held(router, "pacs")) == 2
            shown = {row["destination"]: row for row in json.loads(_cli(router, "queues", "--json").stdout)["mpps"]}
            assert (shown["pacs"]["held"], shown["pacs"]["refused"], shown["ris"]["held"]) == (2, 0, 0)
            assert shown["pacs"]["oldest_age_seconds"] is not None
            pacs.start()
            arrived = pacs.wait_for(2, timeout=30)
            wait_until(lambda: not _held(router, "pacs"), 30, "the held messages removed once delivered")
            _no_patient_data(router)
        assert [(m.command, m.sop_instance) for m in arrived] == [("N-CREATE", uid), ("N-SET", uid)]
        assert arrived[1].dataset.PerformedProcedureStepStatus == "COMPLETED"
        assert len(pacs.arrived) == 2
    finally:
        ris.stop()
        pacs.stop()


def test_held_messages_survive_a_kill_and_are_delivered_once_in_order(tmp_path, redis_url):
    """Two procedure steps held for a destination that is down; the router killed with
    SIGKILL and started again: the destination gets all four, each step's N-CREATE
    before its N-SET, none twice."""
    pacs = MppsPeer("PACS")
    try:
        config = _config(tmp_path, redis_url, {"pacs": pacs.port})
        router = RouterProcess(tmp_path, config, command="ingest", log_level="INFO").start()
        try:
            modality = MppsModality(router.port, ROUTER_AE)
            first, second = "1.2.826.0.1.3680043.10.511.2.4", "1.2.826.0.1.3680043.10.511.2.5"
            answers = [modality.create(in_progress("A"), first), modality.create(in_progress("B"), second),
                       modality.set(completed(), first), modality.set(completed(), second)]
            modality.release()
            assert [a.status for a in answers] == [0, 0, 0, 0]
            assert len(_held(router, "pacs")) == 4
            router.kill()
            pacs.start()
            router.start()
            arrived = pacs.wait_for(4, timeout=30)
            wait_until(lambda: not _held(router, "pacs"), 30, "the held messages removed once delivered")
            wait_until(lambda: router.log_text().count("delivered to pacs from the hold") == 4, 10,
                       "the four deliveries logged")
        finally:
            router.stop()
        assert [(m.command, m.sop_instance) for m in arrived] == [
            ("N-CREATE", first), ("N-CREATE", second), ("N-SET", first), ("N-SET", second)]
        assert [m.dataset.PerformedProcedureStepID for m in arrived[:2]] == ["PPS-A", "PPS-B"]
        assert len(pacs.arrived) == 4
    finally:
        pacs.stop()


def test_an_n_create_without_uid_gets_one_from_the_router(tmp_path, redis_url):
    """An N-CREATE without Affected SOP Instance UID: the router gives it one, returns it
    in the N-CREATE-RSP, sends it upstream; the N-SET naming it is relayed too."""
    ris = MppsPeer("RIS").start()
    try:
        config = _config(tmp_path, redis_url, {"ris": ris.port})
        with RouterProcess(tmp_path, config, command="ingest", log_level="INFO") as router:
            modality = MppsModality(router.port, ROUTER_AE)
            created = modality.create(in_progress(), None)
            done = modality.set(completed(), created.sop_instance)
            modality.release()
            assert "without Affected SOP Instance UID: the router gives it" in router.log_text()
        assert created.status == 0 and created.sop_instance
        assert uid_problem("UID", created.sop_instance) is None
        assert (done.status, done.sop_instance) == (0, created.sop_instance)
        arrived = ris.wait_for(2, timeout=5)
        assert [(m.command, m.sop_instance) for m in arrived] == [("N-CREATE", created.sop_instance),
                                                                  ("N-SET", created.sop_instance)]
    finally:
        ris.stop()


def test_an_unreadable_data_set_is_refused_and_nothing_is_relayed(tmp_path, redis_url):
    """An N-CREATE whose data set is cut short gets 0x0110 with an Error Comment; nothing
    goes upstream, and the association goes on: the next N-CREATE is relayed."""
    from pynetdicom.dimse_messages import N_CREATE_RQ
    from pynetdicom.dimse_primitives import N_CREATE
    from pynetdicom.pdu import P_DATA_TF

    from router.services.identifiers import encode

    ris = MppsPeer("RIS").start()
    try:
        config = _config(tmp_path, redis_url, {"ris": ris.port})
        with RouterProcess(tmp_path, config, command="ingest", log_level="INFO") as router:
            sock = associate(router.port, [(MPPS, EXPLICIT_LE)], calling_ae="MODALITY")
            whole = encode(in_progress(), EXPLICIT_LE)
            answers = []
            for message_id, (uid, data) in enumerate([("1.2.826.0.1.3680043.10.511.2.6", whole[:-5]),
                                                      ("1.2.826.0.1.3680043.10.511.2.7", whole)], start=1):
                primitive = N_CREATE()
                primitive.MessageID = message_id
                primitive.AffectedSOPClassUID = MPPS
                primitive.AffectedSOPInstanceUID = uid
                primitive.AttributeList = BytesIO(data)
                message = N_CREATE_RQ()
                message.primitive_to_message(primitive)
                for p_data in message.encode_msg(1, 16384):
                    sock.sendall(P_DATA_TF(p_data).encode())
                answers.append(response(sock))
            sock.sendall(bytes.fromhex("0500000000040000 0000".replace(" ", "")))  # A-RELEASE-RQ
            read_pdu(sock)
            sock.close()
        assert status(answers[0]) == Status.PROCESSING_FAILURE
        assert b"data set unreadable" in answers[0][0x0902]
        assert status(answers[1]) == 0
        assert [m.sop_instance for m in ris.wait_for(1, timeout=5)] == ["1.2.826.0.1.3680043.10.511.2.7"]
    finally:
        ris.stop()


def test_journey_metrics_and_dashboard_show_mpps_messages(tmp_path, redis_url, browser_page):
    """The journey of each message, found by its SOP Instance UID, says received, relayed
    to one destination, held for the other, then delivered from the hold; /metrics counts
    each outcome per destination, the held gauge goes back to 0, the recent steps show them;
    the dashboard's destination row (in a real browser) shows the two held, then none."""
    ris = MppsPeer("RIS").start()
    pacs = MppsPeer("PACS")
    dashboard = free_port()
    try:
        config = _config(tmp_path, redis_url, {"ris": ris.port, "pacs": pacs.port},
                         dashboard={"host": LOOPBACK, "port": dashboard})
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            wait_for_port(LOOPBACK, dashboard, timeout=30, proc=router.proc)
            modality = MppsModality(router.port, ROUTER_AE)
            uid = "1.2.826.0.1.3680043.10.511.2.8"
            modality.create(in_progress(), uid)
            modality.set(completed(), uid)
            modality.release()
            assert _metric(dashboard, "dicom_router_mpps_held", destination="pacs") == 2
            rows = {row["name"]: row for row in json.loads(_get(dashboard, "/api/destinations"))}
            assert (rows["pacs"]["mpps_held"], rows["ris"]["mpps_held"]) == (2, 0)
            page = browser_page
            page.goto(f"http://{LOOPBACK}:{dashboard}/")
            expect(_cell(page, "pacs", "waiting")).to_have_text(re.compile(r"MPPS held 2$"), timeout=15_000)
            pacs.start()
            pacs.wait_for(2, timeout=30)
            wait_until(lambda: _metric(dashboard, "dicom_router_mpps_messages_total", destination="pacs",
                                       outcome="delivered") == 2, 30, "two deliveries counted")
            assert _metric(dashboard, "dicom_router_mpps_messages_total", destination="pacs", outcome="held") == 2
            assert _metric(dashboard, "dicom_router_mpps_messages_total", destination="ris", outcome="relayed") == 2
            assert _metric(dashboard, "dicom_router_mpps_held", destination="pacs") == 0
            expect(_cell(page, "pacs", "waiting")).to_have_text(re.compile(r"MPPS held 0$"), timeout=15_000)
            found = json.loads(_cli(router, "journey", uid, "--json").stdout)
            recent = json.loads(_get(dashboard, "/api/recent?limit=50"))
        assert len(found) == 2
        by_command = {}
        for record in found:
            steps = [(s["step"], s["destination"], s["status"]) for s in record["journey"]]
            routed = next(s["detail"] for s in record["journey"] if s["step"] == "routed")
            by_command[routed.split()[1]] = steps
            assert record["sop_instance_uid"] == uid
        for command in ("N-CREATE", "N-SET"):
            steps = by_command[command]
            assert steps[:2] == [("received", "", None), ("routed", "", None)]
            assert set(steps[2:]) == {("sent", "ris", 0), ("failed", "pacs", None), ("sent", "pacs", 0)}
            assert steps.index(("failed", "pacs", None)) < steps.index(("sent", "pacs", 0))
        assert {record["spool_id"] for record in found} <= {step["spool_id"] for step in recent}
    finally:
        ris.stop()
        pacs.stop()


def _get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(f"http://{LOOPBACK}:{port}{path}", timeout=10).read().decode()


def _metric(port: int, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(_get(port, "/metrics")):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None
