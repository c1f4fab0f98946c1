"""Routing: read a spooled instance's header, ask the rules, fan it out.

For each destination the rules choose, the instance gets its own name in
``out/DEST/`` — a hard link to the received bytes when it goes untouched, a
morphed copy otherwise — and only then is its ``incoming`` name dropped, so
a crash at any point leaves it either still to route or already handed on.

Outcomes are per destination: when the morph for one destination fails,
the instance is that destination's dead letter (kept as received, marked so
that ``dicom-router retry`` morphs it again rather than send it as it is),
and the other destinations get it as usual.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from router.kernel import history, keys, telemetry
from router.kernel.filemeta import origin_of
from router.kernel.settings import Config
from router.kernel.spool import DeadLetter, Spool
from router.kernel.telemetry import FailureClass
from rules.context import MorphContext
from rules.facts import AssociationFacts
from rules.matcher import Decision, decide
from rules.models import MorphOp
from rules.morph import apply
from workers.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 64
GATHER = 0.05
"""Seconds a batch may wait to fill: each batch costs a directory fsync per
destination and several Redis round trips, which a routing worker that keeps
up with ingest would otherwise pay for nearly every instance."""
GATHER_STEP = 0.005


def decision_for(config: Config, header: Dataset) -> Decision:
    """What the rules decide for an instance whose header (with the spool file's meta) is ``header``."""
    origin = origin_of(header.file_meta)
    facts = AssociationFacts(origin.calling_ae_title, origin.called_ae_title, origin.source_ip)
    return decide(config.rules, config.unrouted, header, facts)


def morphed(full: Dataset, ops: list[MorphOp], context: MorphContext) -> bytes:
    """The instance after ``ops``, encoded as a spool file (``full`` is left as it was).

    Raises:
        Exception: whatever the morph or pydicom's writer raise for this
            instance (callers make it that destination's dead letter).
    """
    buffer = BytesIO()
    apply(full, ops, context).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class Journal:
    """What a batch of routing tells Redis, in one round trip once its links are durable.

    Each instance's history step goes into ``pipe`` as it is routed; the
    identifiers it can be found by and the rule hits are gathered over the
    batch, so that the instances of one series routed together cost one ZADD
    per identifier and one HINCRBY per rule, not one each.
    """

    pipe: history.Steps
    """Where its steps and counters go (:class:`router.kernel.history.Steps` over a pipeline)."""
    found: defaultdict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    """Identifier (Study, Series Instance UID, Accession Number) -> {spool id: when routed}."""
    rules: list[str] = field(default_factory=list)
    """Every rule each instance matched."""

    def close(self) -> None:
        """Add the batch's steps, identifiers and rule hits to the pipeline (not sent yet)."""
        history.index(self.pipe, self.found)
        telemetry.rule_hits(self.pipe, self.rules)
        self.pipe.flush()

    def send(self) -> None:
        self.close()
        self.pipe.execute()


def route_one(runtime: Runtime, spool_id: str, journal: Journal | None = None) -> list[str]:
    """Route one spooled instance; returns the destinations it was handed to.

    An instance that cannot be read, or that no rule wants under
    ``unrouted: keep``, goes to quarantine with its reason.

    Args:
        journal: where the outcome is recorded (its history, the rule hits);
            the caller sends it after the instance is handed over.
    """
    spool = runtime.spool
    path = spool.incoming_path(spool_id)
    if not path.exists():
        return []  # routed before (a duplicate queue entry after recovery)
    try:
        # Values over 1 KiB (overlays, private blobs) are read only if a rule asks.
        header = dcmread(path, stop_before_pixels=True, defer_size=1024)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        spool.quarantine(spool_id, f"unreadable: {exc}")
        log.warning("route %s: unreadable, quarantined: %s", spool_id, exc)
        if journal is not None:
            history.not_routed(journal.pipe, spool_id, history.Kind.QUARANTINED, "unreadable")
        return []
    config = runtime.routing_config()
    decision = decision_for(config, header)
    sop_uid = header.get("SOPInstanceUID", "?")
    if not decision.deliveries:
        if decision.unrouted == "drop":
            log.info("route %s (%s): no rule matched, dropped (unrouted: drop)", spool_id, sop_uid)
            spool.remove_routed(spool_id)
        else:
            spool.quarantine(spool_id, "unrouted: no rule matched")
            log.info("route %s (%s): no rule matched, kept in quarantine", spool_id, sop_uid)
        if journal is not None:
            outcome = history.Kind.DROPPED if decision.unrouted == "drop" else history.Kind.QUARANTINED
            record_route(journal, spool_id, identifiers(header), decision, outcome)
        return []
    full = None
    handed = []
    for destination, ops in decision.deliveries.items():
        if not ops:
            spool.assign(spool_id, destination)
            handed.append(destination)
            continue
        try:
            if full is None:
                full = dcmread(path)
            data = morphed(full, ops, runtime.morph_context(config))
        except Exception as exc:  # noqa: BLE001 - any morph failure is this destination's, not the others'
            spool.bury_unmorphed(spool_id, destination, f"morph failed: {exc}", str(sop_uid))
            log.error("route %s -> %s (%s): dead letter: morph failed: %s", sop_uid, destination, spool_id, exc)
            continue
        spool.assign_bytes(spool_id, destination, data)
        handed.append(destination)
    log.debug("route %s (%s): rules %s -> %s", spool_id, sop_uid, list(decision.matched), handed)
    if journal is not None:
        record_route(journal, spool_id, identifiers(header), decision, history.Kind.ROUTED)
        for destination in set(decision.deliveries) - set(handed):
            telemetry.count_failed(journal.pipe, destination, FailureClass.MORPH)
            history.dead(journal.pipe, spool_id, destination, None, "morph failed")
    return handed


def identifiers(header: Dataset) -> tuple[str, ...]:
    """What an instance's history is found by besides its SOP Instance UID: its Study and
    Series Instance UIDs and Accession Number (no patient data)."""
    return tuple(str(header.get(keyword) or "") for keyword in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                 "AccessionNumber"))


