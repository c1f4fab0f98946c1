"""workers/forwarding.py ``drain`` on a real Redis and a real spool.

Why a fake sender is enough here: what these tests prove is drain's decision
for each outcome a send can have (delivered, dead letter, retry on which
schedule, hold, step aside), which is pure logic over Redis and the spool.
The destination is therefore played by :class:`PlayedPeer`, which answers
each C-STORE as the real :class:`workers.sender.Sender` reports it — a
``Sent`` or one of the router's errors. That the real sender raises those
errors for real peers (DCMTK storescp refusing, rejecting, hanging) is
tested in tests/workers/test_sender.py and tests/test_refusals_e2e.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from router.kernel import history, keys, telemetry
from router.kernel.dispatch import QUEUED, RUNNING
from router.kernel.errors import (
    DestinationBusy,
    DestinationTimeout,
    DestinationUnavailable,
    PermanentSendError,
    SendError,
    TransientSendError,
)
from router.kernel.settings import Destination
from router.kernel.status import describe
from workers.forwarding import BATCH, BUSY_PAUSE, batch_size, drain, lift_hold_keep_backoff
from workers.sender import Sent, one_by_one

DEST = "pacs"
NAME = keys.forward(DEST)
SUCCESS = 0x0000
COERCED = 0xB000  # a warning: stored, with coercion
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900
SLOW = 600  # s: the destination's `retry` schedule, far beyond any test
Answer = Callable[[str, int], "int | Exception"]


class PlayedPeer:
    """A stand-in for :class:`workers.sender.Sender` whose destination is played
    by ``answer(sop_instance_uid, nth_time_sent) -> status | exception``.

    A status is returned as ``Sent``; an exception is raised with the
    instance's SOP Instance UID on it, as the real sender does.
    """

    is_open = False

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sent: list[str] = []

    def ready_for(self, paths: list[Path]) -> bool:
        return True

    def prepare(self, paths: list[Path]) -> None:
        pass

    def send(self, path: Path) -> Sent:
        uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        self.sent.append(uid)
        outcome = self.answer(uid, self.sent.count(uid))
        if isinstance(outcome, Exception):
            outcome.sop_instance_uid = uid
            raise outcome
        return Sent(outcome, uid)

    def send_all(self, paths: list[Path]) -> Iterator[Sent | SendError]:
        return one_by_one(self.send, paths)

    def close(self) -> None:
        pass

    def close_if_idle(self) -> None:
        pass


def accept(uid: str, n: int) -> int:
    return SUCCESS


def refuse(uid: str, n: int) -> Exception:
    return TransientSendError(f"{DEST}: {describe(OUT_OF_RESOURCES)}", OUT_OF_RESOURCES)


def unreachable(uid: str, n: int) -> Exception:
    return DestinationUnavailable(f"{DEST}: cannot connect to 127.0.0.1:104: [Errno 111] Connection refused")


def busy(uid: str, n: int) -> Exception:
    return DestinationBusy(f"{DEST}: association rejected by PACS: result 2 (Rejected Transient)")


def hung(uid: str, n: int) -> Exception:
    return DestinationTimeout(f"{DEST}: no answer within 30 s; association aborted")


def config(**destination: object) -> dict:
    """One destination; its `retry` far slower than any test, `instance_retry`
    immediate then slow, so the schedule an instance is put on shows."""
    entry = {
        "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
        "retry": {"max_attempts": 12, "backoff_seconds": [SLOW], "jitter": 0},
        "instance_retry": {"max_attempts": 2, "backoff_seconds": [0, 30], "jitter": 0},
    }
    entry.update(destination)
    return {"destinations": {DEST: entry}, "rules": [{"name": "all", "forward": [DEST]}]}


@pytest.fixture
def forward(make_runtime):
    """``forward(answer, **destination) -> (runtime, peer)``: a Runtime whose sender is a PlayedPeer."""

    def make(answer: Answer, **destination: object):
        peer = PlayedPeer(answer)
        return make_runtime(config(**destination), sender_factory=lambda *_: peer), peer

    return make


def uid_of(spool, spool_id: str) -> str:
    return str(read_file_meta_info(spool.out_path(DEST, spool_id)).MediaStorageSOPInstanceUID)


def dead_record(spool, spool_id: str) -> dict:
    return json.loads((spool.root / "dead" / DEST / f"{spool_id}.json").read_text())


def pending(connection) -> list[str]:
    return [i.decode() for i in connection.lrange(keys.pending(NAME), 0, -1)]


def delayed(connection) -> dict[str, float]:
    return {i.decode(): at for i, at in connection.zrange(keys.delayed(NAME), 0, -1, withscores=True)}


def held_until(connection) -> float | None:
    until = connection.hget(keys.hold(NAME), "until")
    return float(until) if until is not None else None


def test_acknowledged_instances_leave_the_spool_and_the_backlog(forward, queued, spool, connection):
    """Success and warning statuses both deliver: the out/ copy is deleted, the id acknowledged, the evidence kept."""
    ids = queued(3)
    uids = [uid_of(spool, i) for i in ids]
    runtime, peer = forward(lambda uid, n: COERCED if uid == uids[1] else SUCCESS)

    assert drain(runtime, DEST) == (3, False)

    assert peer.sent == uids
    assert spool.ids_in(spool.out_dir(DEST)) == []
    assert runtime.dispatcher.backlog(NAME).known() == set()
    assert connection.hlen(keys.attempts(NAME)) == 0
    assert time.time() - float(connection.hget(keys.health(NAME), "last_ok")) < 5
    assert list(spool.dead_letters()) == [] and not connection.exists(keys.hold(NAME))


def test_a_permanent_refusal_is_a_dead_letter_at_once_with_its_uid_status_and_reason(forward, queued, spool):
    """A PermanentSendError buries the instance at its first try, recording UID, status and reason; the others go."""
    ids = queued(3)
    uids = [uid_of(spool, i) for i in ids]
    received = spool.out_path(DEST, ids[1]).read_bytes()
    reason = f"{DEST}: {describe(MISMATCH)}"
    runtime, peer = forward(lambda uid, n: PermanentSendError(reason, MISMATCH) if uid == uids[1] else SUCCESS)

    assert drain(runtime, DEST) == (2, False)

    assert Counter(peer.sent) == Counter(uids)  # tried once, never again
    record = dead_record(spool, ids[1])
    assert record["sop_instance_uid"] == uids[1]
    assert record["status"] == MISMATCH
    assert record["reason"] == reason == "pacs: 0xA900 Data Set Does Not Match SOP Class"
    assert record["attempts"] == 1
    [letter] = spool.dead_letters(DEST)
    assert letter.path.read_bytes() == received and not letter.unmorphed
    assert spool.ids_in(spool.out_dir(DEST)) == []
    assert runtime.dispatcher.backlog(NAME).known() == set()


def test_a_refusal_while_the_destination_accepted_others_recently_is_on_instance_retry(
        forward, queued, spool, connection):
    """With an acknowledgement on record, a refused instance gets instance_retry's attempts, then is buried; no hold."""
    connection.hset(keys.health(NAME), "last_ok", time.time() - 1)
    ids = queued(2)
    refused = uid_of(spool, ids[0])
    runtime, peer = forward(lambda uid, n: refuse(uid, n) if uid == refused else SUCCESS)

    assert drain(runtime, DEST) == (1, False)

    assert peer.sent.count(refused) == 2  # instance_retry: 2 attempts, the first retry at once
    record = dead_record(spool, ids[0])
    assert record["status"] == OUT_OF_RESOURCES and record["attempts"] == 2
    assert record["reason"] == "pacs: 0xA700 Refused: Out of Resources (after 2 attempts)"
    assert record["sop_instance_uid"] == refused
    assert not connection.exists(keys.hold(NAME))
    assert runtime.dispatcher.backlog(NAME).known() == set()


