"""Is this router alive, and is it ready for work? (PRODUCT.md §7)

Two questions, for probes that restart a process or take it out of service:

* **alive** — the process answers (``/healthz``) or, for processes that serve
  no HTTP, the configuration loads and the spool directory is there
  (``dicom-router health``). Nothing outside the host is asked: a Redis
  outage must not make an orchestrator restart every router.
* **ready** — it can do its work now: Redis answers, the spool takes a file
  (written, fsynced and removed, with at least ``router.min_free_bytes`` free,
  below which the ingest answers 0xA700) and, where the ingest runs, its port
  accepts a connection (``/readyz``, ``dicom-router health --ready``).

Each check says what failed in one line an operator can act on; none names
patient data, and none changes anything but its own temporary file.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import redis
from redis.exceptions import RedisError

from router.kernel.settings import Config, RouterSettings
from router.kernel.spool import Spool

TIMEOUT = 2.0
"""Seconds each check may take (a probe's own timeout is usually a few seconds)."""
_WILDCARD = {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def alive(config: Config) -> list[Check]:
    """What a liveness probe of a process without HTTP asks: only this host's own state
    (the configuration loaded already, or the command exited 1 naming why)."""
    root = config.router.spool_dir
    if root.is_dir():
        return [Check("spool", True, f"{root} is there")]
    if root.exists():
        return [Check("spool", False, f"{root} is not a directory")]
    return [Check("spool", True, f"{root} is not there yet; the first process to start creates it")]


def ready(config: Config, redis_url: str | None, ingest: bool) -> list[Check]:
    """Every check of readiness, in order: Redis, the spool, and (``ingest``) the ingest's port."""
    checks = [redis_reachable(redis_url), spool_writable(config.router)]
    if ingest:
        checks.append(ingest_listening(config.router))
    return checks


def redis_reachable(url: str | None) -> Check:
    if not url:
        return Check("redis", False, "no Redis configured or running (router.redis_url, or `run`'s embedded one)")
    client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    try:
        client.ping()
    except RedisError as exc:
        return Check("redis", False, f"Redis does not answer: {exc}")
    finally:
        client.close()
    return Check("redis", True, "Redis answers")


def spool_writable(settings: RouterSettings) -> Check:
    """A file written, fsynced and removed in the spool's ``tmp/``, and the free space the ingest needs."""
    try:
        spool = Spool(settings.spool_dir, settings.min_free_bytes)
        tmp, fd = spool.open_temp("readiness")
        try:
            os.write(fd, b"ready?")
            os.fdatasync(fd)
        finally:
            spool.discard_temp(tmp, fd)
        if not spool.has_room():
            return Check("spool", False, f"{settings.spool_dir} has less than router.min_free_bytes "
                                         f"({settings.min_free_bytes}) free: C-STOREs are answered 0xA700")
    except OSError as exc:
        return Check("spool", False, f"{settings.spool_dir} cannot be written: {exc}")
    return Check("spool", True, f"{settings.spool_dir} takes a file")


def ingest_listening(settings: RouterSettings) -> Check:
    """A TCP connection to the ingest's port (on loopback when it listens on every address);
    closed at once, which the ingest takes for a port probe."""
    host = settings.host
    if host in _WILDCARD:
        host = "::1" if host == "::" else "127.0.0.1"
    try:
        with socket.create_connection((host, settings.port), timeout=TIMEOUT):
            pass
    except OSError as exc:
        return Check("ingest", False, f"nothing accepts connections on {host}:{settings.port}: {exc}")
    return Check("ingest", True, f"{host}:{settings.port} accepts connections")
