"""What the router did, counted, in Redis: for metrics, the dashboard, the API and
the CLI.

Every process writes into the same Redis, so counters add up across
processes and survive their restarts (Prometheus reads them through one
collector, ``router/metrics.py``, never from a process's memory).

* **counters**: instances received per calling AE title, forwarded per
  destination, failed per destination and status class, send durations as
  a histogram per destination, rule hits;
* **per-minute totals** kept for ``MINUTES_KEPT`` minutes (the dashboard's chart);
* the configuration's last reload and each process's open associations.

Each instance's own steps are its history (``router/kernel/history.py``).
Labels are identifiers only: AE titles, rule and destination names, never
patient data (docs/guarantees.md, G6). Writers take a pipeline, so counting
costs the hot path no extra round trip.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import redis
from redis.client import Pipeline

from router.kernel import keys
from router.kernel.spool import id_time

Client = redis.Redis | Pipeline

MINUTES_KEPT = 120
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the send duration histogram; +Inf is implied."""
GAUGE_TTL = 60
"""Seconds a process's published gauge (open associations) counts without being refreshed."""

_SEP = "\x1f"  # joins label values in a hash field


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


def _count_minute(client: Client, what: str, at: float, amount: int = 1) -> None:
    key = keys.minute(_minute(at))
    client.hincrby(key, what, amount)
    client.expire(key, MINUTES_KEPT * 60)


def count_received(client: Client, calling_ae: str, amount: int = 1) -> None:
    """The ingest made ``amount`` instances from ``calling_ae`` durable."""
    client.hincrby(keys.COUNT_RECEIVED, calling_ae or "?", amount)
    _count_minute(client, "received", time.time(), amount)


def rule_hits(client: Client, rules: Iterable[str]) -> None:
    """The rules that matched, each as often as it is named (one HINCRBY per rule)."""
    for rule, hits in Counter(rules).items():
        client.hincrby(keys.COUNT_RULES, rule, hits)


def count_forwarded(client: Client, destination: str, seconds: float | Sequence[float]) -> None:
    """``destination`` acknowledged instances, each after its ``seconds`` (its C-STORE):
    one, or a batch's, counted in one set of commands."""
    times = [seconds] if isinstance(seconds, (int, float)) else list(seconds)
    if not times:
        return
    client.hincrby(keys.COUNT_FORWARDED, destination, len(times))
    _count_minute(client, "forwarded", time.time(), len(times))
    observe_send(client, destination, times)


def observe_send(client: Client, destination: str, seconds: Sequence[float]) -> None:
    key = keys.send_seconds(destination)
    buckets = Counter(next((b for b in SEND_BUCKETS if s <= b), math.inf) for s in seconds)
    for bucket, count in buckets.items():
        client.hincrby(key, repr(bucket), count)
    client.hincrbyfloat(key, "sum", sum(seconds))
    client.hincrby(key, "count", len(seconds))


def count_failed(client: Client, destination: str, status_class: FailureClass) -> None:
    """A send to ``destination`` failed (or its morph did, before any send)."""
    client.hincrby(keys.COUNT_FAILED, f"{destination}{_SEP}{status_class}", 1)
    _count_minute(client, "failed", time.time())


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


# -- MPPS (router/services/mpps.py) --------------------------------------------


class MppsOutcome(StrEnum):
    """What became of an MPPS message (N-CREATE, N-SET) with one destination: the
    ``outcome`` label of ``dicom_router_mpps_messages_total``."""

    RELAYED = "relayed"
    """Answered Success or a warning while the modality waited."""
    HELD = "held"
    """Kept durably for the destination (unreachable, or earlier messages of its SOP Instance held)."""
    DELIVERED = "delivered"
    """Taken by the destination from the hold, later."""
    REFUSED = "refused"
    """Answered a failure status (the modality heard it), or refused for good from the hold."""


def count_mpps(client: Client, destination: str, outcome: MppsOutcome) -> None:
    client.hincrby(keys.COUNT_MPPS, f"{destination}{_SEP}{outcome}", 1)


def mpps_counts(conn: redis.Redis) -> dict[tuple[str, str], int]:
    """(destination, outcome) -> MPPS messages, summed over every process."""
    found = {}
    for label, value in _ints(conn.hgetall(keys.COUNT_MPPS)).items():
        destination, _, outcome = label.partition(_SEP)
        found[(destination, outcome)] = value
    return found
