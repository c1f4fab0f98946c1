"""The storage commitment transactions the router asked destinations for, on disk.

A destination with ``storage_commitment`` keeps each instance it stored in
``commit/DEST/`` (:meth:`Spool.move_to_awaiting_commitment`) until it reports it
committed (docs/guarantees.md, G2). Before an N-ACTION asks for commitment,
its transaction is written here durably (``commit/DEST/tx/UID.json``): the
report may come on another association, to another process (the ingest), or
after a restart, and must still find what it answers. A transaction whose
report does not come by its deadline is asked again under a new Transaction
UID; the files in ``commit/`` and these records are the whole state, so a
``kill -9`` anywhere loses no transaction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from redis.exceptions import RedisError

from router.kernel import history, keys
from router.kernel.commitment.messages import Reference, Report, new_transaction_uid
from router.kernel.dispatch import Dispatcher
from router.kernel.spool import SUFFIX, Spool

log = logging.getLogger(__name__)

RECORD = ".json"


@dataclass(frozen=True)
class Transaction:
    """One request for commitment: which spool files it covers, and until when it waits."""

    uid: str
    destination: str
    refs: tuple[tuple[str, Reference], ...]
    """(spool id, reference) of every instance asked for."""
    created: float
    deadline: float
    request: int
    """1 for the first request of these instances, 2 for the first re-request, ..."""

    def to_json(self) -> str:
        return json.dumps({
            "transaction_uid": self.uid, "destination": self.destination, "created": self.created,
            "deadline": self.deadline, "request": self.request,
            "refs": [[spool_id, ref.sop_class, ref.sop_instance] for spool_id, ref in self.refs],
        })

    @classmethod
    def from_json(cls, text: str) -> Transaction:
        data = json.loads(text)
        return cls(
            uid=str(data["transaction_uid"]),
            destination=str(data["destination"]),
            refs=tuple((str(i), Reference(str(c), str(s))) for i, c, s in data["refs"]),
            created=float(data["created"]),
            deadline=float(data["deadline"]),
            request=int(data["request"]),
        )


@dataclass(frozen=True)
class Settled:
    """What a report did to a transaction's instances (spool ids)."""

    committed: list[str]
    failed: list[tuple[str, int]]
    """Sent again: (spool id, failure reason; 0 when the report did not mention it)."""


