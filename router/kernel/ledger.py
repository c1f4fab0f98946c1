"""What became of each received instance: a small record per instance in Redis.

The storage commitment SCP (``router/ingest/commitment_scp.py``) answers a
modality from it — was this SOP Instance UID received, and has every
destination the rules chose acknowledged (and, where it commits, committed)
it — and the operations views read it. It holds identifiers only, never
patient data, and expires after ``RETENTION`` seconds.

Redis is not the truth about the spool (docs/guarantees.md, G3), and this
record follows the same rule: a record lost with Redis's memory makes the
router *deny* having an instance (commitment fails, the modality keeps its
copy), never claim one it does not hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis
from redis.client import Pipeline

from router.kernel import keys

RETENTION = 7 * 24 * 3600
"""Seconds a record lives after its last change."""

WAITING = "waiting"
"""Chosen by the rules, not yet acknowledged."""
STORED = "stored"
"""Acknowledged by a destination that is still to commit it."""
DELIVERED = "delivered"
"""Acknowledged, and committed where the destination commits: done."""
DEAD = "dead"
"""A dead letter (it may still be retried)."""

_DEST = "dest:"

Client = redis.Redis | Pipeline


def received(client: Client, spool_id: str, sop_instance_uid: str, sop_class_uid: str, source: str) -> None:
    """The ingest made the instance durable under ``spool_id`` (``source``: calling AE @ address)."""
    key = keys.instance(spool_id)
    client.hset(key, mapping={"sop": sop_instance_uid, "class": sop_class_uid, "from": source,
                              "received": time.time()})
    client.expire(key, RETENTION)
    if sop_instance_uid:
        client.set(keys.sop_instance(sop_instance_uid), spool_id, ex=RETENTION)


def received_unless_known(client: redis.Redis, entries: list[tuple[str, str, str, str]]) -> list[str]:
    """Record receipts the ingest could not (Redis was unreachable when it queued them).

    Args:
        entries: (spool id, SOP Instance UID, SOP Class UID, source) of instances in ``incoming/``.

    Returns:
        The spool ids that had no record and have one now (a record that exists is left as it is).
    """
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for spool_id, _, _, _ in entries:
        pipe.hsetnx(keys.instance(spool_id), "received", now)
    fresh = [entry for entry, created in zip(entries, pipe.execute()) if created]
    for spool_id, sop_instance_uid, sop_class_uid, source in fresh:
        key = keys.instance(spool_id)
        pipe.hset(key, mapping={"sop": sop_instance_uid, "class": sop_class_uid, "from": source})
        pipe.expire(key, RETENTION)
        if sop_instance_uid:
            pipe.set(keys.sop_instance(sop_instance_uid), spool_id, ex=RETENTION, nx=True)
    pipe.execute()
    return [spool_id for spool_id, _, _, _ in fresh]


def routed(client: Client, spool_id: str, destinations: list[str], outcome: str = "") -> None:
    """The rules chose ``destinations`` (none: ``outcome`` says what happened instead)."""
    key = keys.instance(spool_id)
    mapping: dict[str, object] = {"routed": time.time(), "outcome": outcome or "forwarded"}
    mapping.update({_DEST + d: WAITING for d in destinations})
    client.hset(key, mapping=mapping)
    client.expire(key, RETENTION)


def destination(client: Client, spool_id: str, name: str, state: str) -> None:
    """Instance ``spool_id`` reached ``state`` at destination ``name``."""
    key = keys.instance(spool_id)
    client.hset(key, _DEST + name, state)
    client.expire(key, RETENTION)


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance as the ledger knows it."""

    spool_id: str
    sop_instance_uid: str
    sop_class_uid: str
    received_at: float
    routed_at: float | None
    outcome: str
    """``forwarded``, or why nothing was forwarded (``quarantined``, ``dropped``)."""
    destinations: dict[str, str] = field(default_factory=dict)

    @property
    def delivered(self) -> bool:
        """Every destination the rules chose has it for good (and at least one was chosen)."""
        return bool(self.destinations) and all(s == DELIVERED for s in self.destinations.values())


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def lookup(client: redis.Redis, sop_instance_uid: str) -> InstanceRecord | None:
    """The last instance received under ``sop_instance_uid``, or None when unknown."""
    spool_id = _text(client.get(keys.sop_instance(sop_instance_uid)))
    return record(client, spool_id) if spool_id else None


def record(client: redis.Redis, spool_id: str) -> InstanceRecord | None:
    """The record of ``spool_id``, or None when there is none."""
    raw = {_text(k): _text(v) for k, v in client.hgetall(keys.instance(spool_id)).items()}
    if not raw.get("received"):
        return None
    return InstanceRecord(
        spool_id=spool_id,
        sop_instance_uid=raw.get("sop", ""),
        sop_class_uid=raw.get("class", ""),
        received_at=float(raw["received"]),
        routed_at=float(raw["routed"]) if raw.get("routed") else None,
        outcome=raw.get("outcome", ""),
        destinations={k[len(_DEST):]: v for k, v in raw.items() if k.startswith(_DEST)},
    )
