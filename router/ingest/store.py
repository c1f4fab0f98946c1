"""C-STORE at the ingest: one decision from command to answer.

What the peer is told is decided here once, as ``fastscp`` streams the bytes
off the wire:

* 0xC000 when the command names no SOP Class or Instance UID the router
  can handle (PS3.7 §9.1.1.1; ``router/kernel/uids.py``: one that is not
  PS3.5 §9.1 but safe passes with a warning), 0xA900 when its SOP
  class is not its presentation context's (PS3.8 §7.1.1.13) — decided
  before a byte of the dataset is kept;
* 0xA700 when the spool has no room or a write fails (nothing is left);
* 0xC000, and a copy in quarantine with the reason, when the bytes do not
  walk as one whole dataset;
* 0xA900 when the dataset is another instance, or of another SOP class,
  than the command announces;
* Success only once the instance is durable in ``incoming/`` (docs/guarantees.md,
  G1: fdatasync, rename, directory fsync).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from router.ingest.validate import (
    DatasetFacts,
    NeedsWhole,
    check_dataset,
    identity_problem,
)
from router.kernel import filemeta
from router.kernel.errors import MalformedDataset, SpoolFull
from router.kernel.handoff import Route
from router.kernel.spool import Spool
from router.kernel.status import Status
from router.kernel.uids import uid_oddity, uid_problem

log = logging.getLogger(__name__)


@dataclass
class Store:
    """A C-STORE whose dataset is arriving: the temp file, or the refusal to answer."""

    message_id: int
    context_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    context_class: str
    """The abstract syntax of the presentation context it came on."""
    tmp: Path | None = None
    fd: int | None = None
    meta_length: int = 0
    unflushed: int = 0
    """Bytes written since writeback was last started (:meth:`StoreHandler.flush`)."""
    written: int = 0
    """Dataset bytes written so far."""
    head: bytearray = field(default_factory=bytearray)
    """The dataset's first ``HEAD_BYTES``, kept as they arrive: the check walks them
    without reading the file back (:func:`_check`)."""
    status: int | None = None  # set when the rest of the dataset is to be drained and refused
    why: str = ""  # the reason for that refusal, for the log
    origin: filemeta.Origin | None = None
    route: Route | None = None
    """Set when the ingest routed it itself (it is in its destinations' ``out/`` folders)."""
    retrieve: str = ""
    """The C-MOVE or C-GET the router answers that this instance was retrieved for
    (a sub-operation of the router's own C-MOVE to a source): kept in
    ``retrieved/``, never routed (router/services/retrieve.py)."""
    retrieved: Path | None = None
    """Where it was kept, then."""


def command_problem(store: Store) -> tuple[int, str] | None:
    """Why a C-STORE-RQ cannot lead to a deliverable instance: (status, reason), or None.

    A modality that hears Success deletes its copy, so Success is only for an
    instance the router can pass on.
    """
    for name, value in (("Affected SOP Class UID", store.sop_class_uid),
                        ("Affected SOP Instance UID", store.sop_instance_uid)):
        problem = uid_problem(name, value)
        if problem is not None:
            return Status.CANNOT_UNDERSTAND, problem
    if store.sop_class_uid != store.context_class:
        return (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"Affected SOP Class UID {store.sop_class_uid} on a context for {store.context_class}")
    return None


class StoreHandler:
    """The C-STORE handler the association calls, its dependencies bound in.

    Args:
        spool: where instances are kept.
        ae_title: this router's AE title (the spool files' Source AE Title).
        choose: routes an instance from its header (or a function that reads
            it, called only if a rule looks at the dataset) and origin before it is
            made durable (``router.route_at_ingest``): a :class:`Route` when
            it goes, untouched, to its destinations' ``out/`` folders at
            once; None to leave it in ``incoming/`` for the routing worker.
    """

    def __init__(self, spool: Spool, ae_title: str,
                 choose: Callable[[Dataset | Callable[[], Dataset], filemeta.Origin, tuple[str, ...]], Route | None]
                 | None = None) -> None:
        self.spool = spool
        self.ae_title = ae_title
        self.choose = choose

    def begin(self, store: Store, origin: filemeta.Origin) -> None:
        """The command arrived: refuse it (``store.status``) or open its temp file, meta written."""
        store.origin = origin
        if store.status is not None:
            return  # refused before it began (a sub-operation of no retrieve of ours)
        problem = command_problem(store)
        if problem is not None:
            store.status, store.why = problem
            return
        if not self.spool.has_room():
            store.status = Status.OUT_OF_RESOURCES
            store.why = f"spool has less than {self.spool.min_free_bytes} bytes free"
            return
        meta = filemeta.encode(store.sop_class_uid, store.sop_instance_uid, store.transfer_syntax, origin,
                               self.ae_title)
        try:
            store.tmp, store.fd = self.spool.open_temp(recycled=True)
            write_all(store.fd, meta)
        except (SpoolFull, OSError) as exc:
            self._fail(store, exc)
            return
        store.meta_length = len(meta)

    def write(self, store: Store, data: bytes | memoryview) -> None:
        """Append dataset bytes; a failed write refuses the instance (0xA700) and drops the file."""
        if store.status is not None or store.fd is None:
            return  # refused already: the rest is drained
        try:
            write_all(store.fd, data)
        except OSError as exc:
            self._fail(store, exc)
            return
        if store.written < HEAD_BYTES:
            store.head += data[: HEAD_BYTES - store.written]
        store.written += len(data)
        store.unflushed += len(data)

    def flush(self, store: Store) -> None:
        """Start writing what arrived so far to disk, without waiting (see :func:`start_writeback`),
        once ``WRITEBACK_EVERY`` bytes are waiting: each call submits its own I/O, and
        the last part is fdatasync's anyway."""
        if store.status is None and store.fd is not None and store.unflushed >= WRITEBACK_EVERY:
            start_writeback(store.fd)
            store.unflushed = 0

    def finish(self, store: Store, caller: str) -> tuple[int, str | None]:
        """The last fragment arrived: the status to answer and the spool id when kept.

        The temp file is gone afterwards whatever the outcome (admitted,
        quarantined or discarded).

        Args:
            caller: who sent it (``AE@IP``), for the log and the quarantine reason.
        """
        try:
            if store.status is not None:
                # A full spool is the operator's to fix; a bad command, the sender's.
                level = logging.ERROR if store.status == Status.OUT_OF_RESOURCES else logging.WARNING
                log.log(level, "C-STORE %s from %s refused (0x%04X): %s", store.sop_instance_uid or "?", caller,
                        store.status, store.why)
                return store.status, None
            return self._keep(store, caller)
        finally:
            self.discard(store)

    def discard(self, store: Store) -> None:
        """Drop the temp file of an instance that will not be kept (or whose association ended)."""
        if store.tmp is not None:
            self.spool.discard_temp(store.tmp, store.fd)
        store.tmp = store.fd = None

    def _fail(self, store: Store, exc: Exception) -> None:
        if isinstance(exc, SpoolFull) or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            store.why = f"spool {self.spool.root} is full"
        else:
            store.why = f"spool write failed: {exc}"
        self.discard(store)
        store.status = Status.OUT_OF_RESOURCES

    def _keep(self, store: Store, caller: str) -> tuple[int, str | None]:
        assert store.tmp is not None and store.fd is not None
        try:
            # A recycled file: what is beyond this instance is another's.
            self.spool.trim_temp(store.fd, store.meta_length + store.written)
        except OSError:
            log.exception("C-STORE %s refused: spool write failed", store.sop_instance_uid)
            return Status.OUT_OF_RESOURCES, None
        # The disk writes the rest while the check runs: the fdatasync after it waits less.
        start_writeback(store.fd)
        facts, problem = _check(store.fd, store.meta_length, store.transfer_syntax, header=self.choose is not None,
                                head=store.head, length=store.written)
        if facts is not None:
            mismatch = identity_problem(facts, store.sop_class_uid, store.sop_instance_uid)
            if mismatch is not None:
                log.warning("C-STORE %s from %s refused (0x%04X): %s", store.sop_instance_uid, caller,
                            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, mismatch)
                return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, None
        tmp, fd = store.tmp, store.fd
        store.tmp = store.fd = None  # admit_temp and quarantine_temp close and move or delete it
        if problem is not None:
            try:
                qid = self.spool.quarantine_temp(tmp, fd, f"undecodable dataset from {caller}: {problem}")
            except (SpoolFull, OSError):
                log.exception("could not quarantine an undecodable dataset")
                return Status.OUT_OF_RESOURCES, None
            log.warning("C-STORE %s from %s: %s (quarantined as %s)", store.sop_instance_uid, caller, problem, qid)
            return Status.CANNOT_UNDERSTAND, None
        if store.retrieve:
            try:
                store.retrieved = self.spool.admit_retrieved(tmp, fd, store.retrieve)
            except (SpoolFull, OSError):
                log.exception("C-STORE %s (retrieved) refused: spool write failed", store.sop_instance_uid)
                return Status.OUT_OF_RESOURCES, None
            return Status.SUCCESS, store.retrieved.stem
        route = self._route(facts, store, caller)
        try:
            spool_id = self.spool.admit_temp(tmp, fd, route.destinations if route is not None else ())
        except SpoolFull:
            log.error("C-STORE %s refused: spool %s is full", store.sop_instance_uid, self.spool.root)
            return Status.OUT_OF_RESOURCES, None
        except OSError:
            log.exception("C-STORE %s: spool write failed", store.sop_instance_uid)
            return Status.OUT_OF_RESOURCES, None
        store.route = route
        log.debug("C-STORE %s from %s spooled as %s%s", store.sop_instance_uid, caller, spool_id,
                  f" for {', '.join(route.destinations)}" if route is not None else "")
        for name, value in (("SOP Class UID", store.sop_class_uid), ("SOP Instance UID", store.sop_instance_uid)):
            if (oddity := uid_oddity(value)) is not None:
                log.warning("C-STORE %s from %s: its %s %s %s; accepted and passed on unchanged",
                            store.sop_instance_uid, caller, name, value, oddity)
        return Status.SUCCESS, spool_id


    def _route(self, facts: DatasetFacts | None, store: Store, caller: str) -> Route | None:
        """Where the rules send it untouched, or None: the routing worker's (or no header)."""
        if self.choose is None or facts is None or store.origin is None:
            return None
        header = facts.read_header or facts.header
        if header is None:
            return None
        try:
            return self.choose(header, store.origin, facts.identifiers)
        except Exception:  # noqa: BLE001 - the routing worker routes it, or quarantines it with why
            log.exception("C-STORE %s from %s: routing at ingest failed; left to the routing worker",
                          store.sop_instance_uid, caller)
            return None


WRITEBACK_EVERY = 256 * 1024
"""Bytes of an arriving instance between two starts of writeback (a 512 KiB CT: one;
a small instance: none; profiled, issue 20)."""
_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages, do not wait


def start_writeback(fd: int) -> None:
    """Start writing what is already received to disk, without waiting.

    The final fdatasync then waits only for the last pages and the journal,
    instead of for the whole instance: disk writes overlap the rest of the
    transfer (Linux sync_file_range(2); a no-op elsewhere).
    """
    try:
        _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
    except AttributeError:
        pass


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


HEAD_BYTES = 64 * 1024
"""The first bytes of an arriving dataset kept in memory for the check: an
uncompressed image's whole header, as a rule (issue 20: mapping the file to walk
it cost more than the walk)."""


def _check(fd: int, offset: int, transfer_syntax: str, header: bool = False, head: bytes | bytearray = b"",
           length: int | None = None) -> tuple[DatasetFacts | None, str | None]:
    """What the dataset after ``offset`` in the file says it is, or why it is
    not a whole dataset.

    The dataset's first bytes (``head``, of ``length`` in all) are walked first;
    when the walk needs more (encapsulated fragments, a long header), the file is
    mapped, not read: the check walks the page cache in place.
    """
    if head and length is not None:
        try:
            # The header is built only if a rule looks at the dataset (the head stays as it is).
            return check_dataset(head, transfer_syntax, header, length=length, lazy=True), None
        except NeedsWhole:
            pass
        except MalformedDataset as exc:
            return None, str(exc)
    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    facts = problem = None
    try:
        with memoryview(mapped) as whole, whole[offset:] as dataset:
            try:
                facts = check_dataset(dataset, transfer_syntax, header)
            except MalformedDataset as exc:
                problem = str(exc)
    finally:
        try:
            mapped.close()
        except BufferError:
            pass  # a view still held by a traceback: unmapped when it is collected
    return facts, problem
