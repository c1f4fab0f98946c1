"""The MPPS relay and the delivery of held messages (router/services/mpps.py,
mpps_delivery.py) in the test process: a tmp spool, the session's real Redis,
pynetdicom MPPS SCPs on real loopback sockets (tests/mpps_peer.py). The caller
is a recorder of the answers the ingest's association would send: enough here,
because what is checked is the relay's side (order, hold, delivery, what it
answers), and the ingest's real association carries those answers to a real
modality in tests/test_mpps_e2e.py."""

from __future__ import annotations

import logging

import pytest

from router.kernel import history
from router.kernel.dimse import (
    AFFECTED_SOP_INSTANCE_UID,
    ERROR_COMMENT,
    N_CREATE_RQ,
    N_SET_RQ,
    STATUS,
    command_ui,
    command_us,
    decode_command,
    n_request,
)
from router.kernel.operation import DimseRequest
from router.kernel.settings import Config
from router.kernel.spool import Spool, new_id
from router.kernel.status import Status
from router.services.identifiers import encode
from router.services.mpps import MppsRelay
from router.services.mpps_delivery import Verdict, verdict_of
from router.services.mpps_hold import HeldMessage, sop_instance_of
from tests.mpps_peer import MPPS, MppsPeer, completed, in_progress
from tests.peers import LOOPBACK, free_port, wait_until

EXPLICIT_LE = "1.2.840.10008.1.2.1"


class RecordingCaller:
    """The modality's side as the relay sees it: every answer kept, decoded."""

    calling_ae = "MODALITY"
    peer_ip = LOOPBACK

    def __init__(self) -> None:
        self.answers: list[tuple[dict[int, bytes], bytes | None]] = []

    def respond(self, context_id: int, command: bytes, dataset: bytes | None = None) -> bool:
        self.answers.append((decode_command(command), dataset))
        return True


def request(command_field: int, uid: str, message_id: int = 1, dataset: bytes | None = None) -> DimseRequest:
    data = encode(in_progress() if command_field == N_CREATE_RQ else completed(), EXPLICIT_LE) \
        if dataset is None else dataset
    command = decode_command(n_request(command_field, message_id, MPPS, uid, bool(data)))
    return DimseRequest(1, command_field, message_id, command, data, EXPLICIT_LE, MPPS)


@pytest.fixture
def peers():
    started: list[MppsPeer] = []

    def make(name: str, start: bool = True) -> MppsPeer:
        peer = MppsPeer(name.upper())
        started.append(peer)
        return peer.start() if start else peer

    yield make
    for peer in started:
        peer.stop()


@pytest.fixture
def make_relay(tmp_path, redis_conn):
    made: list[MppsRelay] = []

    def make(ports: dict[str, int], min_free_bytes: int = 0, max_attempts: int = 100) -> MppsRelay:
        config = Config.model_validate({
            "router": {"ae_title": "DICOM_ROUTER", "spool_dir": str(tmp_path / "spool")},
            "destinations": {name: {"ae_title": name.upper(), "host": LOOPBACK, "port": port, "connect_timeout": 2}
                             for name, port in ports.items()},
            "rules": [],
            "mpps": {"forward": list(ports), "timeout": 5,
                     "retry": {"max_attempts": max_attempts, "backoff_seconds": [0.1, 0.2], "jitter": 0}},
        })
        relay = MppsRelay(config, Spool(tmp_path / "spool", min_free_bytes=min_free_bytes), redis_conn)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.stop()


def _status(caller: RecordingCaller, index: int = -1) -> int:
    return command_us(caller.answers[index][0], STATUS)


def test_verdicts_of_answers():
    """Success and warnings are taken; from the hold, 0xA7xx and 0x0213 are tried again and a
    duplicate N-CREATE was taken before; everything else (and all of these live) is refused."""
    assert verdict_of(N_CREATE_RQ, 0x0000, False) == Verdict.TAKEN
    assert verdict_of(N_SET_RQ, 0xB000, True) == Verdict.TAKEN
    assert verdict_of(N_SET_RQ, 0x0001, False) == Verdict.TAKEN
    assert verdict_of(N_CREATE_RQ, 0x0111, True) == Verdict.TAKEN
    assert verdict_of(N_CREATE_RQ, 0x0111, False) == Verdict.REFUSED
    assert verdict_of(N_SET_RQ, 0x0111, True) == Verdict.REFUSED
    assert verdict_of(N_SET_RQ, 0xA700, True) == Verdict.TRY_AGAIN
    assert verdict_of(N_SET_RQ, 0x0213, True) == Verdict.TRY_AGAIN
    assert verdict_of(N_SET_RQ, 0xA700, False) == Verdict.REFUSED
    assert verdict_of(N_SET_RQ, 0x0110, True) == Verdict.REFUSED


