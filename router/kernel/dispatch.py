"""The one place that enqueues: push spool ids onto a backlog and make sure
an rq drain job will take them.

The ``kick`` key of a backlog is held from the moment a drain job is queued
until that job (or the continuation it queues) has found the backlog empty
for a moment and let go: during a burst one rq job does all the work,
instead of one job per batch (an rq job costs ~3.5 ms of bookkeeping).
A job lets go by deleting the key and then looking once more, so ids pushed
in between are never stranded; and should a kick be lost with Redis's
memory, the maintenance loop re-kicks any backlog with waiting ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import redis
from redis.client import Pipeline
from rq import Queue

from router.kernel import keys
from router.kernel.backlog import Backlog

KICK_TTL = 600  # s: a kick whose job vanished (Redis restarted) stops blocking new ones
QUEUED = b"queued:"
RUNNING = b"running:"
LOST_AFTER = 5.0
"""Seconds after which a kick still marked queued, with no job left in its rq
queue, is taken to be lost: the worker that popped the job died before it ran."""

# Take the kick of a backlog when nobody holds it; when its holder is a job
# whose worker's heartbeat (ARGV[4] .. worker id) has expired; or when it is
# marked queued (at ARGV[6] - its age) for more than ARGV[7] s while its rq
# queue (KEYS[2]) is empty: a job popped by a worker that died at once.
# KEYS: kick, rq queue. ARGV: queued marker, ttl, running prefix, alive key
# prefix, queued prefix, now, lost after.
_TAKE_KICK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
local holder = redis.call('GET', KEYS[1])
if not holder then return 0 end
if string.sub(holder, 1, #ARGV[3]) == ARGV[3] then
  local worker = string.sub(holder, #ARGV[3] + 1)
  if redis.call('EXISTS', ARGV[4] .. worker) == 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
  end
elseif string.sub(holder, 1, #ARGV[5]) == ARGV[5] then
  local since = tonumber(string.sub(holder, #ARGV[5] + 1)) or 0
  if redis.call('LLEN', KEYS[2]) == 0 and tonumber(ARGV[6]) - since > tonumber(ARGV[7]) then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
  end
end
return 0
"""


def _queued() -> bytes:
    """The kick's value while a drain job waits in its rq queue: when it was queued."""
    return QUEUED + repr(time.time()).encode()
JOB_TIMEOUT = 3600


class Dispatcher:
    """Enqueue work for the route backlog and the destination backlogs.

    Args:
        connection: a Redis client made with ``decode_responses=False`` (rq needs bytes).
        drain_job: the import path of the rq job function that drains a backlog,
            called with the backlog's name and slot; whoever builds the
            dispatcher names it, the kernel knows no job of the boxes above it.
    """

    def __init__(self, connection: redis.Redis, drain_job: str) -> None:
        self.redis = connection
        self.drain_job = drain_job
        self._take_kick = connection.register_script(_TAKE_KICK)
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

    def submit(self, name: str, ids: Sequence[str], also: Callable[[Pipeline], object] | None = None) -> None:
        """Append ``ids`` to backlog ``name`` and wake a drain job for it (one round trip
        unless a job must be queued).

        Args:
            also: adds more commands to that round trip (the ids' history, counters).
        """
        pipe = self.redis.pipeline(transaction=False)
        if also is not None:
            also(pipe)
        self.submit_many({name: ids}, pipe)

    def submit_many(self, batches: Mapping[str, Sequence[str]], pipe: Pipeline) -> None:
        """Append ids to several backlogs and wake a drain job for each, in ``pipe``'s
        one round trip (after whatever the caller put in it before), unless a job
        must be queued.

        A backlog whose kick is held is left to its holder; a holder that died
        is found by the maintenance loop, which kicks every backlog with
        waiting ids (:meth:`kick`).
        """
        woken = []
        for name, ids in batches.items():
            if ids:
                self.backlog(name).push(ids, pipe)
                pipe.set(keys.kick(name), _queued(), nx=True, ex=KICK_TTL)
                woken.append(name)
        results = pipe.execute()
        kicks = results[len(results) - 2 * len(woken):][1::2]  # each backlog: RPUSH, then SET NX
        for name, took in zip(woken, kicks):
            if took:
                self.enqueue_drain(name)

    def submit_all(self, batches: Mapping[str, Sequence[str]]) -> None:
        """Append ids to several backlogs in one round trip, then make sure a drain
        job takes each (a dead worker's kick is taken over, see :meth:`kick`)."""
        pipe = self.redis.pipeline(transaction=False)
        for name, ids in batches.items():
            self.backlog(name).push(ids, pipe)
        pipe.execute()
        for name, ids in batches.items():
            if ids:
                self.kick(name)

    def kick(self, name: str, slot: int = 0) -> None:
        """Make sure a drain job for backlog ``name`` is queued or running.

        A kick held by a job whose worker process died (its heartbeat
        expired), or by a job a dying worker took from the queue and never
        ran, is taken over, so a ``kill -9`` cannot stall a backlog.
        """
        taken = self._take_kick(
            keys=[keys.kick(name, slot), self.queue(name).key],
            args=[_queued(), KICK_TTL, RUNNING, keys.alive(""), QUEUED, time.time(), LOST_AFTER],
        )
        if taken:
            self.enqueue_drain(name, slot)

    def enqueue_drain(self, name: str, slot: int = 0) -> None:
        """Queue a drain job for ``name`` (the caller holds its kick)."""
        self.queue(name).enqueue(self.drain_job, name, slot, job_timeout=JOB_TIMEOUT, result_ttl=0, failure_ttl=86400)

    def keep_kick(self, name: str, worker_id: str, slot: int = 0) -> None:
        """A running drain job renews its hold, naming its worker (re-taking it
        if Redis lost it)."""
        self.redis.set(keys.kick(name, slot), RUNNING + worker_id.encode(), ex=KICK_TTL)

    def release_kick(self, name: str, look_again: bool = True, slot: int = 0) -> None:
        """A drain job lets go of ``name``; ids pushed meanwhile get a new job.

        Args:
            look_again: False when the job stopped because the destination is
                held: the maintenance loop wakes it when the hold ends.
        """
        self.redis.delete(keys.kick(name, slot))
        if look_again and self.redis.llen(keys.pending(name)):
            self.kick(name)  # the lead slot: it calls in helpers again if needed
