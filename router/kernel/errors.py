"""The router's exception tree; foreign errors are translated where they enter.

    RouterError
    ├── SpoolFull                 the disk is full: answer 0xA700, keep nothing
    ├── MalformedDataset          the peer's bytes are not a dataset: quarantine
    └── SendError                 a C-STORE toward a destination did not succeed
        ├── TransientSendError    worth retrying: refused/unreachable/aborted, 0xA7xx
        │   ├── DestinationUnavailable   the destination itself, not the instance
        │   │   └── DestinationBusy      it takes no more associations just now
        │   └── DestinationTimeout       it took a request and never answered
        └── PermanentSendError    retrying cannot help: 0xA9xx, 0xCxxx, no usable context
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class SpoolFull(RouterError):
    """The spool's file system has no room for another instance."""


class MalformedDataset(RouterError):
    """Received bytes do not parse as a DICOM dataset."""


class SendError(RouterError):
    """A C-STORE toward a destination did not succeed."""

    def __init__(self, message: str, status: int | None = None, sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.sop_instance_uid = sop_instance_uid


class TransientSendError(SendError):
    """A failure a later attempt may not meet."""


class DestinationUnavailable(TransientSendError):
    """The destination could not be associated with (down, refusing, unreachable).

    Not the instance's fault: it does not count against the instance's attempts.
    """

    retry_after: float | None = None
    """Seconds the destination asked to be left alone (HTTP ``Retry-After``): its hold lasts at least this."""


class DestinationBusy(DestinationUnavailable):
    """The destination refused one more association for now (A-ASSOCIATE-RJ
    rejected-transient, e.g. local limit exceeded): it takes fewer associations
    than ``max_associations``, not none."""


class DestinationTimeout(TransientSendError):
    """The destination took a request and did not answer in time: hung or far too slow.

    The whole destination backs off; the instance is charged an attempt too,
    since it may be the very instance that hangs the peer.
    """


class PermanentSendError(SendError):
    """The destination will never accept this instance as it is."""
