"""One history per received instance, in Redis: what became of it, step by step.

Each instance has one hash (``keys.instance``) holding both what it is now
and how it got there, read two ways:

* its **state** — received (SOP Instance and Class UID, from whom), routed
  to which destinations or why to none (``quarantined``, ``dropped``), and
  per destination waiting, stored (awaiting the destination's commitment),
  delivered or dead — from which the storage commitment SCP answers a
  modality (``router/kernel/commitment/from_modalities.py``, PS3.4 Annex J.3);
* its **journey** — every step with when, where, the DIMSE status and a
  detail (received, routed, sent, failed, committed, an operator's retry,
  purge or re-route and who asked) — shown by ``dicom-router journey``, the
  dashboard and its API (``router/operations.py``).

Each pipeline step is one call here, and it writes the step together with
the state it changes into the pipeline its process sends anyway, as one
command: a short Lua script (``_WRITE_STEPS``, sent with EVAL, so a Redis that
restarted empty needs no reloading) makes the HSET, its EXPIRE and the XADD
to the capped stream of recent steps in Redis (a receipt also adds its SOP
Instance UID to the identifier index). Three to five commands per step cost
the router's processes more than the work they record (docs/measurements.md).

Identifiers only: UIDs, AE titles, addresses, destination names, DICOM
statuses, never patient data (docs/guarantees.md, G6). A history expires
``router.history_days`` after its last step (``RETENTION``, 7 days, by
default: :func:`keep_for`). Redis is not the truth about the
spool (docs/guarantees.md, G3), and neither is this: a history lost with
Redis's memory makes the router *deny* holding an instance (its
commitment fails, the modality keeps its copy), never claim one it does not
hold; ``workers/reconcile.py`` writes the receipts of instances received
while Redis was away.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import redis
from redis.client import Pipeline

from router.kernel import keys

Client = redis.Redis | Pipeline

RETENTION = 7 * 24 * 3600
"""Seconds a history (and an identifier's index entry) lives after its last change."""
RECENT = 500
"""Steps of any instance kept in the stream of recent ones (at least; trimmed approximately)."""


class Kind(StrEnum):
    """What a step of an instance's journey was."""

    RECEIVED = "received"
    ROUTED = "routed"
    QUARANTINED = "quarantined"
    DROPPED = "dropped"
    SENT = "sent"
    FAILED = "failed"
    """A send failed; the instance is tried again."""
    DEAD = "dead"
    """A dead letter of one destination (it may still be retried)."""
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"
    """The destination reported it failed: it is sent again."""
    # An operator's action (``router/operations.py``), its detail naming who.
    RETRIED = "retried"
    PURGED = "purged"
    REROUTED = "re-routed"


class Delivery(StrEnum):
    """Where an instance stands with one destination the rules chose."""

    WAITING = "waiting"
    """Chosen, not yet acknowledged (or its commitment failed: sent again)."""
    STORED = "stored"
    """Acknowledged by a destination that is still to commit it."""
    DELIVERED = "delivered"
    """Acknowledged, and committed where the destination commits: done."""
    DEAD = "dead"


FORWARDED = "forwarded"
"""The routing outcome of an instance sent somewhere (the others: ``quarantined``, ``dropped``)."""

_SOP, _CLASS, _FROM, _RECEIVED, _ROUTED, _OUTCOME = "sop", "class", "from", "received", "routed", "outcome"
_DEST = "dest:"
_STEP = "step:"


# -- writing ------------------------------------------------------------------


# ARGV[1]: a JSON array of steps (one argument: redis-py spends more on encoding
# arguments than Redis on running this), each an array of strings: the history's
# key, its retention, the recent steps' stream, its length, the step's entry, then
# field/value pairs for the hash (the step's field first), then, after a "|" in a
# field's place, an identifier's index key, the score (when) and the spool id.
_WRITE_STEPS = """
for _, a in ipairs(cjson.decode(ARGV[1])) do
  local n = #a
  local bar = n + 1
  for i = 6, n, 2 do if a[i] == '|' then bar = i break end end
  redis.call('HSET', a[1], unpack(a, 6, bar - 1))
  redis.call('EXPIRE', a[1], a[2])
  redis.call('XADD', a[3], 'MAXLEN', '~', a[4], '*', 'step', a[5])
  if bar < n then
    redis.call('ZADD', a[bar + 1], a[bar + 2], a[bar + 3])
    redis.call('EXPIRE', a[bar + 1], a[2])
  end
end
"""
_RECENT = str(RECENT)
_retention = RETENTION


def keep_for(seconds: float) -> None:
    """How long this process's history writes keep a history after its last step
    (``router.history_days``; every command sets it as it loads its config)."""
    global _retention
    _retention = max(1, int(seconds))


class Steps:
    """A pipeline that gathers the steps written to it into one command.

    Pass it where a step (or a counter) takes a client: steps wait here,
    every other command goes to ``pipe`` at once. :meth:`flush` puts the
    steps into ``pipe`` — before anything that must come after them, such as
    the announcement that lets a worker act on the instances — and
    :meth:`execute` flushes, then sends.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.steps: list[list[str]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)

    def flush(self) -> None:
        if self.steps:
            _send(self.pipe, self.steps)
            self.steps = []

    def execute(self) -> list:
        self.flush()
        return self.pipe.execute()


def _send(client: Client, steps: list[list[str]]) -> None:
    client.eval(_WRITE_STEPS, 0, json.dumps(steps, separators=(",", ":")))


def _sent_as(value: object) -> str:
    """A value as redis-py would send it (floats by ``repr``), for the script's HSET."""
    return repr(value) if isinstance(value, float) else str(value)


def _write(client: Client | Steps, spool_id: str, kind: Kind, state: Mapping[str, object] | None = None, *,
           destination: str = "", status: int | None = None, detail: str = "", at: float | None = None,
           found_by: str = "") -> None:
    """Record one step and the state it changes, and add it to the recent steps (one
    command; none when ``client`` gathers :class:`Steps`).

    Args:
        found_by: an identifier the instance is from now on found by (its SOP Instance UID).
    """
    at = time.time() if at is None else at
    entry = json.dumps({"at": at, "step": kind, "destination": destination, "status": status, "detail": detail,
                        "spool_id": spool_id}, separators=(",", ":"))
    args = [keys.instance(spool_id), str(_retention), keys.RECENT_STEPS, _RECENT, entry,
            f"{_STEP}{at!r}:{kind}:{destination}", entry]
    for name, value in (state or {}).items():
        args += (name, _sent_as(value))
    if found_by.strip():
        args += ("|", keys.find(found_by.strip()), repr(at), spool_id)
    if isinstance(client, Steps):
        client.steps.append(args)
    else:
        _send(client, [args])


def received(client: Client, spool_id: str, sop_instance_uid: str, sop_class_uid: str, source: str,
             at: float | None = None) -> None:
    """The ingest made the instance durable under ``spool_id`` (``source``: calling AE @ address);
    from now on it is found by its SOP Instance UID."""
    at = time.time() if at is None else at
    _write(client, spool_id, Kind.RECEIVED, {_SOP: sop_instance_uid, _CLASS: sop_class_uid, _FROM: source,
                                             _RECEIVED: at}, detail=f"from {source}", at=at, found_by=sop_instance_uid)


class Receipt(NamedTuple):
    """An instance in ``incoming/`` as its file meta tells it, for :func:`received_unless_known`."""

    spool_id: str
    sop_instance_uid: str
    sop_class_uid: str
    source: str
    at: float
    """When it was received (its spool id's time), so that a later receipt of the same SOP
    Instance UID stays the one :func:`lookup` finds."""


def received_unless_known(client: redis.Redis, receipts: list[Receipt]) -> list[str]:
    """Record receipts the ingest could not (Redis was unreachable when it queued them).

    Returns:
        The spool ids that had no receipt and have one now (one that has is left as it is).
    """
    pipe = client.pipeline(transaction=False)
    for receipt in receipts:
        pipe.hsetnx(keys.instance(receipt.spool_id), _RECEIVED, receipt.at)
    fresh = [receipt for receipt, created in zip(receipts, pipe.execute()) if created]
    for receipt in fresh:
        received(pipe, *receipt)
    pipe.execute()
    return [receipt.spool_id for receipt in fresh]


def index(client: Client, found: Mapping[str, Mapping[str, float]]) -> None:
    """Make spool ids findable by identifiers: ``{identifier: {spool id: when}}`` (SOP, Series and
    Study Instance UIDs, accession numbers; blanks skipped). One ZADD per identifier, however many ids."""
    for value, spool_ids in found.items():
        value = value.strip()
        if value and spool_ids:
            key = keys.find(value)
            client.zadd(key, dict(spool_ids))
            client.expire(key, _retention)


def routed(client: Client, spool_id: str, destinations: Iterable[str], detail: str) -> None:
    """The rules chose ``destinations``; each waits for its acknowledgement."""
    at = time.time()
    state = {_ROUTED: at, _OUTCOME: FORWARDED, **{_DEST + d: Delivery.WAITING for d in destinations}}
    _write(client, spool_id, Kind.ROUTED, state, detail=detail, at=at)


def not_routed(client: Client, spool_id: str, outcome: Kind, detail: str) -> None:
    """Routing sent it nowhere: ``outcome`` is ``Kind.QUARANTINED`` or ``Kind.DROPPED``."""
    at = time.time()
    _write(client, spool_id, outcome, {_ROUTED: at, _OUTCOME: outcome}, detail=detail, at=at)


def sent(client: Client, spool_id: str, destination: str, status: int, seconds: float,
         awaiting_commitment: bool) -> None:
    """``destination`` acknowledged it with ``status`` after ``seconds``: delivered, or stored
    until the destination commits it."""
    state = Delivery.STORED if awaiting_commitment else Delivery.DELIVERED
    _write(client, spool_id, Kind.SENT, {_DEST + destination: state}, destination=destination, status=status,
           detail=f"{seconds * 1000:.0f} ms")


def failed(client: Client, spool_id: str, destination: str, status: int | None, reason: str) -> None:
    """A send to ``destination`` failed; it is tried again."""
    _write(client, spool_id, Kind.FAILED, destination=destination, status=status, detail=reason)


def dead(client: Client, spool_id: str, destination: str, status: int | None, reason: str) -> None:
    """It became ``destination``'s dead letter (a send or morph that cannot succeed, or a commitment refused)."""
    _write(client, spool_id, Kind.DEAD, {_DEST + destination: Delivery.DEAD}, destination=destination,
           status=status, detail=reason)


def committed(client: Client, spool_id: str, destination: str, transaction_uid: str) -> None:
    """``destination`` reported it committed in ``transaction_uid``: delivered."""
    _write(client, spool_id, Kind.COMMITTED, {_DEST + destination: Delivery.DELIVERED}, destination=destination,
           detail=f"transaction {transaction_uid}")


def commit_failed(client: Client, spool_id: str, destination: str, reason: int, transaction_uid: str) -> None:
    """``destination`` reported its commitment failed (``reason``: the Failure Reason, 0 when it
    was not mentioned): it is sent again, so it waits once more."""
    _write(client, spool_id, Kind.COMMIT_FAILED, {_DEST + destination: Delivery.WAITING},
           destination=destination, status=reason or None, detail=f"transaction {transaction_uid}: sent again")


def acted(client: Client, spool_id: str, action: Kind, actor: str, destination: str = "",
          at: float | None = None) -> None:
    """An operator's ``action`` on it (re-routed, retried, purged), by ``actor``.

    A purged quarantined instance (no destination) was its only copy: from then on
    nobody holds it, and a storage commitment request for it fails.
    """
    state = {_OUTCOME: Kind.DROPPED} if action == Kind.PURGED and not destination else None
    _write(client, spool_id, action, state, destination=destination, detail=f"by {actor}", at=at)


# -- reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    at: float
    step: str
    destination: str
    status: int | None
    detail: str
    spool_id: str = ""


@dataclass(frozen=True)
class Record:
    """One instance's history: its state and its journey."""

    spool_id: str
    sop_instance_uid: str
    sop_class_uid: str
    received_at: float | None
    """None when its receipt was never recorded (Redis was away, and it left ``incoming/`` since)."""
    routed_at: float | None
    outcome: str
    """``forwarded``, or why nothing was forwarded (``quarantined``, ``dropped``)."""
    destinations: Mapping[str, str]
    """Destination -> its :class:`Delivery`."""
    steps: tuple[Step, ...] = ()
    """The journey, in time order."""

    @property
    def delivered(self) -> bool:
        """Every destination the rules chose has it for good (and at least one was chosen)."""
        return bool(self.destinations) and all(s == Delivery.DELIVERED for s in self.destinations.values())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _step(raw: bytes | str) -> Step:
    data = json.loads(raw)
    return Step(float(data["at"]), data["step"], data.get("destination", ""), data.get("status"),
                data.get("detail", ""), data.get("spool_id", ""))


def _record(spool_id: str, raw: Mapping[bytes | str, bytes | str]) -> Record | None:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    if not fields:
        return None
    # Processes record steps as they happen, each with its own clock: time orders them.
    steps = sorted((_step(v) for k, v in fields.items() if k.startswith(_STEP)), key=lambda step: step.at)
    return Record(
        spool_id=spool_id,
        sop_instance_uid=fields.get(_SOP, ""),
        sop_class_uid=fields.get(_CLASS, ""),
        received_at=float(fields[_RECEIVED]) if fields.get(_RECEIVED) else None,
        routed_at=float(fields[_ROUTED]) if fields.get(_ROUTED) else None,
        outcome=fields.get(_OUTCOME, ""),
        destinations={k[len(_DEST):]: v for k, v in fields.items() if k.startswith(_DEST)},
        steps=tuple(steps),
    )


def records(client: redis.Redis, spool_ids: list[str]) -> list[Record | None]:
    """The histories of ``spool_ids`` in one round trip (None where nothing is recorded)."""
    pipe = client.pipeline(transaction=False)
    for spool_id in spool_ids:
        pipe.hgetall(keys.instance(spool_id))
    return [_record(spool_id, raw) for spool_id, raw in zip(spool_ids, pipe.execute())]


def record(client: redis.Redis, spool_id: str) -> Record | None:
    """The history of ``spool_id``, or None when nothing is recorded (or it expired)."""
    return _record(spool_id, client.hgetall(keys.instance(spool_id)))


def journey(client: redis.Redis, spool_id: str) -> list[Step]:
    """Every recorded step of ``spool_id`` in time order (empty once expired or never seen)."""
    found = record(client, spool_id)
    return list(found.steps) if found is not None else []


def find(client: redis.Redis, value: str, limit: int = 50) -> list[str]:
    """Spool ids received with this SOP, Series or Study Instance UID or Accession Number, newest first."""
    value = value.strip()
    if not value:
        return []
    return [_text(i) for i in client.zrevrange(keys.find(value), 0, max(0, limit - 1))]


def lookup(client: redis.Redis, sop_instance_uid: str) -> Record | None:
    """The last instance whose receipt under ``sop_instance_uid`` is recorded, or None when unknown.

    The index also holds Series and Study UIDs and accession numbers: only a
    history received with this very SOP Instance UID answers."""
    for candidate in records(client, find(client, sop_instance_uid)):
        if candidate is not None and candidate.received_at is not None \
                and candidate.sop_instance_uid == sop_instance_uid:
            return candidate
    return None


def recent(client: redis.Redis, limit: int = 50) -> list[Step]:
    """The latest steps of any instance, newest first."""
    return [_step(entry) for _, fields in client.xrevrange(keys.RECENT_STEPS, count=max(1, limit))
            for entry in fields.values()]
