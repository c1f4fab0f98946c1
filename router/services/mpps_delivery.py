"""MPPS messages toward a destination: one exchange, and the delivery of held ones.

:func:`exchange` sends one N-CREATE or N-SET and returns the answer, for the
relay while the modality waits (``router/services/mpps.py``) and for the
:class:`MppsDeliverer`, which sends each destination's held messages
(``router/services/mpps_hold.py``) oldest first on one association, on the
``mpps.retry`` schedule, from one host at a time. Within one SOP Instance UID
a message goes only after the ones before it were answered (PS3.4 F.7.2: an
N-SET before its N-CREATE is refused 0x0112 by the SCP); different procedure
steps do not wait for each other.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import redis

from router.kernel.dimse import ERROR_COMMENT, N_CREATE_RQ, STATUS, command_us, n_request
from router.kernel.errors import DestinationUnavailable, PermanentSendError, TransientSendError
from router.kernel.requestor import RequestedAssociation
from router.kernel.settings import RetrySettings
from router.kernel.status import Category, Status, category, describe
from router.services import mpps_journey as journey
from router.services.mpps_hold import DeliveryLock, HeldMessage, MppsHold, sop_instance_of
from router.services.sources import Peer

log = logging.getLogger(__name__)

POLL = 5.0
"""Seconds between looks at the held folders when nothing wakes the deliverer
(another host of a shared spool may have held messages meanwhile)."""
LOCK_MARGIN = 30.0
"""Seconds the delivery lock outlives the longest exchange it covers."""


@dataclass(frozen=True)
class UpstreamAnswer:
    """A destination's N-CREATE-RSP or N-SET-RSP."""

    status: int
    comment: str
    """Its Error Comment, when it gave one."""
    dataset: bytes | None
    """Its Attribute List, encoded in ``transfer_syntax``."""
    transfer_syntax: str
    seconds: float


class Verdict(StrEnum):
    """What an answer means for the message."""

    TAKEN = "taken"
    TRY_AGAIN = "try again"
    REFUSED = "refused"


def verdict_of(command_field: int, status: int, from_hold: bool) -> Verdict:
    """Success and warnings (PS3.7 Annex C) are taken. From the hold, 0xA7xx and 0x0213
    (resources) are worth another try, and an N-CREATE answered Duplicate SOP
    Instance (0x0111) was taken by an earlier attempt whose answer never came back;
    every other failure is a refusal."""
    kind = category(status)
    if kind in (Category.SUCCESS, Category.WARNING):
        return Verdict.TAKEN
    if from_hold and command_field == N_CREATE_RQ and status == Status.DUPLICATE_SOP_INSTANCE:
        return Verdict.TAKEN
    if from_hold and (kind == Category.TRANSIENT or status == Status.RESOURCE_LIMITATION):
        return Verdict.TRY_AGAIN
    return Verdict.REFUSED


