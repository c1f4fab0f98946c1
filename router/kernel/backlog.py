"""A backlog: the Redis side of one queue of spool ids, with claim/ack/delay.

One rq job per instance would cap the router far below one association
(rq's per-job bookkeeping costs ~3.5 ms; see docs/measurements.md), so
instances wait in a plain Redis list and an rq *drain* job takes them in
batches. Claims are recorded per worker process so that a process killed
mid-batch gives its instances back (see :meth:`Backlog.release_abandoned`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import redis

from router.kernel import keys

LEASE = 900.0
"""Seconds a claim may last before even a live worker is presumed stuck on it."""

# Move delayed ids that are due (score <= ARGV[2]) to the tail of the
# pending list, then pop up to ARGV[1] ids and record them as claimed by this
# worker, atomically: an id is always in exactly one of the structures.
# KEYS: pending, inflight hash, delayed zset.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2], 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('RPUSH', KEYS[1], id)
end
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then return {} end
for _, id in ipairs(ids) do redis.call('HSET', KEYS[2], id, ARGV[2]) end
return ids
"""


class Backlog:
    """The pending, delayed and in-flight spool ids of one queue.

    Args:
        connection: a Redis client.
        name: ``keys.ROUTE`` or ``keys.forward(destination)``.
    """

    def __init__(self, connection: redis.Redis, name: str) -> None:
        self.redis = connection
        self.name = name
        self._claim = connection.register_script(_CLAIM)

    def push(self, ids: Sequence[str], pipe: redis.client.Pipeline | None = None) -> None:
        """Append ids to the pending list (in a caller's pipeline when given), and wake a
        drain waiting for work (:meth:`wait_for_work`)."""
        if ids:
            own = pipe is None
            pipe = self.redis.pipeline(transaction=False) if own else pipe
            pipe.rpush(keys.pending(self.name), *ids)
            pipe.rpush(keys.wake(self.name), b"1")
            pipe.ltrim(keys.wake(self.name), 0, 0)
            if own:
                pipe.execute()

    def claim(self, worker_id: str, count: int, pipe: redis.client.Pipeline | None = None) -> list[str]:
        """Take up to ``count`` ids for ``worker_id`` (one round trip); due retries join the
        line behind the ids already waiting, so one instance retried again and again
        never holds back new ones.

        Args:
            pipe: claim in the caller's pipeline instead: the ids are its
                last result (:func:`claimed`), and this returns [].
        """
        ids = self._claim(
            keys=[keys.pending(self.name), keys.inflight(self.name, worker_id), keys.delayed(self.name)],
            args=[count, time.time()],
            client=pipe,
        )
        return [] if pipe is not None else _decoded(ids)

    def ack(self, worker_id: str, ids: Iterable[str], pipe: redis.client.Pipeline | None = None) -> None:
        """Forget ids that are finished (delivered, dead-lettered or vanished), in the
        caller's pipeline when given."""
        ids = list(ids)
        if ids:
            own = pipe is None
            pipe = self.redis.pipeline(transaction=False) if own else pipe
            pipe.hdel(keys.inflight(self.name, worker_id), *ids)
            pipe.hdel(keys.attempts(self.name), *ids)
            if own:
                pipe.execute()

    def give_back(self, worker_id: str, ids: Sequence[str]) -> None:
        """Return claimed ids, untried, to the head of the pending list (order kept)."""
        if ids:
            pipe = self.redis.pipeline(transaction=True)
            pipe.lpush(keys.pending(self.name), *reversed(ids))
            pipe.hdel(keys.inflight(self.name, worker_id), *ids)
            pipe.execute()

    def delay(self, worker_id: str, spool_id: str, seconds: float) -> None:
        """Schedule a claimed id to come back after ``seconds``."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(keys.delayed(self.name), {spool_id: time.time() + seconds})
        pipe.hdel(keys.inflight(self.name, worker_id), spool_id)
        pipe.execute()

    def count_attempt(self, spool_id: str) -> int:
        """Record one more failed attempt for ``spool_id``; returns the total."""
        return int(self.redis.hincrby(keys.attempts(self.name), spool_id, 1))

    def attempts(self, spool_id: str) -> int:
        return int(self.redis.hget(keys.attempts(self.name), spool_id) or 0)

    def peek(self, count: int) -> list[str]:
        """The first ``count`` pending ids, left in place."""
        return _decoded(self.redis.lrange(keys.pending(self.name), 0, count - 1))

    def wait_for_work(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for pending ids or a due retry; True if there is work.

        Blocks in Redis on the wake token :meth:`push` leaves (BLPOP), not in
        a polling loop: an idle drain costs nothing, and a new id is seen at once.
        """
        deadline = time.monotonic() + timeout
        while True:
            pipe = self.redis.pipeline(transaction=False)
            pipe.llen(keys.pending(self.name))
            pipe.zrange(keys.delayed(self.name), 0, 0, withscores=True)
            pending, first = pipe.execute()
            now = time.time()
            due = first[0][1] if first else None
            if pending or (due is not None and due <= now):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if due is not None:
                left = min(left, due - now)
            self.redis.blpop([keys.wake(self.name)], timeout=max(0.01, round(left, 3)))

    def next_due(self) -> float | None:
        """When the earliest delayed id is due (epoch seconds), or None."""
        first = self.redis.zrange(keys.delayed(self.name), 0, 0, withscores=True)
        return first[0][1] if first else None

    def depth(self) -> dict[str, int]:
        """How many ids wait, are delayed and are in flight."""
        inflight = sum(
            self.redis.hlen(k) for k in self.redis.scan_iter(keys.inflight_pattern(self.name), count=100)
        )
        return {
            "pending": int(self.redis.llen(keys.pending(self.name))),
            "delayed": int(self.redis.zcard(keys.delayed(self.name))),
            "inflight": inflight,
        }

    def known(self) -> set[str]:
        """Every id Redis holds for this backlog, in any state."""
        found: set[str] = set()
        found.update(self.redis.lrange(keys.pending(self.name), 0, -1))
        found.update(self.redis.zrange(keys.delayed(self.name), 0, -1))
        for key in self.redis.scan_iter(keys.inflight_pattern(self.name), count=100):
            found.update(self.redis.hkeys(key))
        return set(_decoded(found))

    def release_own(self, worker_id: str) -> int:
        """Give back what this worker claimed and left unfinished (a job that died).

        A worker drains one backlog at a time, so at the start of a drain
        anything still claimed under its id is a leftover.
        """
        ids = _decoded(self.redis.hkeys(keys.inflight(self.name, worker_id)))
        self.give_back(worker_id, ids)
        return len(ids)

    def release_abandoned(self, lease: float = LEASE) -> int:
        """Give back ids claimed by worker processes whose heartbeat has expired,
        and ids any worker has held longer than ``lease`` seconds.

        Returns:
            How many ids went back to the pending list.
        """
        released = 0
        prefix = keys.inflight(self.name, "")
        oldest = time.time() - lease
        for key in list(self.redis.scan_iter(keys.inflight_pattern(self.name), count=100)):
            worker_id = _decoded([key])[0][len(prefix) :]
            claims = dict(zip(_decoded(raw := self.redis.hgetall(key)), map(float, raw.values())))
            if self.redis.exists(keys.alive(worker_id)):
                stale = [i for i, claimed in claims.items() if claimed < oldest]
            else:
                stale = list(claims)
            self.give_back(worker_id, stale)
            released += len(stale)
        return released


def claimed(result: object) -> list[str]:
    """The ids a :meth:`Backlog.claim` made in a pipeline took, from its result."""
    return _decoded(result or [])


def _decoded(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]
