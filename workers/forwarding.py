"""Forwarding: drain one destination's backlog over its reused association.

Three kinds of failure, three answers:

* the destination cannot be reached or refuses the association — nothing is
  wrong with the instances: they go back untried and the whole destination
  backs off (held) per its ``retry.backoff_seconds``, for as long as it
  takes (docs/guarantees.md, G3: a destination down for hours loses nothing).
  A held destination is not tried with instances again: when its hold is
  over, a C-ECHO probes it (``workers/probe.py``), and only a probe that
  reaches it lifts the hold;
* a transient failure of one instance (0xA7xx, association lost while it was
  in flight) — it counts against that instance and comes back after a
  backoff with jitter. Whose problem it is decides the schedule: while the
  destination accepts other instances (it acknowledged one within
  ``EVIDENCE_FACTOR`` × the longest ``instance_retry`` delay, and has not
  refused everything since), it is the instance's, on the short
  ``instance_retry`` schedule — Orthanc answers 0xA700 to an instance
  without Study or Series Instance UID every time, and that should be a
  dead letter in minutes, not hours. Otherwise it is on the destination's
  ``retry`` schedule; and ``REFUSING_STREAK`` new instances refused in a row
  with none accepted hold the whole destination, as when it is unreachable;
* a permanent failure (0xA9xx, 0xCxxx, no usable transfer syntax, nothing
  that can be transcoded faithfully) — a dead letter at once.

Two more answers concern the destination's capacity: a destination that
takes a request and does not answer within ``store_timeout`` (hung) charges
that instance one attempt on the ``retry`` schedule and is held, instead of
costing the timeout for every instance; one that refuses an association for
now (rejected-transient: it takes fewer than ``max_associations``, or is
busy with other senders) only makes that association slot step aside for
``BUSY_PAUSE`` seconds, while any others carry on.

Dead letters are kept on disk with the SOP Instance UID, the destination's
status and its meaning, and are re-triable by ``dicom-router retry``.
"""

from __future__ import annotations

import logging
import random
import time

import redis

from router.kernel import history, keys, telemetry
from router.kernel.backlog import Backlog, claimed
from router.kernel.commitment.messages import Reference
from router.kernel.errors import (
    DestinationBusy,
    DestinationTimeout,
    DestinationUnavailable,
    PermanentSendError,
    TransientSendError,
)
from router.kernel.health import HOLD_FAILURES, HOLD_UNTIL, LAST_ERROR, LAST_ERROR_AT, LAST_OK, REFUSING_SINCE
from router.kernel.settings import Destination, RetrySettings
from router.kernel.status import describe
from router.kernel.telemetry import FailureClass
from workers import commitment_to_destinations
from workers.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 32
PEEK = 256
SETTLE = 0.2
REFUSING_STREAK = 3
"""New instances refused in a row, none accepted: the destination refuses everything."""
BUSY_PAUSE = 10
"""Seconds an association slot the destination refused for now stays unused."""
EVIDENCE_FACTOR = 2
"""An acknowledgement this many times the longest ``instance_retry`` delay ago
still shows that the destination accepts instances."""


def jittered(retry: RetrySettings, attempt: int) -> float:
    """The delay before retry ``attempt``, spread by ± ``retry.jitter``."""
    base = retry.delay(attempt)
    return max(0.0, base * (1 + random.uniform(-retry.jitter, retry.jitter)))


def held_until(connection: redis.Redis, backlog: str) -> float | None:
    """When a held destination's hold is over (epoch seconds; it may be past:
    the probe is due), or None when it is not held."""
    until = connection.hget(keys.hold(backlog), HOLD_UNTIL)
    return float(until) if until is not None else None


def lift_hold_reset_backoff(connection: redis.Redis, backlog: str) -> bool:
    """Lift a destination's hold and forget its back-off steps: it acknowledged an
    instance again, or an operator said retry, so a next hold starts at the first step.

    Returns:
        True when it was held (or still had back-off steps). The hold is this
        module's state alone.
    """
    return bool(connection.delete(keys.hold(backlog)))


def lift_hold_keep_backoff(connection: redis.Redis, backlog: str) -> None:
    """Lift a destination's hold but keep its back-off steps: a probe reached it,
    so its instances are tried again.

    The steps go only when it acknowledges an instance
    (:func:`lift_hold_reset_backoff`): a destination that answers C-ECHO but
    refuses or hangs on every instance is held again one step further.
    """
    connection.hdel(keys.hold(backlog), HOLD_UNTIL)