def exchange(assoc: RequestedAssociation, context_id: int, transfer_syntax: str, message: HeldMessage,
             timeout: float) -> UpstreamAnswer:
    """Send ``message`` on ``assoc`` and wait for its answer.

    Raises:
        PermanentSendError: its data set cannot be encoded for the context (nothing sent).
        TransientSendError: the association broke or timed out (closed; the peer may
            have taken the message).
    """
    started = time.monotonic()
    try:
        dataset = message.dataset_in(transfer_syntax)
    except ValueError as exc:  # the parser's words may quote values: not in logs or journeys
        raise PermanentSendError(f"its data set does not re-encode in {transfer_syntax}") from exc
    message_id = assoc.next_message_id()
    command = n_request(message.command_field, message_id, message.sop_class, message.sop_instance,
                        dataset is not None)
    response = assoc.request(context_id, command, message_id, dataset, timeout=timeout)
    status = command_us(response, STATUS)
    if status is None:
        assoc.abort()
        raise TransientSendError(f"{assoc.label}: an answer without a Status")
    comment = response.get(ERROR_COMMENT, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    return UpstreamAnswer(status, comment, response.get(-1) or None, transfer_syntax, time.monotonic() - started)


class MppsDeliverer:
    """Delivers held messages, per destination, on a thread of its own.

    Args:
        peers: the ``mpps.forward`` destinations.
        hold: where their messages are held.
        client: Redis, for the delivery lock, the journeys and the counters.
        retry: ``mpps.retry``: the back-off while a destination cannot be reached
            or asks to be tried later, and the attempts a message gets when its own
            exchange fails (an association lost or timed out with it, 0xA7xx).
        timeout: seconds a destination may take to answer one message.
    """

    def __init__(self, peers: list[Peer], hold: MppsHold, client: redis.Redis, retry: RetrySettings,
                 timeout: float) -> None:
        self.peers = peers
        self.hold = hold
        self.client = client
        self.retry = retry
        self.timeout = timeout
        self._due = {peer.name: 0.0 for peer in peers}
        self._failures = {peer.name: 0 for peer in peers}
        self._attempts: dict[Path, int] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="mpps-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """A message was held: look at the folders now (a destination backing off waits its turn)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            for peer in self.peers:
                if self._stopping.is_set():
                    return
                if self._due[peer.name] <= time.monotonic() and self.hold.waiting(peer.name):
                    try:
                        self._pass(peer)
                    except Exception:  # noqa: BLE001 - a bug must not end delivery for good
                        log.exception("MPPS delivery to %s failed", peer.name)
                        self._back_off(peer.name)
            self._wake.wait(self._next_wait())

    def _next_wait(self) -> float:
        now = time.monotonic()
        return max(0.0, min([POLL] + [due - now for due in self._due.values() if due > now]))

    def _back_off(self, name: str) -> None:
        self._failures[name] += 1
        delay = self.retry.delay(self._failures[name])
        delay *= 1 + random.uniform(-self.retry.jitter, self.retry.jitter)
        self._due[name] = time.monotonic() + delay

    def _pass(self, peer: Peer) -> None:
        """Deliver what ``peer`` holds, if no other host is doing it."""
        lock = DeliveryLock(self.client, peer.name, peer.destination.connect_timeout + self.timeout + LOCK_MARGIN)
        try:
            if not lock.acquire():
                self._due[peer.name] = time.monotonic() + POLL  # another host delivers it
                return
        except redis.RedisError as exc:
            log.warning("MPPS held for %s: not delivered while Redis is unreachable (%s)", peer.name, exc)
            self._back_off(peer.name)
            return
        try:
            done = self._deliver(peer, lock)
        finally:
            lock.release()
        if done:
            self._failures[peer.name] = 0
            self._due[peer.name] = 0.0
        else:
            self._back_off(peer.name)

    def _deliver(self, peer: Peer, lock: DeliveryLock) -> bool:
        """One pass over ``peer``'s held messages, oldest first, on one association.

        Returns:
            True when nothing is left to try again (all delivered or set aside).
        """
        name = peer.name
        assoc: RequestedAssociation | None = None
        context_id, syntax = 0, ""
        waiting_uids: set[str] = set()  # a message of theirs is to be tried again: the later ones wait
        try:
            for path in self.hold.waiting(name):
                if self._stopping.is_set():
                    return False
                uid = sop_instance_of(path)
                if uid in waiting_uids:
                    continue
                if not lock.extend():
                    log.warning("MPPS delivery to %s: lock lost; another host may deliver", name)
                    return False
                try:
                    message = self.hold.read(path)
                except FileNotFoundError:
                    continue
                except ValueError as exc:
                    log.error("MPPS held for %s: %s is damaged (%s); set aside", name, path.name, exc)
                    self.hold.set_aside(path, name, f"damaged: {exc}", None)
                    continue
                if assoc is None:
                    try:
                        assoc, context_id, syntax = peer.associate(message.sop_class, self.timeout)
                    except DestinationUnavailable as exc:
                        log.info("MPPS held for %s: still not reachable: %s", name, exc)
                        return False
                    except PermanentSendError as exc:
                        log.error("MPPS held for %s: %s", name, exc)
                        return False
                try:
                    answer = exchange(assoc, context_id, syntax, message, self.timeout)
                except PermanentSendError as exc:
                    self._set_aside(path, name, message, None, str(exc))
                    continue
                except TransientSendError as exc:
                    assoc = None  # it closed itself
                    if not self._charge(path, name, message, None, str(exc)):
                        waiting_uids.add(uid)
                    return False
                verdict = verdict_of(message.command_field, answer.status, from_hold=True)
                if verdict == Verdict.TAKEN:
                    self.hold.remove_delivered(path)
                    self._attempts.pop(path, None)
                    log.info("MPPS %s %s delivered to %s from the hold: %s", journey.command_name(
                        message.command_field), message.sop_instance, name, describe(answer.status))
                    journey.answered(self.client, message.message_id, name, answer.status, answer.seconds,
                                     live=False)
                elif verdict == Verdict.TRY_AGAIN:
                    if not self._charge(path, name, message, answer.status, describe(answer.status)):
                        waiting_uids.add(uid)
                else:
                    # The status only: an Error Comment is free text that may quote the data set.
                    self._set_aside(path, name, message, answer.status, describe(answer.status))
        finally:
            if assoc is not None:
                assoc.release()
        return not waiting_uids

    def _charge(self, path: Path, name: str, message: HeldMessage, status: int | None, reason: str) -> bool:
        """Count a failed attempt of ``message``; True when that was its last (set aside)."""
        attempts = self._attempts.get(path, 0) + 1
        if attempts >= self.retry.max_attempts:
            self._set_aside(path, name, message, status, f"not taken in {attempts} attempts; last: {reason}")
            return True
        self._attempts[path] = attempts
        log.info("MPPS %s %s not taken by %s (attempt %d): %s", journey.command_name(message.command_field),
                 message.sop_instance, name, attempts, reason)
        journey.held(self.client, message.message_id, name, f"tried from the hold: {reason}; tried again later",
                     status, first=False)
        return False

    def _set_aside(self, path: Path, name: str, message: HeldMessage, status: int | None, reason: str) -> None:
        """Refused for good: out of the way of the messages after it, kept, in the journey."""
        self._attempts.pop(path, None)
        self.hold.set_aside(path, name, reason, status)
        log.warning("MPPS %s %s refused by %s from the hold: %s; set aside, the next go on",
                    journey.command_name(message.command_field), message.sop_instance, name, reason)
        journey.refused(self.client, message.message_id, name, status, f"from the hold: {reason}")
