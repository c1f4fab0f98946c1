"""Reconciliation: make Redis agree with the spool again.

The spool is the truth. Whatever it holds that no backlog knows — because
Redis restarted empty, a push failed while Redis was away, or a worker died
holding a batch — is queued again (docs/guarantees.md, G3). Delivery is at least
once: an instance whose acknowledgement was lost in a crash is sent again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from router.kernel import history, keys, telemetry
from router.kernel.dispatch import Dispatcher
from router.kernel.filemeta import origin_of
from router.kernel.spool import SUFFIX, Spool, id_time

log = logging.getLogger(__name__)

GRACE = 5.0
"""Seconds a new spool file may wait for its own push before it counts as lost."""


def reconcile(spool: Spool, dispatcher: Dispatcher, destinations: list[str], grace: float = GRACE) -> dict[str, int]:
    """Re-queue every spool file Redis has no record of.

    Args:
        spool: the spool.
        dispatcher: where to queue.
        destinations: the configured destination names.
        grace: files younger than this are left to the process writing them.

    Returns:
        ``{backlog name: ids re-queued}`` for the backlogs that needed any.
    """
    requeued: dict[str, int] = {}
    backlogs = [(keys.ROUTE, spool.incoming)]
    for destination in sorted(set(destinations) | set(spool.destinations_with_work())):
        if destination not in destinations:
            left = spool.ids_in(spool.out_dir(destination))
            if left:
                log.warning("%d instances wait for %s, which is no longer configured", len(left), destination)
            continue
        backlogs.append((keys.forward(destination), spool.out_dir(destination)))
    for name, folder in backlogs:
        backlog = dispatcher.backlog(name)
        released = backlog.release_abandoned()
        # Disk first, then Redis: an id that moves on in between is at worst
        # queued twice, and a second attempt finds its file gone.
        on_disk = spool.ids_in(folder, older_than=grace)
        known = backlog.known() if on_disk else set()
        missing = [i for i in on_disk if i not in known]
        if missing:
            # Received while Redis was away: in incoming/, or in out/ when the
            # ingest routed them itself (router.route_at_ingest).
            _record_receipts(spool, dispatcher, missing, folder)
        if missing:
            dispatcher.submit_all({name: missing})
        elif released:
            dispatcher.kick(name)
        if missing or released:
            requeued[name] = len(missing) + released
            log.warning("reconcile %s: %d re-queued from the spool, %d released from dead workers", name, len(missing), released)
    return requeued


def _record_receipts(spool: Spool, dispatcher: Dispatcher, spool_ids: list[str], folder: Path) -> None:
    """Give received instances Redis never heard of (it was unreachable, or restarted empty)
    their recorded receipt and its count, read from each file's meta in ``folder``: a storage
    commitment request for them is then answered truly, not with 0x0112. An instance
    whose receipt is recorded is left as it is."""
    receipts, callers = [], {}
    for spool_id in spool_ids:
        try:
            meta = read_file_meta_info(folder / f"{spool_id}{SUFFIX}")
        except FileNotFoundError:
            continue  # routed meanwhile
        except Exception as exc:  # noqa: BLE001 - the router checks the whole file when it routes it
            log.warning("reconcile: %s has an unreadable file meta (%s); routing will say more", spool_id, exc)
            continue
        origin = origin_of(meta)
        callers[spool_id] = origin.calling_ae_title
        receipts.append(history.Receipt(spool_id, str(meta.get("MediaStorageSOPInstanceUID", "")),
                                        str(meta.get("MediaStorageSOPClassUID", "")),
                                        f"{origin.calling_ae_title}@{origin.source_ip}",
                                        id_time(spool_id) or time.time()))
    fresh = history.received_unless_known(dispatcher.redis, receipts)
    pipe = dispatcher.redis.pipeline(transaction=False)
    for spool_id in fresh:
        telemetry.count_received(pipe, callers[spool_id])
    pipe.execute()
    if fresh:
        log.warning("reconcile: %d received instance(s) had no history (Redis was away, or the ingest that "
                    "answered them died before recording them); recorded now", len(fresh))