def test_a_message_waits_behind_its_procedure_steps_held_ones(peers, make_relay):
    """The N-CREATE is held (destination down); once it is up, an N-SET of the same step is
    still held behind it, not sent first, while another step's N-CREATE goes at once;
    delivery then sends the held two in order."""
    pacs = peers("pacs", start=False)
    relay = make_relay({"pacs": pacs.port})
    caller = RecordingCaller()
    relay(caller, request(N_CREATE_RQ, "1.2.3.1"))
    pacs.start()
    relay(caller, request(N_SET_RQ, "1.2.3.1", 2))
    relay(caller, request(N_CREATE_RQ, "1.2.3.2", 3))
    assert [_status(caller, i) for i in range(3)] == [0, 0, 0]
    assert [(m.command, m.sop_instance) for m in pacs.arrived] == [("N-CREATE", "1.2.3.2")]
    assert [sop_instance_of(p) for p in relay.hold.waiting("pacs")] == ["1.2.3.1", "1.2.3.1"]
    relay.start()
    pacs.wait_for(3, timeout=10)
    assert [(m.command, m.sop_instance) for m in pacs.arrived[1:]] == [("N-CREATE", "1.2.3.1"), ("N-SET", "1.2.3.1")]
    wait_until(lambda: not relay.hold.waiting("pacs"), 10, "the hold emptied")


def test_a_transient_refusal_from_the_hold_holds_back_only_its_step(peers, make_relay, redis_conn):
    """Held: step A's N-CREATE and N-SET, step B's N-CREATE. A's N-CREATE is answered 0xA700
    once: B goes on in that pass, A's N-SET waits for its N-CREATE, which is tried again."""
    pacs = peers("pacs", start=False)
    relay = make_relay({"pacs": pacs.port})
    caller = RecordingCaller()
    for message_id, (command, uid) in enumerate([(N_CREATE_RQ, "1.2.4.1"), (N_SET_RQ, "1.2.4.1"),
                                                 (N_CREATE_RQ, "1.2.4.2")], start=1):
        relay(caller, request(command, uid, message_id))
    pacs.answer_next(Status.OUT_OF_RESOURCES)
    pacs.start()
    relay.start()
    arrived = pacs.wait_for(4, timeout=10)
    assert [(m.command, m.sop_instance, m.status) for m in arrived] == [
        ("N-CREATE", "1.2.4.1", 0xA700), ("N-CREATE", "1.2.4.2", 0),
        ("N-CREATE", "1.2.4.1", 0), ("N-SET", "1.2.4.1", 0)]
    wait_until(lambda: not relay.hold.waiting("pacs"), 10, "the hold emptied")
    assert len(pacs.arrived) == 4  # nothing is left that could go twice


def test_a_message_refused_from_the_hold_is_set_aside_and_the_next_go_on(peers, make_relay, redis_conn):
    """An N-CREATE refused for good (0x0110) from the hold is set aside, its journey says
    dead with the status; the N-SET after it is still sent (the destination judges it)."""
    pacs = peers("pacs", start=False)
    relay = make_relay({"pacs": pacs.port})
    caller = RecordingCaller()
    relay(caller, request(N_CREATE_RQ, "1.2.5.1"))
    relay(caller, request(N_SET_RQ, "1.2.5.1", 2))
    pacs.answer_next(Status.PROCESSING_FAILURE)
    pacs.start()
    relay.start()
    arrived = pacs.wait_for(2, timeout=10)
    assert [(m.command, m.status) for m in arrived] == [("N-CREATE", 0x0110), ("N-SET", 0)]
    wait_until(lambda: not relay.hold.waiting("pacs"), 10, "the hold emptied")
    assert relay.hold.refused_count("pacs") == 1
    records = [r for r in history.records(redis_conn, history.find(redis_conn, "1.2.5.1")) if r is not None]
    dead = [s for r in records for s in r.steps if s.step == "dead"]
    assert [(s.destination, s.status) for s in dead] == [("pacs", 0x0110)]


