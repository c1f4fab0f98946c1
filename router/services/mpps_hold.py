"""MPPS messages held for a destination that could not take them: on disk, in order.

The files are the truth (docs/mpps.md): a message is written here, durably,
before the modality hears Success for it, and deleted only once the
destination answered it. Layout under the spool::

    mpps/held/DEST/ID_UID.mpps      waiting for DEST, oldest first by ID
    mpps/refused/DEST/ID_UID.mpps   refused by DEST for good (+ .json: why)

ID is the message's id (``spool.new_id()``: time-ordered, also its history's
key) and UID its SOP Instance UID, so a listing alone tells whether a
destination holds earlier messages of one procedure step, and in which
order they came. Destinations are delivered by one host at a time
(:class:`DeliveryLock`), as a shared spool may be reached by several.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from router.kernel import keys
from router.kernel.errors import SpoolFull
from router.kernel.spool import HOST, Spool, fsync_dir
from router.services.identifiers import decode, encode

log = logging.getLogger(__name__)

SUFFIX = ".mpps"
_SEPARATOR = "_"  # between the message id (hex and '-') and the SOP Instance UID


@dataclass(frozen=True)
class HeldMessage:
    """One N-CREATE or N-SET as the modality sent it (its data set as received)."""

    message_id: str
    """Its id: orders a destination's held messages, and keys its history."""
    command_field: int
    sop_class: str
    sop_instance: str
    """The Affected (N-CREATE, perhaps the router's own) or Requested (N-SET) SOP Instance UID."""
    transfer_syntax: str
    """Of ``dataset``: the modality's presentation context's."""
    dataset: bytes | None
    """The Attribute List / Modification List; None when the request carried none."""
    source: str
    """Calling AE title @ address."""
    received_at: float

    @property
    def file_name(self) -> str:
        return f"{self.message_id}{_SEPARATOR}{self.sop_instance}{SUFFIX}"

    def dataset_in(self, transfer_syntax: str) -> bytes | None:
        """The data set encoded for a peer's context (re-encoded only when its syntax differs).

        Raises:
            ValueError: the held bytes are no data set in their syntax.
        """
        if self.dataset is None or transfer_syntax == self.transfer_syntax:
            return self.dataset
        return encode(decode(self.dataset, self.transfer_syntax), transfer_syntax)

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        fields["dataset"] = None if self.dataset is None else base64.b64encode(self.dataset).decode("ascii")
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HeldMessage:
        """Raises:
        ValueError: not a held message (a file damaged on disk).
        """
        try:
            fields = json.loads(data)
            if fields["dataset"] is not None:
                fields["dataset"] = base64.b64decode(fields["dataset"], validate=True)
            return cls(**fields)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"not a held MPPS message: {exc}") from exc


def sop_instance_of(path: Path) -> str:
    """The SOP Instance UID a held file is for, from its name alone."""
    return path.name[: -len(SUFFIX)].partition(_SEPARATOR)[2]


