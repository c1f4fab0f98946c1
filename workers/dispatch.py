"""The one place that enqueues: push spool ids onto a backlog and make sure
an rq drain job will take them.

At most one drain job per backlog waits in its rq queue at a time (the
``kick`` key); a running drain job clears the key when it starts, so ids
pushed while it runs schedule the next one. Nothing is lost if a kick is:
the periodic reconciliation re-pushes and re-kicks anything on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from rq import Queue

from workers import keys
from workers.backlog import Backlog

DRAIN_JOB = "workers.jobs.drain"
KICK_TTL = 600  # s: a kick whose job vanished (Redis restarted) stops blocking new ones
JOB_TIMEOUT = 3600


class Dispatcher:
    """Enqueue work for the route backlog and the destination backlogs.

    Args:
        connection: a Redis client made with ``decode_responses=False`` (rq needs bytes).
    """

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._queues: dict[str, Queue] = {}
        self._backlogs: dict[str, Backlog] = {}

    def backlog(self, name: str) -> Backlog:
        if name not in self._backlogs:
            self._backlogs[name] = Backlog(self.redis, name)
        return self._backlogs[name]

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(keys.rq_queue(name), connection=self.redis)
        return self._queues[name]

    def submit(self, name: str, ids: Sequence[str]) -> None:
        """Append ``ids`` to backlog ``name`` and wake a drain job for it."""
        self.backlog(name).push(ids)
        self.kick(name)

    def kick(self, name: str) -> None:
        """Make sure a drain job for backlog ``name`` is queued."""
        if self.redis.set(keys.kick(name), b"1", nx=True, ex=KICK_TTL):
            self.queue(name).enqueue(DRAIN_JOB, name, job_timeout=JOB_TIMEOUT, result_ttl=0, failure_ttl=86400)