def hold(connection: redis.Redis, backlog: str, retry: RetrySettings, why: str | None,
         at_least: float | None = None) -> float:
    """Hold the destination for its next back-off step.

    Args:
        why: the send failure that holds it, recorded as its last error; None
            for a probe, which records its C-ECHO's failure apart.
        at_least: seconds the destination asked for (HTTP ``Retry-After``): the hold is no shorter.

    Returns:
        The delay, in seconds, before it is probed.
    """
    failures = int(connection.hincrby(keys.hold(backlog), HOLD_FAILURES, 1))
    delay = max(jittered(retry, failures), at_least or 0.0)
    now = time.time()
    pipe = connection.pipeline(transaction=False)
    pipe.hset(keys.hold(backlog), HOLD_UNTIL, now + delay)
    if why is not None:
        pipe.hset(keys.health(backlog), mapping={LAST_ERROR: why, LAST_ERROR_AT: now})
    pipe.execute()
    return delay


class _Refusals:
    """Whether a refused instance is the instance's problem or the destination's.

    Reads the destination's health once per drain and keeps it current as
    instances are accepted and refused.
    """

    def __init__(self, runtime: Runtime, backlog: str, settings: Destination) -> None:
        self.redis = runtime.redis
        self.key = keys.health(backlog)
        self.settings = settings
        last_ok, refusing_since = self.redis.hmget(self.key, LAST_OK, REFUSING_SINCE)
        window = EVIDENCE_FACTOR * max(settings.instance_retry.backoff_seconds)
        last_ok_at = float(last_ok or 0)
        self.accepting = time.time() - last_ok_at < window and last_ok_at > float(refusing_since or 0)
        self.streak = 0

    def accepted(self) -> None:
        self.accepting = True
        self.streak = 0

    def record_accepted(self, pipe: redis.client.Pipeline) -> None:
        """Once per batch with deliveries: the evidence the next drains read."""
        pipe.hset(self.key, LAST_OK, time.time())

    def refused(self, attempts: int, why: str) -> RetrySettings:
        """One instance refused (its ``attempts``-th time): the schedule it is on."""
        if attempts == 1:
            self.streak += 1
        if self.streak >= REFUSING_STREAK:
            self.accepting = False
        self.redis.hset(self.key, mapping={LAST_ERROR: why, LAST_ERROR_AT: time.time()})
        return self.settings.instance_retry if self.accepting else self.settings.retry

    @property
    def refusing_everything(self) -> bool:
        return self.streak >= REFUSING_STREAK

    def record_refusing(self) -> None:
        self.redis.hset(self.key, REFUSING_SINCE, time.time())