def record_route(journal: Journal, spool_id: str, found_by: Iterable[str], decision: Decision,
                 outcome: history.Kind) -> None:
    """The routing step of the history: rules matched, where it goes, which copies are morphed;
    and the identifiers it can be found by (``found_by``: :func:`identifiers`)."""
    journal.rules += decision.matched
    now = time.time()
    for value in found_by:
        journal.found[value][spool_id] = now
    rules = ", ".join(decision.matched) or "none"
    if outcome == history.Kind.ROUTED:
        goes = ", ".join(f"{d} (morphed)" if ops else d for d, ops in decision.deliveries.items())
        history.routed(journal.pipe, spool_id, decision.deliveries, f"rules: {rules} -> {goes}")
    else:
        history.not_routed(journal.pipe, spool_id, outcome, f"rules: {rules}; unrouted: {outcome}")


def drain(runtime: Runtime, budget: float = 5.0) -> int:
    """Route pending instances in batches for up to ``budget`` seconds.

    Returns:
        How many instances were taken from the backlog.
    """
    backlog = runtime.dispatcher.backlog(keys.ROUTE)
    started = time.monotonic()
    done = 0
    while True:
        ids = backlog.claim(runtime.worker_id, BATCH)
        if not ids:
            return done
        gather_until = time.monotonic() + GATHER
        while len(ids) < BATCH and time.monotonic() < gather_until:
            time.sleep(GATHER_STEP)
            ids += backlog.claim(runtime.worker_id, BATCH - len(ids))
        # An id queued twice (an operator's re-route and the reconciler, both after a
        # rename that keeps the file's old time) is routed once.
        ids = list(dict.fromkeys(ids))
        journal = Journal(history.Steps(runtime.redis.pipeline(transaction=False)))
        handed = route_batch(runtime, ids, journal)
        # Links first made durable, then recorded, then announced, then the incoming
        # name dropped. Recorded before announced: a forwarding worker may deliver at
        # once, and the history's "waiting" must not overwrite its "delivered".
        runtime.spool.sync_out(set(handed))
        journal.send()
        runtime.dispatcher.submit_all({keys.forward(d): routed for d, routed in handed.items()})
        backlog.ack(runtime.worker_id, ids)
        for spool_id in ids:
            runtime.spool.remove_routed(spool_id)
        # One line per batch at INFO; each instance's route is logged at DEBUG.
        log.info("routed %d: %s", len(ids), ", ".join(f"{d} {len(i)}" for d, i in handed.items()) or "none forwarded")
        done += len(ids)
        if time.monotonic() - started > budget:
            return done


def route_batch(runtime: Runtime, ids: list[str], journal: Journal) -> dict[str, list[str]]:
    """Route ``ids`` (:func:`route_one` each, outcomes into ``journal``); returns
    ``{destination: ids handed to it}``. The caller makes the links durable,
    sends the journal and announces the ids, in that order."""
    handed: dict[str, list[str]] = defaultdict(list)
    for spool_id in ids:
        try:
            destinations = route_one(runtime, spool_id, journal)
        except Exception as exc:  # a morph or rules bug must not stall the queue
            log.exception("route %s failed; quarantined", spool_id)
            runtime.spool.quarantine(spool_id, f"routing failed: {exc!r}")
            continue
        for destination in destinations:
            handed[destination].append(spool_id)
    return handed


def remorph(config: Config, spool: Spool, letter: DeadLetter, context: MorphContext) -> str | None:
    """Put an ``unmorphed`` dead letter back in its destination's ``out/`` folder,
    morphed by the rules as they are now; never as it was received.

    Returns:
        None when it is back in ``out/``; otherwise why not (it stays a dead letter).
    """
    try:
        full = dcmread(letter.path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"unreadable: {exc}"
    ops = decision_for(config, full).deliveries.get(letter.destination)
    if ops is None:
        return f"the rules no longer send it to {letter.destination}"
    if not ops:
        spool.resurrect(letter)  # the rules now send it untouched
        return None
    try:
        data = morphed(full, ops, context)
    except Exception as exc:  # noqa: BLE001 - as in route_one
        return f"morph failed: {exc}"
    spool.assign_bytes(letter.spool_id, letter.destination, data)
    spool.purge(letter)
    return None
