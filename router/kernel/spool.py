"""The durable spool: the only copy of an instance between receipt and delivery.

Layout under ``spool_dir`` (every state is a directory, so the spool alone
says what is left to do, whatever Redis remembers)::

    tmp/                     partial writes; never read, swept at start
    incoming/ID.dcm          received and durable, not yet routed
    out/DEST/ID.dcm          chosen for DEST, not yet acknowledged by it
    commit/DEST/ID.dcm       stored at DEST, waiting for its storage commitment
    commit/DEST/tx/UID.json  the commitment transactions requested from DEST
    commitments/requests/HOST/UID.json  modalities' commitment requests not yet reported
    dead/DEST/ID.dcm + .json dead letters: retries exhausted or refused for good
    quarantine/ID.dcm + .json unreadable at routing, or unrouted under ``unrouted: keep``
    quarantine/ID.bin + .json not a whole dataset at ingest (answered 0xC000)
    retrieved/OP/ID.dcm      taken from a Q/R source for a C-MOVE or C-GET the router
                             answers (router/services/retrieve.py); never routed, gone
                             once passed on (the source keeps its own copy)
    mpps/…                   MPPS messages held for a destination (router/services/mpps.py)
    free/ID.free             delivered instances' files, kept to be written over by the
                             next instances received (``RECYCLED_KEPT``); never read

A file appears in a state only by ``rename`` (or ``link``) of a file that was
fsynced first, so a worker never sees half an instance (docs/guarantees.md, G1). An
instance routed to several destinations is hard-linked into each ``out/``
folder; the bytes stay on disk until the last link is acknowledged (docs/guarantees.md, G2).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from router.kernel.errors import SpoolFull

SUFFIX = ".dcm"
UNDECODABLE = ".bin"
"""A quarantined file the ingest found to be no whole dataset (it never became an instance)."""
PART = ".part"
FREE = "free"
"""The spool's folder of delivered files kept to be written over (no instance's: counts skip it)."""
RECYCLED = ".free"
RECYCLED_KEPT = 32
"""At most this many delivered files wait in ``free/`` to be written over by instances
received later, instead of being deleted and created again. Making and deleting a
file per instance was the largest single cost of the ingest (issue 20, ``perf``: the
file system's inode allocation and release, a fifth of the ingest's CPU and an eighth
of a forwarder's); a file written over keeps its inode and its blocks. PostgreSQL
recycles its WAL segment files for the same reason."""
RECYCLED_RECOUNT = 8
"""A process counts the files in ``free/`` once every this many releases."""
ROOM_RECHECK = 0.1
ROOM_MARGIN = 4
""":meth:`Spool.has_room` looks at the file system at most every ``ROOM_RECHECK`` s
while more than ``ROOM_MARGIN`` x ``min_free_bytes`` are free (a burst at 500
instances of 0.5 MiB a second writes 25 MiB in that time), and at every instance
once less is."""
RECYCLED_MAX_BYTES = 4 * 1024 * 1024
"""Larger files are deleted, not kept: ``free/`` never holds more than
``RECYCLED_KEPT`` x this (128 MiB) of disk."""
HOST = socket.gethostname().replace("~", "-").replace("/", "-")
"""This host's name as spool file and folder names carry it (a shared spool tells hosts apart by it)."""


def _writer_gone(name: str) -> bool:
    """Whether the temp file ``name`` was written on this host by a process that has exited."""
    parts = name.removesuffix(PART).split("~")
    if len(parts) != 4 or parts[1] != HOST or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


class _Unique:
    """Random bits for names, drawn without a system call each (``secrets`` asks the
    kernel every time): a generator seeded from the kernel once per process, and
    again in a forked child, so that two processes never draw the same sequence."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.random = random.Random(secrets.token_bytes(16))
        self.pid = os.getpid()

    def hex8(self) -> str:
        return f"{self.random.getrandbits(32):08x}"


_unique = _Unique()


def new_id() -> str:
    """A spool id: time-ordered (so listings come out oldest first) and unique."""
    return f"{time.time_ns():016x}-{_unique.hex8()}"


def id_time(spool_id: str) -> float | None:
    """When :func:`new_id` minted ``spool_id`` (epoch seconds: the instance's receipt), or
    None for an id it did not mint."""
    try:
        return int(spool_id.partition("-")[0], 16) / 1e9
    except ValueError:
        return None


@dataclass(frozen=True)
class DeadLetter:
    """An instance a destination will not take, kept with why (``dicom-router queues``)."""

    destination: str
    spool_id: str
    path: Path
    reason: str
    attempts: int
    since: float
    sop_instance_uid: str = ""
    status: int | None = None
    """The destination's last DIMSE status for it, when it answered one."""
    unmorphed: bool = False
    """The rules' morph for this destination failed: the file is the instance
    as received, which must never be sent as it is (``dicom-router retry``
    morphs it again)."""


@dataclass(frozen=True)
class Quarantined:
    """An instance kept out of routing, visibly, with why (``dicom-router quarantine``)."""

    spool_id: str
    path: Path
    reason: str

    @property
    def undecodable(self) -> bool:
        """The ingest found no whole dataset in it (answered 0xC000): only its bytes were kept."""
        return self.path.suffix == UNDECODABLE


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory tree.

    Args:
        root: the spool directory (created if missing).
        min_free_bytes: below this much free space, :meth:`receive` refuses.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.quarantine_dir = self.root / "quarantine"
        self.free = self.root / FREE
        self._out_dirs: dict[str, Path] = {}
        self._recycled: list[str] = []  # names seen in free/, not yet taken (by this process)
        self._releases = 0  # copies released by this process (_room_in_free)
        self._kept = 0  # files in free/ at the last count, plus what this process added since
        self._roomy_until = 0.0  # has_room() answers True without looking until then (time.monotonic())
        for d in (self.tmp, self.incoming, self.quarantine_dir, self.root / "out", self.root / "dead",
                  self.root / "commit", self.free):
            d.mkdir(parents=True, exist_ok=True)

    # -- receiving ---------------------------------------------------------

    def open_temp(self, stem: str | None = None, recycled: bool = False) -> tuple[Path, int]:
        """Create a new, empty file in ``tmp/`` and open it for reading and writing.

        The caller writes the instance, then hands path and descriptor to
        :meth:`admit_temp`, :meth:`quarantine_temp` or :meth:`discard_temp`.

        Args:
            recycled: take a delivered instance's file from ``free/`` when there
                is one (see ``RECYCLED_KEPT``). It still holds that instance's
                bytes: the caller writes from the start and calls
                :meth:`trim_temp` once it wrote everything.

        Raises:
            SpoolFull: no room for even a directory entry.
        """
        # The writer's host and PID are in the name: once that process is
        # gone, its partial file can go too (sweep_tmp), not an hour later.
        path = self.tmp / f"{stem or new_id()}~{HOST}~{_unique.pid}~{_unique.hex8()}{PART}"
        if recycled and (fd := self._take_recycled(path)) is not None:
            return path, fd
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            self._raise_if_full(exc)
            raise
        return path, fd

    def _take_recycled(self, path: Path) -> int | None:
        """Rename a file from ``free/`` to ``path`` and open it, or None when there is none.

        The rename is the claim: of processes (or hosts) taking the same file,
        one gets it, the others try the next.
        """
        while True:
            if not self._recycled:
                try:
                    self._recycled = os.listdir(self.free)
                except OSError:
                    return None
                if not self._recycled:
                    return None
            try:
                name = self._recycled.pop()
            except IndexError:
                continue  # another thread of this process took the last one seen
            try:
                os.rename(self.free / name, path)
            except FileNotFoundError:
                continue  # taken by another process
            except OSError:
                return None
            try:
                return os.open(path, os.O_RDWR)
            except OSError:
                with contextlib.suppress(OSError):  # not a file (put there by hand): left for tmp/'s sweep
                    path.unlink()
                return None

    @staticmethod
    def trim_temp(fd: int, length: int) -> None:
        """Cut a temp file written from its start at the ``length`` bytes written: a
        recycled file (``open_temp(recycled=True)``) may be longer than the instance now in it."""
        os.ftruncate(fd, length)

    def _release(self, path: Path) -> None:
        """Delete an instance's copy that is done with; when it was the instance's last
        copy, keep its file in ``free/`` instead, to be written over (``RECYCLED_KEPT``)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return  # gone already
        except OSError:
            st = None
        if st is not None and st.st_nlink == 1 and st.st_size <= RECYCLED_MAX_BYTES and self._room_in_free():
            try:
                os.rename(path, self.free / f"{new_id()}{RECYCLED}")
                self._kept += 1
                return
            except OSError:
                pass  # free/ is gone (an operator's doing) or will not take it: deleted instead
        path.unlink(missing_ok=True)

    def _room_in_free(self) -> bool:
        """Whether ``free/`` takes one more file: counted every ``RECYCLED_RECOUNT``
        releases, and between counts by what this process added (other processes
        may add as many: the bound holds within a few files)."""
        self._releases += 1
        if self._releases % RECYCLED_RECOUNT == 1:
            try:
                self._kept = len(os.listdir(self.free))
            except OSError:
                self._kept = RECYCLED_KEPT  # no free/ to keep files in
        return self._kept < RECYCLED_KEPT

    def drop_recycled(self) -> int:
        """Delete every file kept in ``free/`` (the disk is full); how many went."""
        self._recycled = []
        dropped = 0
        try:
            names = os.listdir(self.free)
        except OSError:
            return 0
        for name in names:
            try:
                os.unlink(self.free / name)
                dropped += 1
            except OSError:
                continue  # taken meanwhile
        return dropped

    def _raise_if_full(self, exc: OSError) -> None:
        """Translate a full disk (or quota) into :class:`SpoolFull`; other errors stay as they are.

        The files kept for reuse go first, so that the next instance may fit.
        """
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.drop_recycled()
            raise SpoolFull(f"spool {self.root} is full") from exc

    def _make_durable(self, tmp: Path, fd: int, final: Path, *more: Path, admitting: bool = False) -> None:
        """fdatasync and close ``fd``, give ``tmp`` its final names (hard links for
        ``more``, then a rename to ``final``), fsync each of their folders.

        On failure ``tmp`` is deleted: nothing half-written stays behind. An
        instance being admitted (``admitting``, or ``more``: one for several
        destinations) is all or nothing: every name made goes too, since its
        sender is answered a failure and sends it again. Otherwise ``final``
        may be a replacement (:meth:`write_durably`): once renamed, the earlier
        version is gone whatever happens, so the new one stays.
        """
        made: list[Path] = []
        try:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            for target in more:
                os.link(tmp, target)
                made.append(target)
            os.rename(tmp, final)
            if more or admitting:
                made.append(final)
            for folder in dict.fromkeys(target.parent for target in (*more, final)):
                fsync_dir(folder)
        except OSError as exc:
            for target in made:
                target.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            self._raise_if_full(exc)
            raise

    def write_durably(self, final: Path, data: bytes) -> None:
        """Write a small record (a commitment request) to ``final``, replacing any
        earlier version, so that it survives a crash right after this returns.

        Raises:
            SpoolFull: the disk is full; ``final`` is as it was.
        """
        self._write_durably(final, data)

    def _write_durably(self, final: Path, *chunks: bytes | memoryview) -> None:
        """Write ``chunks`` to ``final`` via tmp + fdatasync + rename + dir fsync."""
        tmp, fd = self.open_temp(final.name)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
        except OSError as exc:
            self.discard_temp(tmp, fd)
            self._raise_if_full(exc)
            raise
        self._make_durable(tmp, fd, final)

    def admit_temp(self, tmp: Path, fd: int, destinations: Sequence[str] = ()) -> str:
        """Admit a fully written temp file as a received instance: fdatasync, then a
        name in ``incoming/`` (to be routed), or with ``destinations`` one in each
        of their ``out/`` folders (routed already: the ingest's own routing), and
        an fsync of each folder (docs/guarantees.md, G1).

        Args:
            tmp: a file from :meth:`open_temp`.
            fd: its open descriptor; closed by this call, whatever happens.
            destinations: where the instance goes untouched (hard links).

        Returns:
            The new spool id; the file is on disk and fsynced when this returns.

        Raises:
            SpoolFull: the disk filled up; the temp file is gone.
        """
        spool_id = new_id()
        if not destinations:
            self._make_durable(tmp, fd, self.incoming_path(spool_id), admitting=True)
            return spool_id
        try:
            *others, last = (self.out_path(destination, spool_id) for destination in destinations)
        except OSError as exc:  # a destination's folder cannot be made
            self.discard_temp(tmp, fd)
            self._raise_if_full(exc)
            raise
        self._make_durable(tmp, fd, last, *others, admitting=True)
        return spool_id

    def retrieved_dir(self, operation: str) -> Path:
        """The folder of the instances retrieved for one C-MOVE or C-GET."""
        return self.root / "retrieved" / operation

    def admit_retrieved(self, tmp: Path, fd: int, operation: str) -> Path:
        """Keep a fully written temp file as an instance retrieved for ``operation``
        (fdatasync, rename into ``retrieved/OP/``): never routed, only passed on
        to whoever the operation serves.

        Raises:
            SpoolFull: the disk filled up; the temp file is gone.
        """
        folder = self.retrieved_dir(operation)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.discard_temp(tmp, fd)
            self._raise_if_full(exc)
            raise
        final = folder / f"{new_id()}{SUFFIX}"
        self._make_durable(tmp, fd, final)
        return final

    def sweep_retrieved(self, operation: str | None = None, older_than: float = 0.0) -> int:
        """Remove what was retrieved for ``operation`` (once it ended), or, without one,
        the folders of operations untouched for ``older_than`` seconds (a crash's)."""
        root = self.root / "retrieved"
        if operation is not None:
            folders = [root / operation]
        else:
            cutoff = time.time() - older_than
            try:
                folders = [f for f in root.iterdir() if f.stat().st_mtime < cutoff]
            except FileNotFoundError:
                return 0
        removed = 0
        for folder in folders:
            try:
                for path in folder.iterdir():
                    path.unlink(missing_ok=True)
                    removed += 1
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                continue  # an arrival being written into it this moment: next sweep
        return removed

    def discard_temp(self, tmp: Path, fd: int | None = None) -> None:
        """Close and delete a temp file that will not become an instance."""
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # already closed, or the close reported a lost write: the file goes anyway
        tmp.unlink(missing_ok=True)

    def has_room(self) -> bool:
        """Whether the spool's file system has more than ``min_free_bytes`` free (once
        the files kept for reuse are deleted, when it takes that).

        Asked for every instance: while more than ``ROOM_MARGIN`` times
        ``min_free_bytes`` were free at the last look, the file system is looked
        at again only after ``ROOM_RECHECK`` seconds.
        """
        if not self.min_free_bytes:
            return True
        now = time.monotonic()
        if now < self._roomy_until:
            return True
        free = self._free_bytes()
        if free >= self.min_free_bytes * ROOM_MARGIN:
            self._roomy_until = now + ROOM_RECHECK
        if free >= self.min_free_bytes:
            return True
        if not self.drop_recycled():
            return False
        return self._free_bytes() >= self.min_free_bytes

    def _free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def receive(self, *chunks: bytes | memoryview) -> str:
        """Store a received instance durably in ``incoming/``.

        Returns:
            The new spool id; the file is on disk and fsynced when this returns.

        Raises:
            SpoolFull: the disk is (nearly) full; nothing was kept.
        """
        if not self.has_room():
            raise SpoolFull(f"spool {self.root} has less than {self.min_free_bytes} bytes free")
        spool_id = new_id()
        self._write_durably(self.incoming / f"{spool_id}{SUFFIX}", *chunks)
        return spool_id

    def incoming_path(self, spool_id: str) -> Path:
        return self.incoming / f"{spool_id}{SUFFIX}"

    # -- routing -----------------------------------------------------------

    def out_dir(self, destination: str) -> Path:
        path = self._out_dirs.get(destination)
        if path is None:  # one mkdir per process, not per instance
            path = self.root / "out" / destination
            path.mkdir(parents=True, exist_ok=True)
            self._out_dirs[destination] = path
        return path

    def out_path(self, destination: str, spool_id: str) -> Path:
        return self.out_dir(destination) / f"{spool_id}{SUFFIX}"

    def assign(self, spool_id: str, destination: str) -> Path:
        """Hand the received bytes, unchanged, to ``destination`` (a hard link)."""
        target = self.out_path(destination, spool_id)
        try:
            os.link(self.incoming_path(spool_id), target)
        except FileExistsError:
            pass  # routed before a crash; the link is the same file
        return target

    def assign_bytes(self, spool_id: str, destination: str, data: bytes) -> Path:
        """Give ``destination`` its own, morphed copy of an instance."""
        target = self.out_path(destination, spool_id)
        self._write_durably(target, data)
        return target

    def sync_out(self, destinations: set[str]) -> None:
        """Make the links made by :meth:`assign` durable before ``incoming`` is dropped."""
        for destination in destinations:
            fsync_dir(self.out_dir(destination))

    def remove_routed(self, spool_id: str) -> None:
        """Delete the ``incoming`` name once every destination holds its own."""
        self.incoming_path(spool_id).unlink(missing_ok=True)

    # -- forwarding --------------------------------------------------------

    def remove_delivered(self, destination: str, spool_id: str) -> None:
        """Delete ``destination``'s copy: it acknowledged the instance."""
        self._release(self.out_path(destination, spool_id))

    # -- storage commitment (destinations with ``storage_commitment``) --------

    def commitment_dir(self, destination: str) -> Path:
        return self.root / "commit" / destination

    def awaiting_commitment_path(self, destination: str, spool_id: str) -> Path:
        return self.commitment_dir(destination) / f"{spool_id}{SUFFIX}"

    def move_to_awaiting_commitment(self, destination: str, spool_id: str) -> None:
        """Move ``destination``'s copy from ``out/`` to ``commit/``: it stored the instance;
        the copy stays until it commits it (docs/guarantees.md, G2).

        A crash that loses this rename leaves the file in ``out/``: it is
        sent again, which is safe (delivery is at least once).
        """
        target = self.awaiting_commitment_path(destination, spool_id)
        try:
            os.rename(self.out_path(destination, spool_id), target)
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.out_path(destination, spool_id), target)

    def remove_committed(self, destination: str, spool_id: str) -> None:
        """Delete ``destination``'s stored copy: it committed the instance."""
        self._release(self.awaiting_commitment_path(destination, spool_id))

    def move_back_to_out(self, destination: str, spool_id: str) -> bool:
        """Move ``destination``'s stored copy back to ``out/``: it failed to commit the
        instance, which is sent (and committed) again. False when the copy is gone already."""
        try:
            os.replace(self.awaiting_commitment_path(destination, spool_id), self.out_path(destination, spool_id))
        except FileNotFoundError:
            return False
        return True

    def bury_awaiting_commitment(self, destination: str, spool_id: str, reason: str, attempts: int,
                                 sop_instance_uid: str = "") -> Path | None:
        """A copy ``destination`` stored but never committed, however often asked,
        becomes a dead letter (``retry`` sends and asks again). None when it is gone."""
        info = {"destination": destination, "sop_instance_uid": sop_instance_uid, "reason": reason,
                "status": None, "attempts": attempts, "since": time.time()}
        source = self.awaiting_commitment_path(destination, spool_id)
        if not source.exists():
            return None
        return self._park(source, self.root / "dead" / destination, spool_id, info)

    def ids_awaiting_commitment(self, destination: str) -> list[str]:
        """Spool ids stored at ``destination`` and not yet committed, oldest first."""
        return self.ids_in(self.commitment_dir(destination))

    def _park(self, source: Path, folder: Path, spool_id: str, info: dict[str, object]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{spool_id}{SUFFIX}"
        # The reason is written first: a .dcm in a parking folder always has one.
        (folder / f"{spool_id}.json").write_text(json.dumps(info))
        os.replace(source, target)
        return target

    def bury(self, destination: str, spool_id: str, reason: str, attempts: int,
             sop_instance_uid: str = "", status: int | None = None) -> Path:
        """Move a copy that ``destination`` will not take to the dead letters, with why."""
        info = {"destination": destination, "sop_instance_uid": sop_instance_uid, "reason": reason,
                "status": status, "attempts": attempts, "since": time.time()}
        return self._park(self.out_path(destination, spool_id), self.root / "dead" / destination, spool_id, info)

    def bury_unmorphed(self, spool_id: str, destination: str, reason: str, sop_instance_uid: str = "") -> Path:
        """Keep a received instance as ``destination``'s dead letter because its morph
        failed (the other destinations are not held up by it).

        The dead letter is the instance as received, marked ``unmorphed``; it
        is a hard link, so it costs no space while other names remain.
        """
        folder = self.root / "dead" / destination
        folder.mkdir(parents=True, exist_ok=True)
        info = {"destination": destination, "sop_instance_uid": sop_instance_uid, "reason": reason,
                "status": None, "attempts": 0, "since": time.time(), "unmorphed": True}
        (folder / f"{spool_id}.json").write_text(json.dumps(info))
        target = folder / f"{spool_id}{SUFFIX}"
        try:
            os.link(self.incoming_path(spool_id), target)
        except FileExistsError:
            pass  # buried before a crash
        fsync_dir(folder)
        return target

    def dead_letters(self, destination: str | None = None) -> Iterator[DeadLetter]:
        """Every dead letter, optionally of one destination, oldest first."""
        base = self.root / "dead"
        folders = [base / destination] if destination else sorted(p for p in base.iterdir() if p.is_dir())
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"*{SUFFIX}")):
                spool_id = path.name[: -len(SUFFIX)]
                try:
                    info = json.loads((folder / f"{spool_id}.json").read_text())
                except (OSError, ValueError):
                    info = {}
                yield DeadLetter(
                    destination=folder.name,
                    spool_id=spool_id,
                    path=path,
                    reason=str(info.get("reason", "unknown")),
                    attempts=int(info.get("attempts", 0)),
                    since=float(info.get("since", path.stat().st_mtime)),
                    sop_instance_uid=str(info.get("sop_instance_uid") or ""),
                    status=info.get("status"),
                    unmorphed=bool(info.get("unmorphed")),
                )

    def resurrect(self, letter: DeadLetter) -> None:
        """Put a dead letter back in its destination's ``out/`` folder."""
        os.replace(letter.path, self.out_path(letter.destination, letter.spool_id))
        (letter.path.parent / f"{letter.spool_id}.json").unlink(missing_ok=True)

    def purge(self, letter: DeadLetter) -> None:
        """Delete a dead letter for good."""
        letter.path.unlink(missing_ok=True)
        (letter.path.parent / f"{letter.spool_id}.json").unlink(missing_ok=True)

    # -- quarantine --------------------------------------------------------

    def quarantine(self, spool_id: str, reason: str) -> Path:
        """Keep an instance that will not be forwarded, visibly, with its reason."""
        return self._park(self.incoming_path(spool_id), self.quarantine_dir, spool_id, {"reason": reason, "since": time.time()})

    def quarantine_temp(self, tmp: Path, fd: int, reason: str) -> str:
        """Keep a temp file that never became an instance, by rename, with its reason.

        ``fd`` is closed whatever happens; on failure the temp file is gone.
        """
        spool_id = new_id()
        self._make_durable(tmp, fd, self.quarantine_dir / f"{spool_id}{UNDECODABLE}")
        (self.quarantine_dir / f"{spool_id}.json").write_text(json.dumps({"reason": reason, "since": time.time()}))
        return spool_id

    def quarantine_reasons(self) -> list[tuple[str, str]]:
        """(spool id, reason) of everything in quarantine."""
        return [(item.spool_id, item.reason) for item in self.in_quarantine()]

    def in_quarantine(self) -> list[Quarantined]:
        """Everything in quarantine, oldest first.

        Listed by the instances' own files, not their reasons: a file whose
        reason was lost (a crash between the two) is shown, never hidden.
        """
        found = []
        for path in sorted(self.quarantine_dir.glob("*"), key=lambda p: p.stem):
            if path.suffix not in (SUFFIX, UNDECODABLE):
                continue
            try:
                reason = str(json.loads(path.with_suffix(".json").read_text()).get("reason", ""))
            except FileNotFoundError:
                reason = "reason unknown"
            except (OSError, ValueError):
                reason = "unreadable reason"
            found.append(Quarantined(path.stem, path, reason))
        return found

    def release_from_quarantine(self, item: Quarantined) -> None:
        """Put a quarantined instance back in ``incoming/``, to be routed again under its spool id.

        The reason goes first: a crash in between leaves the file in
        quarantine, listed with its reason unknown; routing may quarantine it
        again at once, with a reason of its own that must not be deleted.
        """
        item.path.with_suffix(".json").unlink(missing_ok=True)
        os.replace(item.path, self.incoming_path(item.spool_id))
        fsync_dir(self.incoming)

    def purge_quarantined(self, item: Quarantined) -> None:
        """Delete a quarantined instance for good (its reason first, so nothing is left unlisted)."""
        item.path.with_suffix(".json").unlink(missing_ok=True)
        item.path.unlink(missing_ok=True)

    # -- reconciliation ----------------------------------------------------

    def ids_in(self, folder: Path, older_than: float = 0.0) -> list[str]:
        """Spool ids of the instances in ``folder`` that came there more than ``older_than`` s ago.

        Judged by the inode's change time, which a rename or a new link sets, not by the
        time the bytes were written: an instance an operator moves back from quarantine,
        or a routing worker links into ``out/`` long after its receipt, is new there.
        """
        if not folder.is_dir():
            return []
        cutoff = time.time() - older_than
        found = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(SUFFIX):
                    continue
                if older_than:
                    try:
                        if entry.stat().st_ctime > cutoff:
                            continue
                    except FileNotFoundError:
                        continue  # delivered (or moved on) between the listing and its look
                found.append(entry.name[: -len(SUFFIX)])
        found.sort()
        return found

    def destinations_with_work(self) -> list[str]:
        out = self.root / "out"
        return sorted(p.name for p in out.iterdir() if p.is_dir())

    def sweep_tmp(self, older_than: float = 3600.0) -> int:
        """Remove partial writes left by a crash (never visible to workers).

        A partial file goes as soon as the process on this host that wrote it
        is gone; one written on another host (a shared spool), or whose
        writer cannot be told, once it is ``older_than`` seconds old.

        Returns:
            How many files were removed.
        """
        removed = 0
        cutoff = time.time() - older_than
        for path in self.tmp.iterdir():
            try:
                if _writer_gone(path.name) or path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue  # renamed into place or discarded meanwhile
            except OSError:
                continue  # not a file (a folder put in free/ or tmp/ by hand): left as it is
        return removed
