"""What the router did, counted and told step by step, in Redis: for metrics, the
dashboard, the API and the CLI.

Every process writes into the same Redis, so counters add up across
processes and survive their restarts (Prometheus reads them through one
collector, ``router/metrics.py``, never from a process's memory).

* **counters**: instances received per calling AE title, forwarded per
  destination, failed per destination and status class, send durations as
  a histogram per destination, rule hits; and per-minute totals kept for
  ``MINUTES_KEPT`` minutes (the dashboard's chart);
* **journeys**: each step of an instance's way — received from whom, rules
  matched and what was morphed, sent to each destination with its status,
  committed — a short list per spool id, expiring after ``RETENTION``; a
  capped list of recent steps; and an index from SOP, Series and Study
  Instance UID and Accession Number to spool ids.

Identifiers only: UIDs, AE titles, addresses, rule and destination names,
DICOM statuses. Never a patient's name, ID or birth date
(docs/guarantees.md, G6). Writers take a pipeline, so recording costs the
hot path no extra round trip.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from enum import StrEnum

import redis
from redis.client import Pipeline

from router.kernel import keys
from router.kernel.ledger import RETENTION
from router.kernel.spool import id_time

Client = redis.Redis | Pipeline

MINUTES_KEPT = 120
RECENT = 500
"""Steps kept in the list of recent ones."""
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the send duration histogram; +Inf is implied."""
GAUGE_TTL = 60
"""Seconds a process's published gauge (open associations) counts without being refreshed."""

_SEP = "\x1f"  # joins label values in a hash field

# Steps of a journey.
RECEIVED, ROUTED, QUARANTINED, DROPPED = "received", "routed", "quarantined", "dropped"
SENT, FAILED, DEAD = "sent", "failed", "dead"
STORED, COMMITTED, COMMIT_FAILED = "stored", "committed", "commit_failed"
# An operator's action on it (``router/operations.py``), the detail naming who.
RETRIED, PURGED, REROUTED = "retried", "purged", "re-routed"


class FailureClass(StrEnum):
    """Why a send failed: the ``status_class`` label of ``dicom_router_instances_failed_total``."""

    UNREACHABLE = "unreachable"
    """No association: refused, reset, unreachable, TLS refused. The destination is held and the
    instance tried is not charged an attempt. While it is held no instance is tried (its C-ECHO
    probes are not sends): a destination down for hours counts one, then one more each time a
    probe reached it and its instances still found no association."""
    TRANSIENT = "transient"
    """The instance was refused or lost in flight (0xA7xx, association lost): retried."""
    TIMEOUT = "timeout"
    """The destination took the C-STORE and did not answer within ``store_timeout``."""
    PERMANENT = "permanent"
    """Retrying cannot help (0xA9xx, 0xCxxx, no usable transfer syntax): a dead letter."""
    MORPH = "morph"
    """The destination's morph failed at routing: a dead letter before any send."""


