"""Forwarding: drain one destination's backlog over its reused association.

Three kinds of failure, three answers:

* the destination cannot be reached or refuses the association — nothing is
  wrong with the instances: they go back untried and the whole destination
  backs off (held) per its ``retry.backoff_seconds``, for as long as it
  takes (PRODUCT.md §4.3: a destination down for hours loses nothing);
* a transient failure of one instance (0xA7xx, association lost while it was
  in flight) — it counts against that instance and comes back after a
  backoff with jitter; at ``retry.max_attempts`` it becomes a dead letter;
* a permanent failure (0xA9xx, 0xCxxx, no usable transfer syntax) — a dead
  letter at once, kept on disk and re-triable by ``dicom-router retry``.
"""

from __future__ import annotations

import logging
import random
import time

from router.errors import DestinationUnavailable, PermanentSendError, TransientSendError
from router.settings import RetrySettings
from workers import keys
from workers.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 32
PEEK = 256
SETTLE = 0.2


def jittered(retry: RetrySettings, attempt: int) -> float:
    """The delay before retry ``attempt``, spread by ± ``retry.jitter``."""
    base = retry.delay(attempt)
    return max(0.0, base * (1 + random.uniform(-retry.jitter, retry.jitter)))


def hold_remaining(runtime: Runtime, backlog: str) -> float:
    """Seconds until a held destination may be tried again (0 when not held)."""
    until = runtime.redis.hget(keys.hold(backlog), "until")
    return max(0.0, float(until) - time.time()) if until else 0.0


def _hold(runtime: Runtime, backlog: str, retry: RetrySettings) -> float:
    failures = int(runtime.redis.hincrby(keys.hold(backlog), "failures", 1))
    delay = jittered(retry, failures)
    runtime.redis.hset(keys.hold(backlog), "until", time.time() + delay)
    return delay


def drain(runtime: Runtime, destination: str, budget: float = 10.0) -> tuple[int, bool]:
    """Send pending instances to ``destination`` until none wait or ``budget`` s pass.

    Returns:
        How many instances the destination acknowledged, and whether the
        destination is held (unreachable or misconfigured: stop draining).
    """
    config = runtime.config
    if destination not in config.destinations:
        log.error("forward %s: not a configured destination; its instances stay in the spool", destination)
        return 0, True
    retry = config.destinations[destination].retry
    name = keys.forward(destination)
    if hold_remaining(runtime, name) > 0:
        return 0, True  # the maintenance loop wakes the backlog when the hold ends
    backlog = runtime.dispatcher.backlog(name)
    spool = runtime.spool
    sender = runtime.sender(destination)
    started = time.monotonic()
    delivered = 0
    held_before = runtime.redis.exists(keys.hold(name))
    while time.monotonic() - started < budget:
        ids = backlog.claim(runtime.worker_id, BATCH)
        if not ids:
            return delivered, False
        finished: list[str] = []
        batch = [spool.out_path(destination, i) for i in ids]
        if not sender.ready_for(batch):
            if sender.is_open:
                # Renegotiating mid-burst: a mixed burst brings new (SOP class,
                # transfer syntax) pairs as it arrives; let more of it arrive
                # so that one renegotiation covers them, not one each.
                time.sleep(SETTLE)
            # Offer what everything waiting needs too.
            sender.prepare(batch + [spool.out_path(destination, i) for i in backlog.peek(PEEK)])
        for index, spool_id in enumerate(ids):
            path = spool.out_path(destination, spool_id)
            if not path.exists():
                finished.append(spool_id)  # delivered before a crash, or purged
                continue
            try:
                status = sender.send(path)
            except DestinationUnavailable as exc:
                backlog.ack(runtime.worker_id, finished)
                backlog.give_back(runtime.worker_id, ids[index:])
                delay = _hold(runtime, name, retry)
                log.warning("forward %s: %s; holding %.1f s", destination, exc, delay)
                return delivered, True
            except TransientSendError as exc:
                attempts = backlog.count_attempt(spool_id)
                if attempts >= retry.max_attempts:
                    _bury(runtime, destination, spool_id, f"{exc} (after {attempts} attempts)", attempts)
                    finished.append(spool_id)
                else:
                    delay = jittered(retry, attempts)
                    backlog.delay(runtime.worker_id, spool_id, delay)
                    log.warning("forward %s %s: %s; attempt %d, retry in %.1f s", destination, spool_id, exc, attempts, delay)
                continue
            except PermanentSendError as exc:
                _bury(runtime, destination, spool_id, str(exc), backlog.attempts(spool_id) + 1)
                finished.append(spool_id)
                continue
            spool.delivered(destination, spool_id)
            finished.append(spool_id)
            delivered += 1
            log.debug("forward %s -> %s: 0x%04X", spool_id, destination, status)
        backlog.ack(runtime.worker_id, finished)
        if held_before and delivered:
            runtime.redis.delete(keys.hold(name))
            held_before = False
    return delivered, False


def _bury(runtime: Runtime, destination: str, spool_id: str, reason: str, attempts: int) -> None:
    try:
        runtime.spool.bury(destination, spool_id, reason, attempts)
    except FileNotFoundError:
        return
    log.error("forward %s -> %s: dead letter: %s", spool_id, destination, reason)
