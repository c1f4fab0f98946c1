"""What the ingest hands on after it answered Success: the instance, and where it
was routed when the ingest routed it itself (``router.route_at_ingest``); and the
gate that keeps a failing Redis from slowing the ingest. Shared by
``router/ingest/`` and ``workers/routing_at_ingest.py``, which routes in the
ingest's process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from router.kernel import history, telemetry


class RedisGate:
    """Skips Redis for a while after it failed, so a dead Redis cannot slow ingest.

    Instances received meanwhile stay where the ingest put them (``incoming/``, or
    ``out/`` when it routed them); the reconciler queues them.
    """

    def __init__(self, pause: float = 5.0) -> None:
        self.pause = pause
        self._closed_until = 0.0

    def open(self) -> bool:
        return time.monotonic() >= self._closed_until

    def failed(self) -> None:
        self._closed_until = time.monotonic() + self.pause


@dataclass(frozen=True)
class Route:
    """Where the ingest routed an instance itself, before answering (``router.route_at_ingest``):
    the rules sent it, untouched, to ``destinations``, in whose ``out/`` folders it was made durable."""

    destinations: tuple[str, ...]
    decision: object
    """The rules' decision (``rules.matcher.Decision``), for the instance's history."""
    identifiers: tuple[str, ...] = ()
    """Its Study and Series Instance UIDs and Accession Number: what its history is found by."""


@dataclass(frozen=True)
class Received:
    """An instance the ingest made durable and answered Success: in ``incoming/``, or
    already in its destinations' ``out/`` folders when ``route`` says so."""

    spool_id: str
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    calling_ae: str = ""
    peer_ip: str = ""
    at: float = 0.0
    """When it was made durable (epoch seconds); 0: now."""
    route: Route | None = None

    def record_receipt(self, pipe: object) -> None:
        """Its receipt: the history's first step (the counters are the caller's: per batch)."""
        history.received(pipe, self.spool_id, self.sop_instance_uid, self.sop_class_uid,
                         f"{self.calling_ae}@{self.peer_ip}", at=self.at or None)

    def record(self, pipe: object) -> None:
        """Its receipt and its count among the received."""
        self.record_receipt(pipe)
        telemetry.count_received(pipe, self.calling_ae)
