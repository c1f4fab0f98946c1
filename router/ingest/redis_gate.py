"""Hand a spooled instance to Redis without letting Redis slow or fail ingest.

The ingest answers a C-STORE once the instance is durable in the spool (docs/guarantees.md, G1); queueing
it for routing comes after and may fail without losing anything, because the
reconciler re-queues whatever sits in ``incoming/`` (docs/guarantees.md, G3).
"""

from __future__ import annotations

import logging
import time

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


def queue_for_routing(dispatcher: Dispatcher, gate: RedisGate, spool_id: str,
                      sop_instance_uid: str = "", sop_class_uid: str = "", calling_ae: str = "",
                      peer_ip: str = "") -> None:
    """Push ``spool_id`` onto the route backlog, unless Redis failed a moment ago,
    and record its receipt (its history, the counters) in the same round trip.

    Never raises for Redis trouble: the instance is already durable (and
    without a recorded receipt a commitment request for it fails, which is
    the safe side).
    """
    if not gate.open():
        return
    source = f"{calling_ae}@{peer_ip}"

    def record(pipe: object) -> None:
        history.received(pipe, spool_id, sop_instance_uid, sop_class_uid, source)
        telemetry.count_received(pipe, calling_ae)

    try:
        dispatcher.submit(keys.ROUTE, [spool_id], also=record)
    except RedisError as exc:
        gate.failed()
        log.warning("Redis unavailable (%s): %s stays in the spool for the reconciler", exc, spool_id)
