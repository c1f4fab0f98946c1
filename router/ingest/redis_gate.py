"""Hand a spooled instance to Redis without letting Redis slow or fail ingest.

The ingest answers a C-STORE once the instance is durable in the spool (docs/guarantees.md, G1); queueing
it for routing comes after and may fail without losing anything, because the
reconciler re-queues whatever sits in ``incoming/`` (docs/guarantees.md, G3).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydicom import Dataset

from redis.exceptions import RedisError

from router.kernel import history, keys, telemetry
from router.kernel.dispatch import Dispatcher

log = logging.getLogger(__name__)


class RedisGate:
    """Skips Redis for a while after it failed, so a dead Redis cannot slow ingest.

    Instances received meanwhile stay in ``incoming/``; the reconciler queues them.
    """

    def __init__(self, pause: float = 5.0) -> None:
        self.pause = pause
        self._closed_until = 0.0

    def open(self) -> bool:
        return time.monotonic() >= self._closed_until

    def failed(self) -> None:
        self._closed_until = time.monotonic() + self.pause


@dataclass(frozen=True)
class Route:
    """Where the ingest routed an instance itself, before answering (``router.route_at_ingest``):
    the rules sent it, untouched, to ``destinations``, in whose ``out/`` folders it was made durable."""

    destinations: tuple[str, ...]
    decision: object
    """The rules' decision (``rules.matcher.Decision``), for the instance's history."""
    header: Dataset
    """Its elements before Pixel Data: the identifiers it is found by."""


@dataclass(frozen=True)
class Received:
    """An instance the ingest made durable and answered Success: in ``incoming/``, or
    already in its destinations' ``out/`` folders when ``route`` says so."""

    spool_id: str
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    calling_ae: str = ""
    peer_ip: str = ""
    at: float = 0.0
    """When it was made durable (epoch seconds); 0: now."""
    route: Route | None = None

    def record(self, pipe: object) -> None:
        """Its receipt: the history's first step and the received counters."""
        history.received(pipe, self.spool_id, self.sop_instance_uid, self.sop_class_uid,
                         f"{self.calling_ae}@{self.peer_ip}", at=self.at or None)
        telemetry.count_received(pipe, self.calling_ae)


def queue_for_routing(dispatcher: Dispatcher, gate: RedisGate, received: Received) -> None:
    """Push the instance onto the route backlog, unless Redis failed a moment ago,
    and record its receipt (its history, the counters) in the same round trip.

    Never raises for Redis trouble: the instance is already durable (and
    without a recorded receipt a commitment request for it fails, which is
    the safe side).
    """
    if not gate.open():
        return
    try:
        dispatcher.submit(keys.ROUTE, [received.spool_id], also=received.record)
    except RedisError as exc:
        gate.failed()
        log.warning("Redis unavailable (%s): %s stays in the spool for the reconciler", exc, received.spool_id)