def drain(runtime: Runtime, destination: str, budget: float = 10.0, slot: int = 0,
          linger: bool = False) -> tuple[int, bool]:
    """Send pending instances to ``destination`` until none wait or ``budget`` s pass.

    Args:
        linger: once none wait, wait for more (blocking in Redis) until the
            budget is spent, rather than return: a job fed a trickle pays
            this drain's setup once, not once per instance.
        slot: which of the destination's ``max_associations`` this drain
            uses (0: the lead; helpers are called in while the backlog is deep).

    Returns:
        How many instances the destination acknowledged, and whether the
        destination is held (unreachable or misconfigured: stop draining).
    """
    config = runtime.config
    if destination not in config.destinations:
        log.error("forward %s: not a configured destination; its instances stay in the spool", destination)
        return 0, True
    settings = config.destinations[destination]
    retry = settings.retry
    name = keys.forward(destination)
    if held_until(runtime.redis, name) is not None:
        # Held, and no probe has reached it since (workers/probe.py): no
        # instance is tried, whether the hold is over or not.
        return 0, True
    backlog = runtime.dispatcher.backlog(name)
    spool = runtime.spool
    sender = runtime.sender(destination)
    started = time.monotonic()
    delivered = 0
    held_before = runtime.redis.exists(keys.hold(name))
    refusals = _Refusals(runtime, name, settings)
    commits = settings.commitment is not None
    if commits:
        commitment_to_destinations.tend(runtime, destination)
    size = batch_size(settings)
    ids = backlog.claim(runtime.worker_id, size)
    # The next association slot may be called in once per drain, when a batch finds the
    # backlog deeper than another batch (jobs.drain looks only between drains: a burst
    # shorter than one would be carried by one association alone).
    may_call_helper = slot + 1 < settings.max_associations
    while ids:
        finished: list[str] = []
        stored: list[tuple[str, Reference]] = []  # to be committed
        times: list[float] = []  # of the C-STOREs acknowledged
        journal = history.Steps(runtime.redis.pipeline(transaction=False))
        delivered_before = delivered
        batch = [spool.out_path(destination, i) for i in ids]
        if not sender.ready_for(batch):
            if sender.is_open:
                # Renegotiating mid-burst: a mixed burst brings new (SOP class,
                # transfer syntax) pairs as it arrives; let more of it arrive
                # so that one renegotiation covers them, not one each.
                time.sleep(SETTLE)
            # Offer what everything waiting needs too.
            sender.prepare(batch + [spool.out_path(destination, i) for i in backlog.peek(PEEK)])
        present = []
        for spool_id in dict.fromkeys(ids):  # an id queued twice is sent once
            if spool.out_path(destination, spool_id).exists():
                present.append(spool_id)
            else:
                finished.append(spool_id)  # delivered before a crash, or purged
        ids = present
        # One outcome per instance, each sent as it is asked for (a DIMSE destination),
        # or a request's worth at a time (STOW-RS): the loop that stops asks for no more.
        outcomes = sender.send_all([spool.out_path(destination, i) for i in ids])
        for index, spool_id in enumerate(ids):
            began = time.perf_counter()
            try:
                outcome = next(outcomes, None)
                if outcome is None:
                    raise TransientSendError(f"{destination}: the sender gave no outcome for {spool_id}")
                if isinstance(outcome, FileNotFoundError):
                    finished.append(spool_id)  # purged, or delivered by another worker, meanwhile
                    continue
                if isinstance(outcome, Exception):
                    raise outcome
                sent = outcome
            except DestinationBusy as exc:
                # "Not now" (rejected-transient, e.g. local limit exceeded): the
                # peer is at capacity, with our other associations or others'.
                # This slot steps aside for a while; the destination is not held.
                _stop_batch(runtime, backlog, finished, ids[index:])
                _after_batch(runtime, destination, journal, stored, times)
                runtime.redis.set(keys.busy(name, slot), b"1", ex=BUSY_PAUSE)
                log.info("forward %s: association %d refused for now (%s); trying it again in %d s",
                         destination, slot + 1, exc, BUSY_PAUSE)
                return delivered, True
            except DestinationUnavailable as exc:
                # The instance is not charged an attempt, but the send failed: counted, so that a
                # destination refusing connections shows among the failures (README, "Metrics").
                _failed(journal, spool_id, destination, FailureClass.UNREACHABLE, exc.status, str(exc))
                _stop_batch(runtime, backlog, finished, ids[index:])
                _after_batch(runtime, destination, journal, stored, times)
                delay = hold(runtime.redis, name, retry, str(exc), exc.retry_after)
                log.warning("forward %s: %s; holding %.1f s", destination, exc, delay)
                return delivered, True
            except DestinationTimeout as exc:
                attempts = backlog.count_attempt(spool_id)
                if attempts >= retry.max_attempts:
                    _bury(runtime, destination, spool_id, exc, f"{exc} (after {attempts} attempts)", attempts)
                    finished.append(spool_id)
                else:
                    backlog.delay(runtime.worker_id, spool_id, jittered(retry, attempts))
                    _failed(journal, spool_id, destination, FailureClass.TIMEOUT, None, str(exc))
                _stop_batch(runtime, backlog, finished, ids[index + 1 :])
                _after_batch(runtime, destination, journal, stored, times)
                delay = hold(runtime.redis, name, retry, str(exc))
                log.warning("forward %s -> %s (%s): %s; attempt %d, holding the destination %.1f s",
                            exc.sop_instance_uid or "?", destination, spool_id, exc, attempts, delay)
                return delivered, True
            except TransientSendError as exc:
                attempts = backlog.count_attempt(spool_id)
                policy = refusals.refused(attempts, str(exc))
                if attempts >= policy.max_attempts:
                    _bury(runtime, destination, spool_id, exc, f"{exc} (after {attempts} attempts)", attempts)
                    finished.append(spool_id)
                else:
                    delay = jittered(policy, attempts)
                    backlog.delay(runtime.worker_id, spool_id, delay)
                    _failed(journal, spool_id, destination, FailureClass.TRANSIENT, exc.status, str(exc))
                    log.warning("forward %s -> %s (%s): %s; attempt %d, retry in %.1f s",
                                exc.sop_instance_uid or "?", destination, spool_id, exc, attempts, delay)
                if refusals.refusing_everything:
                    _stop_batch(runtime, backlog, finished, ids[index + 1 :])
                    _after_batch(runtime, destination, journal, stored, times)
                    refusals.record_refusing()
                    delay = hold(runtime.redis, name, retry, str(exc))
                    log.warning("forward %s: refuses every instance (%s); holding %.1f s", destination, exc, delay)
                    return delivered, True
                continue
            except PermanentSendError as exc:
                _bury(runtime, destination, spool_id, exc, str(exc), backlog.attempts(spool_id) + 1)
                finished.append(spool_id)
                continue
            seconds = sent.seconds if sent.seconds is not None else time.perf_counter() - began
            times.append(seconds)
            history.sent(journal, spool_id, destination, sent.status, seconds, awaiting_commitment=commits)
            if commits:
                spool.move_to_awaiting_commitment(destination, spool_id)
                stored.append((spool_id, Reference(sent.sop_class_uid, sent.sop_instance_uid)))
            else:
                spool.remove_delivered(destination, spool_id)
            finished.append(spool_id)
            delivered += 1
            refusals.accepted()
            log.debug("forward %s -> %s (%s): %s", sent.sop_instance_uid, destination, spool_id, describe(sent.status))
        # One round trip: what the batch did, and the next batch claimed (last).
        telemetry.count_forwarded(journal, destination, times)
        backlog.ack(runtime.worker_id, finished, journal)
        if delivered > delivered_before:
            refusals.record_accepted(journal)
        more = time.monotonic() - started < budget
        journal.flush()
        look = more and may_call_helper
        if look:
            journal.pipe.llen(keys.pending(name))
        if more:
            backlog.claim(runtime.worker_id, size, journal.pipe)
        results = journal.pipe.execute()
        if look and results[-2] > size:
            call_helper(runtime, name, slot)
            may_call_helper = False
        if stored:
            commitment_to_destinations.request(runtime, destination, stored)
        if held_before and delivered:
            lift_hold_reset_backoff(runtime.redis, name)
            held_before = False
        ids = claimed(results[-1]) if more else []
        if not ids and more and linger:
            left = budget - (time.monotonic() - started)
            if left > 0 and backlog.wait_for_work(left):
                ids = backlog.claim(runtime.worker_id, size)
    return delivered, False


