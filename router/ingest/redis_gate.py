"""Hand a spooled instance to Redis without letting Redis slow or fail ingest.

The ingest answers a C-STORE once the instance is durable in the spool (docs/guarantees.md, G1); queueing
it for routing comes after and may fail without losing anything, because the
reconciler re-queues whatever sits in ``incoming/`` (docs/guarantees.md, G3).
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from router.kernel import keys
from router.kernel.dispatch import Dispatcher
from router.kernel.handoff import Received, RedisGate

log = logging.getLogger(__name__)


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