def test_a_refusal_after_an_acceptance_in_the_same_drain_is_on_instance_retry(forward, queued, spool, connection):
    """An acknowledgement earlier in the same drain is evidence enough: the refusal is the instance's problem."""
    ids = queued(2)
    refused = uid_of(spool, ids[1])
    runtime, peer = forward(lambda uid, n: refuse(uid, n) if uid == refused else SUCCESS)

    assert drain(runtime, DEST) == (1, False)

    assert peer.sent.count(refused) == 2
    assert dead_record(spool, ids[1])["attempts"] == 2
    assert not connection.exists(keys.hold(NAME))


def test_three_new_instances_refused_in_a_row_with_none_accepted_hold_the_destination_and_bury_nothing(
        forward, queued, spool, connection):
    """A destination refusing everything is held on its retry schedule: the refused wait, the rest go back untried."""
    ids = queued(5)
    # One instance_retry attempt would bury at the first refusal: that the
    # refusals are put on the destination's `retry` schedule shows here.
    runtime, peer = forward(refuse, instance_retry={"max_attempts": 1, "backoff_seconds": [0], "jitter": 0})
    before = time.time()

    assert drain(runtime, DEST) == (0, True)

    assert peer.sent == [uid_of(spool, i) for i in ids[:3]]
    assert list(spool.dead_letters()) == []
    assert spool.ids_in(spool.out_dir(DEST)) == ids
    waiting = delayed(connection)
    assert sorted(waiting) == ids[:3] and all(at >= before + SLOW for at in waiting.values())
    assert pending(connection) == ids[3:]
    backlog = runtime.dispatcher.backlog(NAME)
    assert [backlog.attempts(i) for i in ids] == [1, 1, 1, 0, 0]
    assert held_until(connection) >= before + SLOW
    health = connection.hgetall(keys.health(NAME))
    assert b"refusing_since" in health and b"0xA700" in health[b"last_error"]


