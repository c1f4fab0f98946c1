"""rq job entry points: thin, they only pick the backlog's handler."""

from __future__ import annotations

from workers import forwarding, keys, routing, runtime


def drain(backlog: str) -> int:
    """Drain one backlog (``route`` or ``forward.DEST``) in this worker process.

    Returns:
        How many instances it moved on.
    """
    rt = runtime.current()
    # Cleared before work starts: ids pushed from now on schedule a new job.
    rt.redis.delete(keys.kick(backlog))
    # Jobs run one at a time in a worker: anything still claimed under this
    # worker's id is a leftover of a job that died; it goes back first.
    rt.dispatcher.backlog(backlog).release_own(rt.worker_id)
    destination = keys.destination_of(backlog)
    if destination is None:
        return routing.drain(rt)
    return forwarding.drain(rt, destination)
