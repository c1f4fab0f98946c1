"""Storage commitment toward destinations: the SCU side of PS3.4 Annex J.

For a destination with ``storage_commitment``, a C-STORE's success only
moves the instance to ``commit/DEST`` (docs/guarantees.md, G2: the spool copy
goes once the destination *commits* it). After each batch the forwarding
drain asks for commitment of what it stored:

1. the transaction is recorded durably (``router/kernel/commitment/to_destinations.py``);
2. the N-ACTION goes on the association the instances travelled on;
3. the N-EVENT-REPORT comes on that association (answered by the sender,
   while it keeps the association open for it) or on a new association to
   the router's own SCP (Orthanc's way, answered by the ingest); either way
   :func:`router.kernel.commitment.to_destinations.apply_report` deletes the committed
   copies and sends the failed ones again.

A report that does not come by the deadline is asked for again under a new
Transaction UID, ``max_requests`` times in all; then those instances become
dead letters ("stored but never committed"), re-triable like any other.
Files a crash left in ``commit/`` without a transaction get one.
"""

from __future__ import annotations

import logging
import time

from router.kernel import history
from router.kernel.commitment.messages import Reference, Report
from router.kernel.commitment.to_destinations import Transaction, apply_report
from router.kernel.errors import (
    DestinationBusy,
    DestinationTimeout,
    DestinationUnavailable,
    PermanentSendError,
    TransientSendError,
)
from router.kernel.status import Status
from workers.runtime import Runtime
from workers.sender import ReportHandler, read_info

log = logging.getLogger(__name__)

TEND_EVERY = 5.0
"""Seconds between looks for transactions past their deadline, per destination and process."""
ORPHAN_AGE = 30.0
"""Seconds a stored copy may wait for its transaction record before it gets one."""

_next_tend: dict[str, float] = {}


def report_handler(runtime: Runtime, destination: str) -> ReportHandler:
    """What the sender calls with a report the destination sent on our association."""

    def handle(report: Report) -> int:
        settled = apply_report(runtime.transactions, runtime.dispatcher, [destination], report)
        if settled is None:
            log.warning("commit %s: report for transaction %s, which is not open (asked again since?); ignored",
                        destination, report.transaction_uid)
        return Status.SUCCESS

    return handle


def request(runtime: Runtime, destination: str, refs: list[tuple[str, Reference]], attempt: int = 1) -> None:
    """Record a transaction for ``refs`` (spool id, reference) and ask for it."""
    settings = runtime.config.destinations[destination].commitment
    assert settings is not None
    tx = runtime.transactions.open(destination, refs, settings.timeout_seconds, attempt)
    _ask(runtime, tx)


def _ask(runtime: Runtime, tx: Transaction) -> None:
    sender = runtime.sender(tx.destination)
    if sender.on_report is None:
        sender.on_report = report_handler(runtime, tx.destination)
    try:
        sender.request_commitment(tx.uid, [ref for _, ref in tx.refs], tx.deadline)
    except PermanentSendError as exc:
        _give_up(runtime, tx, f"storage commitment refused: {exc}")
        return
    except (DestinationUnavailable, DestinationBusy, DestinationTimeout, TransientSendError) as exc:
        # Not asked at all: again on the destination's retry schedule, not after the whole timeout.
        delay = runtime.config.destinations[tx.destination].retry.delay(tx.request)
        runtime.transactions.postpone(tx, time.time() + delay)
        log.warning("commit %s: transaction %s (%d instance(s)) not asked: %s; again in %.0f s",
                    tx.destination, tx.uid, len(tx.refs), exc, delay)
        return
    log.info("commit %s: asked to commit %d instance(s), transaction %s (request %d)",
             tx.destination, len(tx.refs), tx.uid, tx.request)


def _give_up(runtime: Runtime, tx: Transaction, reason: str) -> None:
    """The destination stored these instances and will not commit them: dead letters."""
    pipe = runtime.redis.pipeline(transaction=False)
    for spool_id, ref in tx.refs:
        if runtime.spool.bury_awaiting_commitment(tx.destination, spool_id, reason, tx.request, ref.sop_instance):
            history.dead(pipe, spool_id, tx.destination, None, reason)
            log.error("commit %s -> %s (%s): dead letter: %s", ref.sop_instance, tx.destination, spool_id, reason)
    runtime.transactions.close(tx)
    pipe.execute()


def due(runtime: Runtime, destination: str) -> bool:
    """Whether a transaction of ``destination`` passed its deadline, or stored copies
    wait without one (the maintenance loop then wakes the destination's drain)."""
    now = time.time()
    if any(tx.deadline <= now for tx in runtime.transactions.of(destination)):
        return True
    return bool(runtime.transactions.orphans(destination, ORPHAN_AGE))


def tend(runtime: Runtime, destination: str, force: bool = False) -> None:
    """Ask again for what is overdue, give up on what was asked too often,
    and open transactions for orphaned copies. At most every ``TEND_EVERY`` s
    per destination unless ``force``."""
    now = time.monotonic()
    if not force and now < _next_tend.get(destination, 0.0):
        return
    _next_tend[destination] = now + TEND_EVERY
    settings = runtime.config.destinations[destination].commitment
    if settings is None:
        return
    book = runtime.transactions
    for tx in book.of(destination):
        if tx.deadline > time.time():
            continue
        if tx.request >= settings.max_requests:
            _give_up(runtime, tx, f"stored but not committed: no commitment report after {tx.request} request(s)")
            continue
        fresh = book.reissue(tx, settings.timeout_seconds)
        if fresh is not None:
            log.warning("commit %s: no report for transaction %s within its deadline; asking again as %s",
                        destination, tx.uid, fresh.uid)
            _ask(runtime, fresh)
    orphans = book.orphans(destination, ORPHAN_AGE)
    if orphans:
        refs = []
        for spool_id in orphans:
            path = runtime.spool.awaiting_commitment_path(destination, spool_id)
            try:
                with open(path, "rb", buffering=0) as fp:
                    info = read_info(fp, path)
            except FileNotFoundError:
                continue
            except (OSError, PermanentSendError) as exc:
                log.error("commit %s (%s): unreadable stored copy: %s", destination, spool_id, exc)
                continue
            refs.append((spool_id, Reference(info.sop_class, info.sop_instance)))
        if refs:
            log.warning("commit %s: %d stored instance(s) had no transaction (a crash?); asking now",
                        destination, len(refs))
            request(runtime, destination, refs)