def test_an_unreachable_destination_is_held_and_every_id_goes_back_untried(forward, queued, spool, connection):
    """DestinationUnavailable holds the destination; every claimed id goes back to the head in order, uncounted."""
    ids = queued(3)
    runtime, peer = forward(unreachable)
    before = time.time()

    assert drain(runtime, DEST) == (0, True)

    assert len(peer.sent) == 1
    assert pending(connection) == ids
    assert connection.hlen(keys.attempts(NAME)) == 0
    assert runtime.dispatcher.backlog(NAME).depth() == {"pending": 3, "delayed": 0, "inflight": 0}
    assert held_until(connection) >= before + SLOW
    assert connection.hget(keys.hold(NAME), "failures") == b"1"
    assert spool.ids_in(spool.out_dir(DEST)) == ids and list(spool.dead_letters()) == []

    assert drain(runtime, DEST) == (0, True)  # still held: not even tried
    assert len(peer.sent) == 1


def test_a_destination_lost_mid_batch_keeps_what_it_acknowledged_and_gives_back_the_rest(
        forward, queued, spool, connection):
    """Instances acknowledged before the destination went away stay delivered; the others go back untried, in order."""
    ids = queued(4)
    first = uid_of(spool, ids[0])
    runtime, peer = forward(lambda uid, n: SUCCESS if uid == first else unreachable(uid, n))

    assert drain(runtime, DEST) == (1, True)

    assert len(peer.sent) == 2
    assert spool.ids_in(spool.out_dir(DEST)) == ids[1:]
    assert pending(connection) == ids[1:]
    assert runtime.dispatcher.backlog(NAME).known() == set(ids[1:])
    assert connection.hlen(keys.attempts(NAME)) == 0


def test_a_hung_destination_charges_the_instance_and_is_held(forward, queued, spool, connection):
    """DestinationTimeout counts one attempt against the instance it hung on, delays it, holds the destination."""
    ids = queued(3)
    uids = [uid_of(spool, i) for i in ids]
    runtime, peer = forward(lambda uid, n: hung(uid, n) if uid == uids[1] else SUCCESS)
    before = time.time()

    assert drain(runtime, DEST) == (1, True)

    assert peer.sent == uids[:2]
    backlog = runtime.dispatcher.backlog(NAME)
    assert backlog.attempts(ids[1]) == 1 and backlog.attempts(ids[2]) == 0
    assert list(delayed(connection)) == [ids[1]]
    assert pending(connection) == [ids[2]]
    assert held_until(connection) >= before + SLOW
    assert spool.ids_in(spool.out_dir(DEST)) == ids[1:] and list(spool.dead_letters()) == []


