"""What a service operation (a C-FIND, C-MOVE, C-GET or MPPS message the router answers) needs
from the association it came on, and how it runs there.

The association's own thread keeps reading while an operation runs in a thread
of its own (``router/ingest/fastscp.py``): so the caller's C-CANCEL-RQ is seen
while answers are still streaming, and a C-GET's C-STORE-RSPs reach the
operation that waits for them. Only one operation runs per association at a
time (the router negotiates no asynchronous operations window, PS3.7 §D.3.3.3).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from router.kernel.dimse import AFFECTED_SOP_CLASS_UID, PRIORITY, RESPONSE_BIT, command_ui, command_us, response
from router.kernel.status import Status

log = logging.getLogger(__name__)


class Caller(Protocol):
    """The association an operation answers on (:class:`router.ingest.fastscp.AcceptedAssociation`)."""

    calling_ae: str
    peer_ip: str

    @property
    def gone(self) -> bool:
        """The association was released or broke: nothing more can be sent."""
        ...

    def syntax(self, context_id: int) -> str:
        """The transfer syntax of an accepted presentation context."""
        ...

    def respond(self, context_id: int, command: bytes, dataset: bytes | None = None) -> bool:
        """Send a response (and its data set); False when the association is gone."""
        ...

    def storage_contexts(self, sop_class: str) -> list[tuple[int, str]]:
        """(context id, transfer syntax) accepted for ``sop_class`` on which the caller
        takes C-STOREs (a C-GET's sub-operations)."""
        ...

    def next_message_id(self) -> int:
        """A Message ID for a request the router sends the caller (a C-GET's C-STORE)."""
        ...

    def send_store(self, context_id: int, command: bytes, message_id: int, dataset: tuple[BinaryIO, int] | bytes,
                   timeout: float) -> int | None:
        """Send a C-STORE-RQ and its data set to the caller, wait for its C-STORE-RSP:
        its status, or None when the association ended or did not answer in time."""
        ...


@dataclass
class DimseRequest:
    """A request the caller sent, whole."""

    context_id: int
    command_field: int
    message_id: int
    command: dict[int, bytes]
    dataset: bytes
    transfer_syntax: str
    abstract_syntax: str
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def sop_class(self) -> str:
        return command_ui(self.command, AFFECTED_SOP_CLASS_UID) or self.abstract_syntax

    @property
    def priority(self) -> int:
        return command_us(self.command, PRIORITY) or 0


class Operation(Protocol):
    def __call__(self, caller: Caller, request: DimseRequest) -> None:
        """Answer ``request`` on ``caller``: every response, the final one included."""
        ...


class Running:
    """An operation running on its own thread for one association."""

    def __init__(self, operation: Operation, caller: Caller, request: DimseRequest) -> None:
        self.request = request
        self._thread = threading.Thread(target=self._run, args=(operation, caller, request),
                                        name=f"dimse-{request.command_field:04x}-{caller.calling_ae}", daemon=True)
        self._thread.start()

    @staticmethod
    def _run(operation: Operation, caller: Caller, request: DimseRequest) -> None:
        try:
            operation(caller, request)
        except Exception:  # noqa: BLE001 - an operation's bug must not take the ingest with it
            log.exception("%#06x from %s failed", request.command_field, caller.calling_ae)
            # The caller waits for a final response: it gets a failure, not a hang.
            caller.respond(request.context_id, response(request.command_field | RESPONSE_BIT, request.message_id,
                                                        Status.PROCESSING_FAILURE, request.sop_class))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self) -> None:
        self.request.cancelled.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