class Transactions:
    """The transaction records under ``spool_dir/commit``."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def _folder(self, destination: str) -> Path:
        return self.spool.commitment_dir(destination) / "tx"

    def _path(self, destination: str, uid: str) -> Path:
        return self._folder(destination) / f"{uid}{RECORD}"

    def open(self, destination: str, refs: list[tuple[str, Reference]], timeout: float,
             request: int = 1) -> Transaction:
        """Record a new transaction durably; the N-ACTION may be sent once this returns."""
        now = time.time()
        tx = Transaction(new_transaction_uid(), destination, tuple(refs), now, now + timeout, request)
        self._write(tx)
        return tx

    def _write(self, tx: Transaction) -> None:
        """Write a record durably: temp file, fdatasync, rename, folder fsync."""
        folder = self._folder(tx.destination)
        folder.mkdir(parents=True, exist_ok=True)
        final = self._path(tx.destination, tx.uid)
        tmp = folder / f".{tx.uid}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, tx.to_json().encode())
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def postpone(self, tx: Transaction, deadline: float) -> Transaction:
        """The same transaction, asked again at ``deadline`` (its N-ACTION did not get through)."""
        later = Transaction(tx.uid, tx.destination, tx.refs, tx.created, deadline, tx.request)
        self._write(later)
        return later

    def of(self, destination: str) -> list[Transaction]:
        """Every open transaction of ``destination``, oldest first."""
        folder = self._folder(destination)
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.glob(f"*{RECORD}")):
            tx = self._read(path)
            if tx is not None:
                found.append(tx)
        found.sort(key=lambda tx: tx.created)
        return found

    def _read(self, path: Path) -> Transaction | None:
        try:
            return Transaction.from_json(path.read_text())
        except FileNotFoundError:
            return None  # settled meanwhile
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("commitment record %s is unreadable (%s); its instances are asked for again", path, exc)
            path.unlink(missing_ok=True)
            return None

    def find(self, uid: str, destinations: list[str]) -> Transaction | None:
        """The open transaction ``uid`` of one of ``destinations``, if any."""
        if not uid or "/" in uid or uid.startswith("."):
            return None
        for destination in destinations:
            path = self._path(destination, uid)
            if path.exists():
                return self._read(path)
        return None

    def close(self, tx: Transaction) -> None:
        self._path(tx.destination, tx.uid).unlink(missing_ok=True)

    def settle(self, tx: Transaction, report: Report) -> Settled:
        """Apply a destination's report: committed copies go, failed ones are to be sent again.

        A reference the report does not mention counts as failed (PS3.4
        §J.3.3 lists every one). A committed reference whose SOP class differs
        from what was asked is not trusted as committed. The record goes last:
        a crash midway leaves it, and the next request skips what was done.
        """
        committed = set(report.committed)
        reasons = {ref: reason for ref, reason in report.failed}
        done: list[str] = []
        again: list[tuple[str, int]] = []
        for spool_id, ref in tx.refs:
            if ref in committed and ref not in reasons:
                self.spool.remove_committed(tx.destination, spool_id)
                done.append(spool_id)
            elif self.spool.move_back_to_out(tx.destination, spool_id):
                again.append((spool_id, reasons.get(ref, 0)))
        self.close(tx)
        return Settled(done, again)

    def reissue(self, tx: Transaction, timeout: float) -> Transaction | None:
        """A new transaction for what ``tx`` still waits for (its report never came).

        Returns None when none of its instances wait any more.
        """
        left = [(spool_id, ref) for spool_id, ref in tx.refs
                if self.spool.awaiting_commitment_path(tx.destination, spool_id).exists()]
        fresh = self.open(tx.destination, left, timeout, tx.request + 1) if left else None
        self.close(tx)
        return fresh

    def orphans(self, destination: str, older_than: float) -> list[str]:
        """Spool ids stored at ``destination`` that no transaction covers.

        They appear when a process died between the C-STORE and recording the
        transaction; ``older_than`` seconds (since the file last changed
        state) keeps a batch being recorded right now out of the list.
        """
        covered = {spool_id for tx in self.of(destination) for spool_id, _ in tx.refs}
        cutoff = time.time() - older_than
        found = []
        folder = self.spool.commitment_dir(destination)
        for spool_id in self.spool.ids_awaiting_commitment(destination):
            if spool_id in covered:
                continue
            try:
                if (folder / f"{spool_id}{SUFFIX}").stat().st_ctime <= cutoff:
                    found.append(spool_id)
            except FileNotFoundError:
                continue
        return found


def apply_report(transactions: Transactions, dispatcher: Dispatcher, destinations: list[str],
                 report: Report) -> Settled | None:
    """Take a destination's commitment report, on whichever association it came.

    Committed copies leave the spool; the failed ones go back to their
    destination's backlog to be sent and committed again. The ingest (a
    report on a new association) and the forwarding worker (one on its own
    association) both end here.

    Args:
        destinations: where the transaction may belong (the configured ones).

    Returns:
        What was done, or None when no open transaction has the report's UID
        (a late report of a transaction asked again since, or not ours).
    """
    tx = transactions.find(report.transaction_uid, destinations)
    if tx is None:
        return None
    settled = transactions.settle(tx, report)
    try:
        pipe = dispatcher.redis.pipeline(transaction=False)
        for spool_id in settled.committed:
            history.committed(pipe, spool_id, tx.destination, tx.uid)
        for spool_id, reason in settled.failed:
            history.commit_failed(pipe, spool_id, tx.destination, reason, tx.uid)
        pipe.execute()
        if settled.failed:
            dispatcher.submit(keys.forward(tx.destination), [spool_id for spool_id, _ in settled.failed])
    except RedisError as exc:
        # The files are in out/ already: the reconciler queues them.
        log.warning("commitment report %s: Redis unavailable (%s); the reconciler re-queues what failed",
                    report.transaction_uid, exc)
    log.info("commitment report %s from %s: %d committed, %d to send again%s", report.transaction_uid,
             tx.destination, len(settled.committed), len(settled.failed),
             "".join(f"; failed {spool_id}: {reason:#06x}" for spool_id, reason in settled.failed[:5]))
    return settled
