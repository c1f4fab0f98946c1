"""Housekeeping in every worker process, on a background thread.

* heartbeat: while ``alive`` is fresh, this process's claims are its own;
* wake-ups: a backlog whose retries fell due gets a drain job (there is no
  other timer: delayed work is data);
* probes: a held destination whose hold is over is probed with C-ECHO
  (``workers/probe.py``) on a thread of its own, so that a destination that
  takes its whole ``connect_timeout`` to fail never delays the heartbeat or
  the other backlogs; a probe that reaches it drains its backlog at once;
  a destination neither held nor acknowledging instances gets its periodic
  C-ECHO (``echo_interval_seconds``) the same way, to show its health;
* idle associations are released (a storage commitment report that came on
  one meanwhile is answered), and a destination whose commitment reports are
  overdue gets a drain job, which asks again;
* every ``reconcile_interval`` one process (a Redis lock decides which)
  reconciles the spool with Redis.
"""

from __future__ import annotations

import logging
import threading
import time

from redis.exceptions import RedisError

from router.kernel import keys, telemetry
from workers import commitment_to_destinations
from workers.forwarding import held_until
from workers.probe import checkup, probe
from workers.reconcile import reconcile
from workers.runtime import Runtime

log = logging.getLogger(__name__)

HEARTBEAT_TTL = 15
TICK = 1.0


class Maintenance(threading.Thread):
    """Args:
    runtime: this process's runtime.
    backlogs: the backlogs this process drains (the ones it wakes).
    """

    def __init__(self, runtime: Runtime, backlogs: list[str]) -> None:
        super().__init__(name="maintenance", daemon=True)
        self.runtime = runtime
        self.backlogs = backlogs
        self._stop_event = threading.Event()
        self._next_beat = 0.0
        self._next_reconcile = 0.0
        self._redis_down_logged = False
        self._next_commit_look: dict[str, float] = {}
        self._next_gauge = 0.0
        self._probes: dict[str, threading.Thread] = {}
        self._next_checkup: dict[str, float] = {}

    def stop(self) -> None:
        """Stop, and take this process's heartbeat with it: what it held is
        taken over at once, not when the heartbeat would have expired."""
        self._stop_event.set()
        self.join(timeout=5)
        for thread in list(self._probes.values()):
            thread.join(timeout=1)  # a probe still connecting is a daemon: it dies with the process
        try:
            self.runtime.redis.delete(keys.alive(self.runtime.worker_id))
        except RedisError:
            pass  # Redis is gone: the heartbeat expires with it

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.tick()
                self._redis_down_logged = False
            except RedisError as exc:
                if not self._redis_down_logged:
                    log.warning("Redis unavailable: %s; retrying", exc)
                    self._redis_down_logged = True
            except Exception:  # keep housekeeping alive whatever one tick met
                log.exception("maintenance tick failed")
            self._stop_event.wait(TICK)

    def tick(self) -> None:
        rt = self.runtime
        now = time.monotonic()
        if now >= self._next_beat:
            rt.redis.set(keys.alive(rt.worker_id), b"1", ex=HEARTBEAT_TTL)
            self._next_beat = now + HEARTBEAT_TTL / 3
        for sender in rt.senders():
            sender.close_if_idle()
        if now >= self._next_gauge:
            self._next_gauge = now + telemetry.GAUGE_TTL / 3
            telemetry.associations(rt.redis, "out", sum(s.is_open for s in rt.senders()), rt.worker_id)
        for name in self.backlogs:
            self.wake_if_due(name)
        interval = rt.config.router.reconcile_interval
        if now >= self._next_reconcile:
            self._next_reconcile = now + interval
            rt.spool.sweep_tmp()  # partial files of a process on this host that died
            if rt.redis.set(keys.RECONCILE_LOCK, rt.worker_id.encode(), nx=True, ex=max(1, int(interval))):
                reconcile(rt.spool, rt.dispatcher, list(rt.config.destinations))

    def wake_if_due(self, name: str) -> None:
        """Kick ``name`` when retries are due, or when ids wait and no drain
        job is queued (a job that failed, or one lost with Redis's memory).

        A held destination gets no drain job: once its hold is over it is
        probed, and the probe kicks it when it reaches it. The kick is
        idempotent (at most one queued drain job per backlog).
        """
        rt = self.runtime
        destination = keys.destination_of(name)
        if destination is not None:
            until = held_until(rt.redis, name)
            if until is not None:
                if until <= time.time():
                    self._start_probe(destination)
                return
            self._checkup_if_due(destination)
            if rt.redis.exists(keys.busy(name, 0)):
                return  # its lead association stepped aside for the others
        due = rt.dispatcher.backlog(name).next_due()
        if (due is not None and due <= time.time()) or rt.redis.llen(keys.pending(name)):
            rt.dispatcher.kick(name)
        elif self._commitment_due(destination):
            rt.dispatcher.kick(name)  # the drain asks again (commitment_to_destinations.tend)

    def _commitment_due(self, destination: str | None) -> bool:
        """Whether ``destination`` commits and a transaction of it is overdue (looked at every
        ``commitment_to_destinations.TEND_EVERY`` s: it reads the records)."""
        if destination is None or self.runtime.config.destinations[destination].commitment is None:
            return False
        now = time.monotonic()
        if now < self._next_commit_look.get(destination, 0.0):
            return False
        self._next_commit_look[destination] = now + commitment_to_destinations.TEND_EVERY
        return commitment_to_destinations.due(self.runtime, destination)

    def _checkup_if_due(self, destination: str) -> None:
        """Look, a few times per ``echo_interval_seconds``, whether the destination's periodic
        C-ECHO is due (``probe.checkup`` decides, across processes). A process looks first one
        interval after it started, so that its start costs the destinations no association."""
        interval = self.runtime.config.destinations[destination].echo_interval_seconds
        now = time.monotonic()
        if not interval:
            return
        if destination not in self._next_checkup:  # the first look one interval after this process started
            self._next_checkup[destination] = now + interval
        if now < self._next_checkup[destination]:
            return
        self._next_checkup[destination] = now + max(TICK, interval / 4)
        self._start_probe(destination, self._checkup)

    def _start_probe(self, destination: str, target=None) -> None:
        """Probe ``destination`` (or run ``target`` for it) on a thread, unless this process's
        last probe or check-up of it still runs."""
        running = self._probes.get(destination)
        if running is not None and running.is_alive():
            return
        thread = threading.Thread(target=target or self._probe, args=(destination,), name=f"probe-{destination}",
                                  daemon=True)
        self._probes[destination] = thread
        thread.start()

    def _checkup(self, destination: str) -> None:
        try:
            checkup(self.runtime, destination)
        except RedisError as exc:
            log.warning("health %s: Redis unavailable: %s", destination, exc)
        except Exception:  # the next look checks again; this thread must not die silently
            log.exception("health check of %s failed", destination)

    def _probe(self, destination: str) -> None:
        try:
            if probe(self.runtime, destination):
                self.runtime.dispatcher.kick(keys.forward(destination))
        except RedisError as exc:
            log.warning("probe %s: Redis unavailable: %s", destination, exc)
        except Exception:  # the next tick probes again; this thread must not die silently
            log.exception("probe %s failed", destination)