def test_an_instance_the_destination_hangs_on_at_its_last_attempt_is_a_dead_letter(forward, queued, spool, connection):
    """A timeout on the retry schedule's last attempt buries the instance, and the destination is still held."""
    [spool_id] = queued(1)
    runtime, _ = forward(hung, retry={"max_attempts": 1, "backoff_seconds": [SLOW], "jitter": 0})

    assert drain(runtime, DEST) == (0, True)

    record = dead_record(spool, spool_id)
    assert record["attempts"] == 1 and record["status"] is None
    assert record["reason"] == "pacs: no answer within 30 s; association aborted (after 1 attempts)"
    assert connection.exists(keys.hold(NAME))
    assert runtime.dispatcher.backlog(NAME).known() == set()


def test_a_helper_association_refused_while_the_lead_sends_steps_aside_without_holding(
        forward, queued, connection):
    """DestinationBusy on slot 1 while slot 0 runs marks slot 1 busy for a while; nothing held, ids back untried."""
    ids = queued(3)
    runtime, _ = forward(busy, max_associations=2)
    connection.set(keys.kick(NAME, 0), RUNNING + b"w-lead")

    assert drain(runtime, DEST, slot=1) == (0, True)

    assert 0 < connection.ttl(keys.busy(NAME, 1)) <= BUSY_PAUSE
    assert not connection.exists(keys.hold(NAME))
    assert pending(connection) == ids
    assert connection.hlen(keys.attempts(NAME)) == 0


def _helper_jobs(runtime) -> list[tuple]:
    return [tuple(job.args) for job in runtime.dispatcher.queue(NAME).get_jobs()]


def test_a_lead_that_finds_the_backlog_deeper_than_a_batch_calls_in_the_next_association_once(
        forward, queued, connection):
    """The lead's drain calls in slot 1 as soon as a batch finds more than another batch
    waiting, not a pass later (a burst shorter than a pass would otherwise go over one
    association); once per drain, and only while slot 1 has not stepped aside."""
    ids = queued(3 * BATCH)
    runtime, peer = forward(accept, max_associations=2)
    connection.set(keys.kick(NAME, 0), RUNNING + b"w-lead")

    assert drain(runtime, DEST, slot=0) == (len(ids), False)

    assert _helper_jobs(runtime) == [(NAME, 1)]  # one job, for slot 1, however many batches found it deep
    assert connection.get(keys.kick(NAME, 1)).startswith(QUEUED)
    assert len(peer.sent) == len(ids)  # the lead went on: the helper shares what is left, it takes nothing


@pytest.mark.parametrize("case", ["one association", "shallow backlog", "helper busy", "last slot"])
def test_no_association_is_called_in_when_none_may_or_none_is_needed(forward, queued, connection, case):
    """No helper job: max_associations 1; no more than a batch left after the first;
    slot 1 stepped aside for now; the drain is the destination's last slot."""
    ids = queued(BATCH + 5 if case == "shallow backlog" else 3 * BATCH)
    runtime, _ = forward(accept, max_associations=1 if case == "one association" else 2)
    if case == "helper busy":
        connection.set(keys.busy(NAME, 1), b"1", ex=BUSY_PAUSE)
    slot = 1 if case == "last slot" else 0

    assert drain(runtime, DEST, slot=slot) == (len(ids), False)

    assert _helper_jobs(runtime) == []
    assert not connection.exists(keys.kick(NAME, slot + 1))


@pytest.mark.parametrize("max_instances, expected", [(None, BATCH), (10, BATCH), (100, 100)])
def test_deeper_than_a_batch_means_one_stow_request_for_a_dicomweb_destination(max_instances, expected):
    """The depth that calls in the next association is the batch a drain claims: BATCH
    for C-STORE, one STOW-RS request (max_instances, when more) for DICOMweb. Both
    checks (jobs.drain between drains, forwarding.drain within one) use it. A function of
    the destination's settings alone: nothing crosses a wire."""
    if max_instances is None:
        settings = Destination(ae_title="P", host="127.0.0.1", port=104)
    else:
        settings = Destination(dicomweb={"url": "http://127.0.0.1:1/dicom-web", "max_instances": max_instances})
    assert batch_size(settings) == expected