class MppsHold:
    """The held messages of every destination, in the spool's ``mpps/`` folder.

    Args:
        spool: the router's spool (its durable writes, its root).
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.root = spool.root / "mpps"
        self._made: set[Path] = set()

    def folder(self, destination: str) -> Path:
        return self.root / "held" / destination

    def refused_folder(self, destination: str) -> Path:
        return self.root / "refused" / destination

    def _ensure(self, folder: Path) -> None:
        """Create ``folder`` and its parents under the spool, each entry fsynced into its
        parent: a message durably written into it must not vanish with its folder."""
        if folder in self._made:
            return
        missing = []
        at = folder
        while not at.is_dir():
            missing.append(at)
            at = at.parent
        for made in reversed(missing):
            made.mkdir(exist_ok=True)
            fsync_dir(made.parent)
        self._made.add(folder)

    def holds_for(self, destination: str, sop_instance: str) -> bool:
        """Whether ``destination`` holds messages of ``sop_instance`` not yet delivered
        (a new one must then wait behind them)."""
        wanted = f"{_SEPARATOR}{sop_instance}{SUFFIX}"
        try:
            with os.scandir(self.folder(destination)) as entries:
                return any(entry.name.endswith(wanted) and sop_instance_of(Path(entry.name)) == sop_instance
                           for entry in entries)
        except FileNotFoundError:
            return False

    def hold(self, destination: str, message: HeldMessage) -> Path:
        """Keep ``message`` for ``destination``, durably (written, fsynced, renamed, the
        folder fsynced) before this returns.

        Raises:
            SpoolFull: no room (or less than ``min_free_bytes``): nothing is kept.
        """
        if not self.spool.has_room():
            raise SpoolFull(f"spool {self.spool.root} has less than {self.spool.min_free_bytes} bytes free")
        folder = self.folder(destination)
        try:
            self._ensure(folder)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool {self.spool.root} is full") from exc
            raise
        path = folder / message.file_name
        try:
            self.spool.write_durably(path, message.to_bytes())
        except FileNotFoundError:  # its folder went since (emptied by hand): made again, once
            self._made.discard(folder)
            self._ensure(folder)
            self.spool.write_durably(path, message.to_bytes())
        return path

    def waiting(self, destination: str) -> list[Path]:
        """``destination``'s held messages, oldest first."""
        try:
            with os.scandir(self.folder(destination)) as entries:
                return sorted((Path(entry.path) for entry in entries if entry.name.endswith(SUFFIX)),
                              key=lambda path: path.name)
        except FileNotFoundError:
            return []

    def count(self, destination: str) -> int:
        return len(self.waiting(destination))

    def refused_count(self, destination: str) -> int:
        try:
            return sum(1 for path in self.refused_folder(destination).iterdir() if path.suffix == SUFFIX)
        except FileNotFoundError:
            return 0

    @staticmethod
    def read(path: Path) -> HeldMessage:
        """Raises:
        FileNotFoundError: delivered meanwhile. ValueError: damaged.
        """
        return HeldMessage.from_bytes(path.read_bytes())

    @staticmethod
    def remove_delivered(path: Path) -> None:
        """The destination answered it: gone, and the folder fsynced, so a crash cannot
        bring it back to be sent twice."""
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def set_aside(self, path: Path, destination: str, reason: str, status: int | None) -> Path:
        """``destination`` refused it for good: moved to ``refused/DEST/`` with why, out of
        the way of the messages after it (kept for an operator; never sent again)."""
        folder = self.refused_folder(destination)
        self._ensure(folder)
        target = folder / path.name
        why = {"reason": reason, "status": status, "at": time.time()}
        self.spool.write_durably(target.with_suffix(".json"), json.dumps(why).encode())
        os.replace(path, target)
        fsync_dir(folder)
        fsync_dir(path.parent)
        return target


# KEYS[1]: the lock, ARGV[1]: our token, ARGV[2]: seconds; only the holder extends or frees it.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_FREE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class DeliveryLock:
    """The right to deliver one destination's held messages: one host at a time, or two
    could send the same message, or one procedure step's messages out of order.

    A Redis key set if absent with a TTL (``SET NX EX``), extended by its holder
    before each message and freed after the pass; a holder that died frees it
    by expiry.

    Args:
        ttl: seconds the lock lasts unless extended: longer than one message's
            association and answer may take.
    """

    def __init__(self, client: redis.Redis, destination: str, ttl: float) -> None:
        self.client = client
        self.key = keys.mpps_delivery(destination)
        self.ttl = max(1, int(ttl + 0.999))
        self.token = f"{HOST}:{os.getpid()}:{secrets.token_hex(4)}"

    def acquire(self) -> bool:
        """Raises:
        redis.RedisError: Redis is unreachable (nobody can tell who delivers).
        """
        return bool(self.client.set(self.key, self.token, nx=True, ex=self.ttl))

    def extend(self) -> bool:
        """False when the lock was lost (expired, and perhaps taken by another host)."""
        try:
            return bool(self.client.eval(_EXTEND, 1, self.key, self.token, self.ttl))
        except redis.RedisError as exc:
            log.warning("MPPS delivery lock %s not extended: %s", self.key, exc)
            return False

    def release(self) -> None:
        try:
            self.client.eval(_FREE, 1, self.key, self.token)
        except redis.RedisError as exc:
            log.warning("MPPS delivery lock %s not freed (it expires): %s", self.key, exc)