def batch_size(settings: Destination) -> int:
    """Instances one batch claims: ``BATCH``, or for a DICOMweb destination one
    STOW-RS request's worth (its ``max_instances``, if that is more). A backlog
    deeper than this calls in the next association (``call_helper``)."""
    return max(BATCH, settings.dicomweb.max_instances) if settings.dicomweb is not None else BATCH


def call_helper(runtime: Runtime, backlog: str, slot: int) -> None:
    """Call in association slot ``slot + 1`` for a deep backlog: queue its drain job,
    unless one is queued or running, or that slot stepped aside for now (the
    destination refused it as busy, ``BUSY_PAUSE``)."""
    if not runtime.redis.exists(keys.busy(backlog, slot + 1)):
        runtime.dispatcher.kick(backlog, slot + 1)


def _after_batch(runtime: Runtime, destination: str, journal: history.Steps,
                 stored: list[tuple[str, Reference]], times: list[float]) -> None:
    """A batch stopped midway: record what it delivered (``times``: its acknowledged
    C-STOREs), and ask for commitment of what it stored."""
    telemetry.count_forwarded(journal, destination, times)
    journal.execute()
    if stored:
        commitment_to_destinations.request(runtime, destination, stored)


def _stop_batch(runtime: Runtime, backlog: Backlog, finished: list[str], untried: list[str]) -> None:
    """Stop a batch midway: forget what is finished, give back what was not tried, in order."""
    backlog.ack(runtime.worker_id, finished)
    backlog.give_back(runtime.worker_id, untried)


def _failed(journal: history.Steps, spool_id: str, destination: str, status_class: FailureClass,
            status: int | None, reason: str) -> None:
    """A send failed and the instance is tried again: counted, and a step of its history."""
    telemetry.count_failed(journal, destination, status_class)
    history.failed(journal, spool_id, destination, status, reason)


def _bury(runtime: Runtime, destination: str, spool_id: str, exc: PermanentSendError | TransientSendError,
          reason: str, attempts: int) -> None:
    try:
        runtime.spool.bury(destination, spool_id, reason, attempts, exc.sop_instance_uid, exc.status)
    except FileNotFoundError:
        return
    pipe = runtime.redis.pipeline(transaction=False)
    status_class = FailureClass.TRANSIENT if isinstance(exc, TransientSendError) else FailureClass.PERMANENT
    telemetry.count_failed(pipe, destination, status_class)
    history.dead(pipe, spool_id, destination, exc.status, reason)
    pipe.execute()
    log.error("forward %s -> %s (%s): dead letter: %s", exc.sop_instance_uid or "?", destination, spool_id, reason)