def test_a_busy_lead_steps_aside_and_does_not_hold_the_destination(forward, queued, connection):
    """DestinationBusy on slot 0, whatever the other slots do: the lead steps aside for
    BUSY_PAUSE (the maintenance loop wakes it after), and the destination is not held."""
    for max_associations in (1, 2):
        connection.flushdb()
        ids = queued(2)
        runtime, _ = forward(busy, max_associations=max_associations)

        assert drain(runtime, DEST, slot=0) == (0, True)

        assert not connection.exists(keys.hold(NAME))
        assert 0 < connection.ttl(keys.busy(NAME, 0)) <= BUSY_PAUSE
        assert pending(connection) == ids


def test_an_unreachable_destination_counts_a_failed_send_and_a_busy_one_none(forward, queued, connection):
    """A connection refused counts one failed send (class unreachable) and a `failed` step in the tried
    instance's journey, though the instance is not charged; "not now" (busy) counts nothing."""
    ids = queued(2)
    runtime, _ = forward(busy)
    drain(runtime, DEST)
    assert telemetry.counters(connection, [DEST]).failed == {}

    runtime, _ = forward(unreachable)
    drain(runtime, DEST)

    assert telemetry.counters(connection, [DEST]).failed == {(DEST, "unreachable"): 1}
    (step,) = [s for s in history.journey(connection, ids[0]) if s.step == history.Kind.FAILED]
    assert step.destination == DEST and "cannot connect" in step.detail
    assert history.journey(connection, ids[1]) == []
    assert connection.hlen(keys.attempts(NAME)) == 0


def test_a_destination_whose_hold_ran_out_is_not_tried_until_a_probe_reached_it(forward, queued, connection):
    """A hold that is over but not yet lifted by a C-ECHO probe (workers/probe.py) still keeps every instance untried."""
    ids = queued(2)
    connection.hset(keys.hold(NAME), mapping={"failures": 3, "until": time.time() - 1})
    runtime, peer = forward(accept)

    assert drain(runtime, DEST) == (0, True)

    assert peer.sent == [] and pending(connection) == ids
    assert connection.hlen(keys.attempts(NAME)) == 0


def test_a_delivery_after_a_probe_lifted_the_hold_ends_it(forward, queued, connection):
    """Once a probe lifted the hold the instances are tried; the first acknowledgement forgets the hold and its failures."""
    queued(2)
    connection.hset(keys.hold(NAME), mapping={"failures": 3, "until": time.time() - 1})
    lift_hold_keep_backoff(connection, NAME)
    runtime, _ = forward(accept)

    assert drain(runtime, DEST) == (2, False)

    assert not connection.exists(keys.hold(NAME))


def test_a_destination_refusing_everything_after_a_probe_reached_it_is_held_one_step_further(
        forward, queued, connection):
    """A lifted hold keeps its back-off steps: refusing every instance again holds it for the next step, not the first."""
    queued(3)
    connection.hset(keys.hold(NAME), mapping={"failures": 1, "until": time.time() - 1})
    lift_hold_keep_backoff(connection, NAME)
    runtime, _ = forward(refuse, retry={"max_attempts": 12, "backoff_seconds": [SLOW, 2 * SLOW], "jitter": 0})
    before = time.time()

    assert drain(runtime, DEST) == (0, True)

    assert connection.hget(keys.hold(NAME), "failures") == b"2"
    assert held_until(connection) >= before + 2 * SLOW


def test_an_id_queued_twice_is_sent_once(forward, queued, dispatcher):
    [spool_id] = queued(1)
    dispatcher.backlog(NAME).push([spool_id])
    runtime, peer = forward(accept)

    assert drain(runtime, DEST) == (1, False)

    assert len(peer.sent) == 1
    assert runtime.dispatcher.backlog(NAME).known() == set()


def test_an_id_whose_out_file_is_gone_is_acknowledged_without_sending(forward, queued, spool, connection):
    """A copy delivered before a crash (or purged) is gone from out/: its id is dropped, nothing is sent."""
    [spool_id] = queued(1)
    spool.remove_delivered(DEST, spool_id)
    runtime, peer = forward(accept)

    assert drain(runtime, DEST) == (0, False)

    assert peer.sent == []
    assert runtime.dispatcher.backlog(NAME).known() == set()