def test_a_duplicate_answer_to_a_held_n_create_counts_as_delivered(peers, make_relay):
    """An N-CREATE sent again from the hold (its first answer was lost) answered 0x0111:
    the destination has it, so it is delivered, not refused."""
    pacs = peers("pacs", start=False)
    relay = make_relay({"pacs": pacs.port})
    relay(RecordingCaller(), request(N_CREATE_RQ, "1.2.6.1"))
    pacs.answer_next(Status.DUPLICATE_SOP_INSTANCE)
    pacs.start()
    relay.start()
    pacs.wait_for(1, timeout=10)
    wait_until(lambda: not relay.hold.waiting("pacs"), 10, "the hold emptied")
    assert relay.hold.refused_count("pacs") == 0


def test_a_full_spool_is_out_of_resources_never_success(peers, make_relay):
    """The destination down and no room to hold the message: 0xA700, nothing kept."""
    pacs = peers("pacs", start=False)
    relay = make_relay({"pacs": pacs.port}, min_free_bytes=1 << 60)
    caller = RecordingCaller()
    relay(caller, request(N_CREATE_RQ, "1.2.7.1"))
    assert _status(caller) == Status.OUT_OF_RESOURCES
    assert b"spool full" in caller.answers[0][0][ERROR_COMMENT]
    assert relay.hold.waiting("pacs") == []


def test_an_n_create_without_uid_gets_one_and_bad_uids_are_refused(peers, make_relay):
    """No Affected SOP Instance UID: the router's, in the answer and upstream. An N-SET
    without Requested SOP Instance UID, or a UID with a path separator: 0x0117, nothing sent."""
    ris = peers("ris")
    relay = make_relay({"ris": ris.port})
    caller = RecordingCaller()
    relay(caller, request(N_CREATE_RQ, ""))
    given = command_ui(caller.answers[0][0], AFFECTED_SOP_INSTANCE_UID)
    assert _status(caller) == 0 and given.startswith("1.2.826.0.1.3680043.8.498.")
    assert [m.sop_instance for m in ris.wait_for(1)] == [given]
    relay(caller, request(N_SET_RQ, ""))
    relay(caller, request(N_SET_RQ, "1.2/../3"))
    assert [_status(caller, i) for i in (1, 2)] == [Status.INVALID_OBJECT_INSTANCE] * 2
    assert len(ris.arrived) == 1


def test_the_answer_data_set_is_encoded_for_the_modality(peers, make_relay):
    """The destination's N-CREATE-RSP Attribute List reaches the modality in its own context's syntax."""
    from router.services.identifiers import decode

    ris = peers("ris")
    relay = make_relay({"ris": ris.port})
    caller = RecordingCaller()
    implicit = "1.2.840.10008.1.2"
    data = encode(in_progress(), implicit)
    command = decode_command(n_request(N_CREATE_RQ, 1, MPPS, "1.2.8.1", True))
    relay(caller, DimseRequest(1, N_CREATE_RQ, 1, command, data, implicit, MPPS))
    assert _status(caller) == 0
    assert decode(caller.answers[0][1], implicit).PerformedProcedureStepStatus == "IN PROGRESS"
    assert ris.wait_for(1)[0].dataset.PerformedProcedureStepID == "PPS-ACC1"


def test_held_messages_of_a_previous_run_are_delivered_at_start(peers, make_relay, tmp_path):
    """The files are the truth: messages held by another process (written straight into the
    hold here) are delivered once a relay starts, in order."""
    pacs = peers("pacs")
    relay = make_relay({"pacs": pacs.port})
    data = encode(in_progress(), EXPLICIT_LE)
    for command in (N_CREATE_RQ, N_SET_RQ):
        relay.hold.hold("pacs", HeldMessage(new_id(), command, MPPS, "1.2.9.1", EXPLICIT_LE, data, "X@1", 0.0))
    relay.start()
    assert [m.command for m in pacs.wait_for(2, timeout=10)] == ["N-CREATE", "N-SET"]


def test_unreachable_destination_is_tried_on_its_schedule(make_relay, caplog):
    """A destination that never comes up keeps its messages held, however many passes
    find it down (never set aside: being down is not the message's fault)."""
    relay = make_relay({"pacs": free_port()}, max_attempts=2)
    relay(RecordingCaller(), request(N_CREATE_RQ, "1.2.10.1"))
    with caplog.at_level(logging.INFO, logger="router.services.mpps_delivery"):
        relay.start()
        wait_until(lambda: caplog.text.count("still not reachable") >= 4, 10, "four passes finding it down")
    assert len(relay.hold.waiting("pacs")) == 1 and relay.hold.refused_count("pacs") == 0