def _minute(at: float) -> int:
    return int(at // 60) * 60


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


# -- writing ------------------------------------------------------------------


def step(client: Client, spool_id: str, name: str, *, destination: str = "", status: int | None = None,
         detail: str = "", at: float | None = None) -> None:
    """Add one step to ``spool_id``'s journey and to the recent steps."""
    at = time.time() if at is None else at
    entry = json.dumps({"at": at, "step": name, "destination": destination, "status": status, "detail": detail,
                        "spool_id": spool_id}, separators=(",", ":"))
    key = keys.journey(spool_id)
    client.rpush(key, entry)
    client.expire(key, RETENTION)
    client.lpush(keys.RECENT_STEPS, entry)
    client.ltrim(keys.RECENT_STEPS, 0, RECENT - 1)


def _count_minute(client: Client, what: str, at: float, amount: int = 1) -> None:
    key = keys.minute(_minute(at))
    client.hincrby(key, what, amount)
    client.expire(key, MINUTES_KEPT * 60)


def received(client: Client, spool_id: str, sop_instance_uid: str, calling_ae: str, source: str) -> None:
    """The ingest made an instance durable (``source``: calling AE @ address)."""
    now = time.time()
    client.hincrby(keys.COUNT_RECEIVED, calling_ae or "?", 1)
    _count_minute(client, "received", now)
    index(client, spool_id, [sop_instance_uid], at=now)
    step(client, spool_id, RECEIVED, detail=f"from {source}", at=now)


def index(client: Client, spool_id: str, values: list[str], at: float | None = None) -> None:
    """Make ``spool_id`` findable by these identifiers (UIDs, accession number)."""
    at = time.time() if at is None else at
    for value in values:
        value = value.strip()
        if value:
            key = keys.find(value)
            client.zadd(key, {spool_id: at})
            client.expire(key, RETENTION)


def rule_hits(client: Client, rules: list[str]) -> None:
    for rule in rules:
        client.hincrby(keys.COUNT_RULES, rule, 1)


def forwarded(client: Client, spool_id: str, destination: str, status: int, seconds: float) -> None:
    """``destination`` acknowledged the instance after ``seconds`` (its C-STORE)."""
    now = time.time()
    client.hincrby(keys.COUNT_FORWARDED, destination, 1)
    _count_minute(client, "forwarded", now)
    observe_send(client, destination, seconds)
    step(client, spool_id, SENT, destination=destination, status=status, detail=f"{seconds * 1000:.0f} ms", at=now)


def observe_send(client: Client, destination: str, seconds: float) -> None:
    key = keys.send_seconds(destination)
    bucket = next((b for b in SEND_BUCKETS if seconds <= b), math.inf)
    client.hincrby(key, repr(bucket), 1)
    client.hincrbyfloat(key, "sum", seconds)
    client.hincrby(key, "count", 1)


def failed(client: Client, spool_id: str, destination: str, status_class: FailureClass, status: int | None,
           reason: str, final: bool = False) -> None:
    """A send of the instance to ``destination`` failed (``final``: it is a dead letter now)."""
    now = time.time()
    client.hincrby(keys.COUNT_FAILED, f"{destination}{_SEP}{status_class}", 1)
    _count_minute(client, "failed", now)
    step(client, spool_id, DEAD if final else FAILED, destination=destination, status=status, detail=reason, at=now)


def reload_result(client: Client, generation: int, ok: bool, message: str) -> None:
    """The configuration's last reload (``ok`` False: an invalid edit, the running rules kept)."""
    client.hset(keys.LAST_RELOAD, mapping={"at": time.time(), "generation": generation, "ok": int(ok),
                                           "message": message[:2000]})


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def associations(client: Client, direction: str, count: int, process: str | None = None) -> None:
    """Publish how many associations this process has open (``in``: ingest, ``out``: senders).
    Refreshed at least every ``GAUGE_TTL`` s, or it no longer counts (a process that died)."""
    client.set(keys.associations(direction, process or process_name()), count, ex=GAUGE_TTL)


# -- reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    buckets: list[tuple[float, int]]
    """(upper bound, cumulative count), ending with +Inf."""
    sum: float
    count: int


@dataclass(frozen=True)
class Counters:
    received: dict[str, int] = field(default_factory=dict)
    forwarded: dict[str, int] = field(default_factory=dict)
    failed: dict[tuple[str, str], int] = field(default_factory=dict)
    send_seconds: dict[str, Histogram] = field(default_factory=dict)


def _ints(raw: dict) -> dict[str, int]:
    return {_text(k): int(v) for k, v in raw.items()}


def counters(conn: redis.Redis, destinations: list[str]) -> Counters:
    """Every counter, summed over every process that ever wrote one."""
    pipe = conn.pipeline(transaction=False)
    pipe.hgetall(keys.COUNT_RECEIVED)
    pipe.hgetall(keys.COUNT_FORWARDED)
    pipe.hgetall(keys.COUNT_FAILED)
    for destination in destinations:
        pipe.hgetall(keys.send_seconds(destination))
    received_raw, forwarded_raw, failed_raw, *sends = pipe.execute()
    failed_counts = {}
    for label, value in _ints(failed_raw).items():
        destination, _, status_class = label.partition(_SEP)
        failed_counts[(destination, status_class)] = value
    histograms = {}
    for destination, raw in zip(destinations, sends):
        values = {_text(k): _text(v) for k, v in raw.items()}
        running, buckets = 0, []
        for bound in (*SEND_BUCKETS, math.inf):
            running += int(values.get(repr(bound), 0))
            buckets.append((bound, running))
        histograms[destination] = Histogram(buckets, float(values.get("sum", 0.0)), int(values.get("count", 0)))
    return Counters(_ints(received_raw), _ints(forwarded_raw), failed_counts, histograms)


@dataclass(frozen=True)
class Minute:
    start: int
    received: int
    forwarded: int
    failed: int


def per_minute(conn: redis.Redis, minutes: int = 60) -> list[Minute]:
    """Totals per minute over the last ``minutes`` (the current one last), zeros where nothing happened."""
    now = _minute(time.time())
    starts = [now - 60 * n for n in range(minutes - 1, -1, -1)]
    pipe = conn.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(keys.minute(start))
    found = []
    for start, raw in zip(starts, pipe.execute()):
        values = _ints(raw)
        found.append(Minute(start, values.get("received", 0), values.get("forwarded", 0), values.get("failed", 0)))
    return found


def associations_open(conn: redis.Redis) -> dict[str, int]:
    """Open associations per direction, summed over the live processes."""
    totals = {"in": 0, "out": 0}
    for key in conn.scan_iter(match=keys.associations("*", "*"), count=500):
        value = conn.get(key)
        direction = keys.associations_direction(_text(key))
        if value is not None and direction in totals:
            totals[direction] += int(value)
    return totals


def rule_hit_counts(conn: redis.Redis) -> dict[str, int]:
    return _ints(conn.hgetall(keys.COUNT_RULES))


@dataclass(frozen=True)
class Reload:
    at: float
    generation: int
    ok: bool
    message: str


def last_reload(conn: redis.Redis) -> Reload | None:
    raw = {_text(k): _text(v) for k, v in conn.hgetall(keys.LAST_RELOAD).items()}
    if not raw:
        return None
    return Reload(float(raw["at"]), int(raw["generation"]), raw["ok"] == "1", raw.get("message", ""))


@dataclass(frozen=True)
class Step:
    at: float
    step: str
    destination: str
    status: int | None
    detail: str
    spool_id: str = ""


def _step(raw: bytes | str) -> Step:
    data = json.loads(raw)
    return Step(float(data["at"]), data["step"], data.get("destination", ""), data.get("status"),
                data.get("detail", ""), data.get("spool_id", ""))


def journey(conn: redis.Redis, spool_id: str) -> list[Step]:
    """Every recorded step of ``spool_id``, in order (empty once expired or never seen)."""
    return [_step(raw) for raw in conn.lrange(keys.journey(spool_id), 0, -1)]


def recent(conn: redis.Redis, limit: int = 50) -> list[Step]:
    """The latest steps of any instance, newest first."""
    return [_step(raw) for raw in conn.lrange(keys.RECENT_STEPS, 0, max(0, limit - 1))]


def find(conn: redis.Redis, value: str, limit: int = 50) -> list[str]:
    """Spool ids received with this SOP, Series or Study Instance UID or Accession Number, newest first."""
    value = value.strip()
    if not value:
        return []
    return [_text(i) for i in conn.zrevrange(keys.find(value), 0, max(0, limit - 1))]


def oldest_age(conn: redis.Redis, backlog: str, now: float | None = None) -> float | None:
    """Seconds the oldest id waiting in ``backlog`` has waited since it was received.

    A spool id tells when it was received (``spool.id_time``): the head of
    the pending list is the oldest there; retries are looked at by their
    first ten."""
    now = time.time() if now is None else now
    candidates = [_text(i) for i in conn.lrange(keys.pending(backlog), 0, 0)]
    # Retries are ordered by when they fall due, not by age: the first few stand for them.
    candidates += [_text(i) for i in conn.zrange(keys.delayed(backlog), 0, 9)]
    ages = [now - at for at in map(id_time, candidates) if at is not None]
    return max(ages) if ages else None
