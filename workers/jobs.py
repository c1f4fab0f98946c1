"""rq job entry points: thin, they only pick the backlog's handler and keep
the job alive while work keeps coming (see router/kernel/dispatch.py)."""

from __future__ import annotations

import time

from router.kernel import keys
from workers import forwarding, routing, runtime

BUDGET = 10.0
"""Seconds one job drains before handing over to a fresh one (rq's timeouts and
fairness between queues of a worker that serves several)."""

IDLE_WAIT = 0.5
"""Seconds a job lingers on an empty backlog for the next burst before it ends."""

PASS = 1.0
"""Seconds of draining between checks whether the backlog wants another association."""


def drain(backlog: str, slot: int = 0) -> int:
    """Drain one backlog (``route`` or ``forward.DEST``) in this worker process.

    Args:
        backlog: the backlog's name.
        slot: 0 for the lead job; a destination with ``max_associations`` N
            gets helper jobs in slots 1..N-1 while its backlog is deeper than
            a batch, each on its own worker process and association.

    Returns:
        How many instances it moved on.
    """
    rt = runtime.current()
    dispatcher = rt.dispatcher
    # Jobs run one at a time in a worker: anything still claimed under this
    # worker's id is a leftover of a job that died; it goes back first.
    queue = dispatcher.backlog(backlog)
    queue.release_own(rt.worker_id)
    destination = keys.destination_of(backlog)
    settings = rt.config.destinations.get(destination) if destination is not None else None
    parallel = settings.max_associations if settings is not None else 1
    started = time.monotonic()
    total = 0
    blocked = False
    try:
        while time.monotonic() - started < BUDGET:
            dispatcher.keep_kick(backlog, rt.worker_id, slot)
            if slot + 1 < parallel and rt.redis.llen(keys.pending(backlog)) > forwarding.batch_size(settings):
                forwarding.call_helper(rt, backlog, slot)  # a deep backlog: call in the next association
            left = min(PASS, BUDGET - (time.monotonic() - started))
            if destination is None:
                moved = routing.drain(rt, budget=left)
            else:
                moved, blocked = forwarding.drain(rt, destination, budget=left, slot=slot, linger=True)
            total += moved
            if blocked or (not moved and not queue.wait_for_work(IDLE_WAIT)):
                dispatcher.release_kick(backlog, look_again=not blocked and slot == 0, slot=slot)
                return total
    except BaseException:
        # rq records the failure; the maintenance loop kicks the backlog again.
        dispatcher.release_kick(backlog, look_again=False, slot=slot)
        raise
    dispatcher.enqueue_drain(backlog, slot)  # budget spent: a fresh job carries on, the kick still held
    return total
