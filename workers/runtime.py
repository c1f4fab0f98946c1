"""What a worker process holds between jobs: settings, spool, Redis, senders.

rq jobs are plain functions; a worker process builds one :class:`Runtime`
from its settings at start and installs it, and every job it runs uses that
one. The association pool therefore outlives single jobs (docs/guarantees.md, "Association reuse":
consecutive instances travel over one association).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from router.kernel import telemetry
from router.kernel.commitment.to_destinations import Transactions
from router.kernel.dispatch import Dispatcher
from router.kernel.settings import Config, Destination
from router.kernel.spool import Spool
from rules.context import MorphContext
from rules.reload import ConfigWatcher
from workers.sender import Sender
from workers.stow import StowSender

log = logging.getLogger(__name__)

DRAIN_JOB = "workers.jobs.drain"
"""The rq job that drains a backlog (:func:`workers.jobs.drain`), by the import
path rq calls it by: what every :class:`Dispatcher` of the router queues."""


def redis_client(url: str) -> redis.Redis:
    """A Redis client for queues (bytes, as rq requires), failing fast when Redis is gone."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


def make_sender(name: str, destination: Destination, calling_ae_title: str) -> Sender | StowSender:
    """The sender a destination needs: STOW-RS for ``dicomweb``, C-STORE otherwise."""
    if destination.dicomweb is not None:
        return StowSender(name, destination, calling_ae_title)
    return Sender(name, destination, calling_ae_title)


@dataclass
class Runtime:
    config: Config
    redis: redis.Redis
    spool: Spool
    dispatcher: Dispatcher
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    watcher: ConfigWatcher[Config] | None = None
    sender_factory: Callable[[str, Destination, str], Sender | StowSender] = make_sender
    """Makes the sender toward a destination from (name, settings, calling AE title):
    the real one (:func:`make_sender`), or in a unit test one that plays the peer."""
    _senders: dict[str, Sender | StowSender] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _routing: Config | None = None
    _refused_generation: int = 0
    _morph: tuple[Config, MorphContext] | None = None
    _reload_seen: tuple[int, str] | None = None

    @classmethod
    def build(cls, config: Config, redis_url: str, config_path: Path | None = None) -> Runtime:
        """Args:
        config: the validated configuration this process starts with.
        redis_url: the queues' Redis.
        config_path: its file; when given, rules are reloaded from it on change (hot reload).
        """
        connection = redis_client(redis_url)
        watcher = None
        if config_path is not None:
            base = Path(config_path).resolve().parent
            watcher = ConfigWatcher(Path(config_path), Config, finish=lambda c: c.relative_to(base))
        return cls(
            config=config,
            redis=connection,
            spool=Spool(config.router.spool_dir, config.router.min_free_bytes),
            dispatcher=Dispatcher(connection, DRAIN_JOB),
            watcher=watcher,
        )

    def routing_config(self) -> Config:
        """The configuration to take rules from now: the file's last valid version, when watched.

        An invalid edit keeps the running rules (:class:`rules.reload.ConfigWatcher`
        logs why). A version that adds destinations is not taken either: this
        process and its siblings have no sender or forwarding worker for them
        until the router is restarted, so instances would wait in the spool.
        """
        if self.watcher is None:
            return self.config
        latest = self.watcher.current()
        self._publish_reload()
        if latest is self._routing:
            return latest
        added = sorted(set(latest.destinations) - set(self.config.destinations))
        if added:
            if self._refused_generation != self.watcher.generation:
                self._refused_generation = self.watcher.generation
                log.warning(
                    "config %s (generation %s) adds destinations %s: restart the router to use them; "
                    "keeping the running rules", self.watcher.path, self.watcher.generation, ", ".join(added),
                )
            return self._routing or self.config
        self._routing = latest
        return latest

    def _publish_reload(self) -> None:
        """Tell the dashboard how the last reload went, once per change (``router.kernel.telemetry``)."""
        assert self.watcher is not None
        error = str(self.watcher.last_error or "")
        seen = (self.watcher.generation, error)
        if seen == self._reload_seen:
            return
        message = (f"invalid, running rules kept: {error}" if error
                   else f"generation {self.watcher.generation} loaded")
        try:
            telemetry.reload_result(self.redis, self.watcher.generation, not error, message)
        except redis.RedisError:
            return  # told at the next call
        self._reload_seen = seen

    def morph_context(self, config: Config) -> MorphContext:
        """The morph secret of ``config``'s ``deid`` section, read once per configuration
        (a reload may change it)."""
        if self._morph is None or self._morph[0] is not config:
            self._morph = (config, MorphContext.from_config(config))
        return self._morph[1]

    @property
    def transactions(self) -> Transactions:
        """The storage commitment transactions in this spool (stateless: the records are on disk)."""
        return Transactions(self.spool)

    def sender(self, destination: str) -> Sender | StowSender:
        """This process's sender toward ``destination`` (created on first use)."""
        with self._lock:
            if destination not in self._senders:
                self._senders[destination] = self.sender_factory(
                    destination, self.config.destinations[destination], self.config.router.ae_title
                )
            return self._senders[destination]

    def senders(self) -> list[Sender | StowSender]:
        with self._lock:
            return list(self._senders.values())

    def close(self) -> None:
        for sender in self.senders():
            sender.close()


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    """Make ``runtime`` the one this process's jobs use."""
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("no worker runtime installed: jobs run only inside `dicom-router worker`")
    return _current
