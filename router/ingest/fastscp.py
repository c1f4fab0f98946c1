"""The ingest's associations: a lean C-STORE data path on one blocking socket per association.

Stock pynetdicom spends most of a C-STORE in two 1 ms polling sleeps, in
per-PDU objects and thread hand-offs (docs/measurements.md). Here each
association is one thread reading its socket directly: PDV fragments go from
the receive buffer straight into a temp file in the spool, the command sets
(six elements of Implicit VR Little Endian) are read and written by hand.
pynetdicom still does what is not hot: the association PDU codecs and the
presentation context negotiation (``router/ingest/acceptance.py``).

This module is the association: its state machine from A-ASSOCIATE-RQ to
release or abort. Its PDUs are ``router/kernel/pdu.py``'s and its command sets
``router/kernel/dimse.py``'s, as for every association the router requests
(``router/kernel/requestor.py``); the socket is read by
``router/kernel/reader.py``; what a
C-STORE is answered is decided by ``router/ingest/store.py``; the TCP
server and its limits are
``router/ingest/server.py``. Nothing half-written ever becomes visible (an
aborted association leaves nothing behind).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import BinaryIO, Protocol

from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from router.ingest import acceptance
from router.ingest.store import Store, StoreHandler
from router.ingest.verification import echo_status
from router.kernel import filemeta, pdu
from router.kernel.commitment.messages import (
    STORAGE_COMMITMENT_PUSH,
    WELL_KNOWN_INSTANCE,
    Report,
    decode_report,
    encode_report,
)
from router.kernel.commitment.service import CommitmentService
from router.kernel.dimse import (
    ACTION_TYPE_ID,
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    EVENT_TYPE_ID,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    MOVE_ORIGINATOR_AE_TITLE,
    MOVE_ORIGINATOR_MESSAGE_ID,
    N_ACTION_RQ,
    N_ACTION_RSP,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    NO_DATA_SET,
    REQUESTED_SOP_CLASS_UID,
    REQUESTED_SOP_INSTANCE_UID,
    RESPONSE_BIT,
    STATUS,
    command_ui,
    command_us,
    decode_command,
    n_event_report_rq,
    n_response,
    response,
)
from router.kernel.dispatch import Dispatcher
from router.kernel.handoff import Received, RedisGate
from router.kernel.operation import DimseRequest, Operation, Running
from router.kernel.pdu import (
    A_ABORT_PDU,
    A_ASSOCIATE_RQ_PDU,
    A_RELEASE_RQ_PDU,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_SOURCE_PROVIDER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    COMMAND,
    KNOWN_PDU_TYPES,
    LAST,
    P_DATA_TF_PDU,
    ProtocolError,
)
from router.kernel.reader import Closed, Reader, kernel_timeout
from router.kernel.settings import RouterSettings
from router.kernel.spool import Spool
from router.kernel.status import Status
from rules.facts import peer_address

log = logging.getLogger(__name__)

ARTIM_TIMEOUT = 30.0
"""Seconds from the connection's opening by which the whole A-ASSOCIATE-RQ must
have arrived (PS3.8 §9.1.5): a deadline, not a per-read timeout, so a peer
trickling a byte at a time cannot hold a connection open."""
MAX_ASSOCIATE_RQ = 1 << 20  # 128 contexts x a dozen transfer syntaxes is ~50 KiB
MAX_COMMAND = 1 << 16  # a command set is a few hundred bytes
MAX_N_DATASET = 16 << 20  # a commitment message: 10,000 references are ~1.5 MiB
MAX_SEND_PDU = 1 << 20
"""The largest PDU sent to a peer that announces no limit (0, PS3.8 §D.1)."""
REPORT_ANSWER_TIMEOUT = 30.0
"""Seconds a modality may take to answer a commitment report sent on its association."""


class ServicesAnswered(Protocol):
    """The services besides storage (``router/services/registry.py``): Q/R, worklist, MPPS."""

    def operation(self, abstract_syntax: str, command_field: int) -> Operation | None:
        """What answers ``command_field`` on a context of ``abstract_syntax``, if anything does."""
        ...

    def retrieve_for(self, originator_ae: str, message_id: int) -> str | None:
        """The retrieve a C-STORE naming this Move Originator serves ('' for an ended one
        of the router's, None when it is not the router's)."""
        ...

    def arrived(self, operation: str, path: Path) -> None:
        """An instance retrieved for ``operation`` is durable at ``path``."""
        ...

    def contexts(self) -> list[PresentationContext]:
        """The presentation contexts to accept for them."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Server(Protocol):
    """What an association needs from the server it runs under (``router.ingest.server``)."""

    settings: RouterSettings
    spool: Spool
    stores: StoreHandler
    dispatcher: Dispatcher
    gate: RedisGate
    commitments: CommitmentService
    supported: list[PresentationContext]
    services: ServicesAnswered | None

    def admit(self, peer_ip: str) -> bool: ...

    def hand_over(self, received: Received) -> None: ...

    def leave(self, peer_ip: str) -> None: ...


def artim_deadline(settings: RouterSettings, opened: float) -> float:
    """By when a connection opened at ``opened`` must have sent its whole A-ASSOCIATE-RQ
    (``time.monotonic()``), a TLS handshake included."""
    return opened + min(ARTIM_TIMEOUT, settings.network_timeout)


def plain_ip(address: str) -> str:
    """``::ffff:10.0.0.1`` (an IPv4 peer on a dual-stack socket) -> ``10.0.0.1``, for logs and file meta."""
    ip = peer_address(address)
    return str(ip) if ip is not None else address


class AcceptedAssociation:
    """One association a peer requested, from its A-ASSOCIATE-RQ to release or abort, on a blocking socket."""

    def __init__(self, scp: Server, sock: socket.socket, address: tuple, opened: float,
                 identities: frozenset[str] | None = None) -> None:
        """Args:
            opened: ``time.monotonic()`` when the connection was accepted: the
                A-ASSOCIATE-RQ must be whole by ``ARTIM_TIMEOUT`` after it,
                a TLS handshake included.
            identities: what the caller's verified TLS certificate names; None
                on the plain port.
        """
        self.scp = scp
        self.settings = scp.settings
        self.spool = scp.spool
        self.sock = sock
        self.opened = opened
        self.identities = identities
        self.peer_ip = plain_ip(str(address[0]))
        self.peer_port = int(address[1])
        self.calling_ae = ""
        self.origin: filemeta.Origin | None = None
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.abstract_syntaxes: dict[int, str] = {}  # accepted context id -> SOP class
        self.fragment = pdu.fragment_size(0, MAX_SEND_PDU)  # PDV size the peer takes, once it said
        self.command = bytearray()
        self.command_context = 0
        self.store: Store | None = None
        self.pending: dict[int, bytes] | None = None  # a non-C-STORE command waiting for its dataset
        self.pending_data: bytearray | None = None  # ... whose dataset is kept (commitment messages)
        self.accepted = 0
        self.refused = 0
        self.admitted = False  # holds one of the server's association slots
        # A modality's commitment report is sent from the reporter thread
        # (router/kernel/commitment/from_modalities.py) while this thread reads: every
        # send holds send_lock; ``ended`` (set under it) stops sends once
        # the association is released or gone.
        self.send_lock = threading.Lock()
        # On TLS the reading holds it too: one SSL object, one thread at a time.
        self.reader = Reader(sock, self.send_lock if isinstance(sock, ssl.SSLSocket) else None)
        self.ended = False
        self.report_context = 0
        self.report_message_id = 0
        self.report_answers: dict[int, int] = {}  # message id -> N-EVENT-REPORT-RSP status
        self.store_answers: dict[int, int] = {}  # message id -> C-STORE-RSP status (a C-GET's sub-operations)
        self.answered = threading.Condition()
        self.caller_scp_classes: frozenset[str] = frozenset()  # SOP classes it takes C-STOREs for (C-GET)
        self.pending_service: DimseRequest | None = None  # a service request waiting for its data set
        self.operation: Running | None = None  # the C-FIND, C-MOVE, C-GET or MPPS message being answered

    # -- the whole life of the association --

    def run(self) -> None:
        started = self.opened
        try:
            self.reader.deadline = artim_deadline(self.settings, started)
            if not self._negotiate():
                return
            self.reader.deadline = None
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.settimeout(self.settings.network_timeout)
            else:
                kernel_timeout(self.sock, self.settings.network_timeout)
            self._serve()
        except Closed:
            if self.origin is not None:
                log.warning("association from %s@%s:%s: connection closed without release", self.calling_ae, self.peer_ip, self.peer_port)
        except ProtocolError as exc:
            log.warning("association from %s@%s:%s aborted: %s", self.calling_ae or "?", self.peer_ip, self.peer_port, exc)
            self._send_abort(exc.reason)
        except BlockingIOError:  # kernel_timeout: what was sent lay untaken that long
            log.warning("association from %s@%s:%s: took nothing sent for %s s, closing", self.calling_ae or "?",
                        self.peer_ip, self.peer_port, self.settings.network_timeout)
        except TimeoutError:
            log.warning("association from %s@%s:%s: no data for %s s, aborting", self.calling_ae or "?", self.peer_ip, self.peer_port, self.settings.network_timeout)
            self._send_abort(ABORT_NOT_SPECIFIED)
        except OSError as exc:
            log.warning("association from %s@%s:%s: %s", self.calling_ae or "?", self.peer_ip, self.peer_port, exc)
        finally:
            self._end()
            self._drop_store()
            if self.operation is not None:
                self.operation.cancel()  # nobody is left to answer: a retrieve stops taking instances
            if self.admitted:
                self.scp.leave(self.peer_ip)
            if self.origin is not None:
                log.info(
                    "association from %s@%s:%s: %d instance(s) accepted, %d refused in %.2f s",
                    self.calling_ae, self.peer_ip, self.peer_port, self.accepted, self.refused,
                    time.monotonic() - started,
                )

    def _send_abort(self, reason: int) -> None:
        with self.send_lock:
            self.ended = True
            try:
                self.sock.sendall(pdu.abort(ABORT_SOURCE_PROVIDER, reason))
            except OSError:
                pass  # the peer is gone already

    # -- association establishment (PS3.8 §7.1, PS3.7 Annex D.3.3) --

    def _negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and accept or reject it; True when accepted."""
        try:
            pdu_type, length = pdu.read_header(self.reader)
        except Closed:
            return False  # a port probe: connected and went away
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise ProtocolError(ABORT_UNEXPECTED_PDU if pdu_type in KNOWN_PDU_TYPES else ABORT_UNRECOGNIZED_PDU, f"PDU type {pdu_type:#04x} before A-ASSOCIATE-RQ")
        if not 68 <= length <= MAX_ASSOCIATE_RQ:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"A-ASSOCIATE-RQ of {length} bytes")
        try:
            request = acceptance.decode(bytes(self.reader.take(length)))
        except acceptance.UndecodableRequest as exc:
            raise ProtocolError(ABORT_INVALID_PARAMETER, str(exc)) from exc
        self.calling_ae = request.calling_ae_title
        refused = acceptance.refusal(request, self.settings.accept, self.peer_ip, self.identities)
        if refused is None:
            self.admitted = self.scp.admit(self.peer_ip)
            if not self.admitted:
                refused = acceptance.REJECT_BUSY, "too many associations (router.max_associations, max_associations_per_peer)"
        if refused is not None:
            (result, source, diagnostic), why = refused
            log.warning("refused association from %s@%s:%s: %s", self.calling_ae, self.peer_ip, self.peer_port, why)
            self.sock.sendall(acceptance.reject_pdu(result, source, diagnostic))
            self.sock.shutdown(socket.SHUT_WR)
            return False
        accepted = acceptance.accept(request, self.scp.supported, self.settings.max_pdu)
        self.contexts, self.fragment = accepted.contexts, pdu.fragment_size(accepted.peer_max_pdu, MAX_SEND_PDU)
        self.abstract_syntaxes = accepted.abstract_syntaxes
        self.caller_scp_classes = accepted.caller_scp_classes
        self.sock.sendall(accepted.pdu)
        self.origin = filemeta.Origin(
            calling_ae_title=self.calling_ae,
            called_ae_title=request.called_ae_title,
            source_ip=self.peer_ip,
            source_port=self.peer_port,
        )
        log.debug("accepted association from %s@%s:%s, %d context(s)", self.calling_ae, self.peer_ip, self.peer_port, len(self.contexts))
        return True

    # -- data transfer --

    def _serve(self) -> None:
        while True:
            pdu_type, length = pdu.read_header(self.reader)
            if pdu_type == P_DATA_TF_PDU:
                self._p_data(length)
            elif pdu_type == A_RELEASE_RQ_PDU:
                pdu.read_control_body(self.reader, pdu_type, length)
                self._drop_store()  # released mid-instance: that instance was never answered
                self._end()
                self.sock.sendall(pdu.RELEASE_RP)
                return
            elif pdu_type == A_ABORT_PDU:
                log.warning("association from %s@%s:%s aborted by the peer", self.calling_ae, self.peer_ip, self.peer_port)
                return
            elif pdu_type in KNOWN_PDU_TYPES:
                raise ProtocolError(ABORT_UNEXPECTED_PDU, f"unexpected PDU type {pdu_type:#04x}")
            else:
                raise ProtocolError(ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU type {pdu_type:#04x}")

    def _p_data(self, length: int) -> None:
        """Every PDV of one P-DATA-TF PDU (PS3.8 §9.3.5, Annex E.2)."""
        for context_id, control, size in pdu.pdv_items(self.reader, length):
            if context_id not in self.contexts:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"unknown presentation context {context_id}")
            last = bool(control & LAST)
            if control & COMMAND:
                self._command_fragment(context_id, size, last)
            else:
                self._dataset_fragment(context_id, size, last)

    def _command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self.store is not None or self.pending is not None:
            raise ProtocolError(ABORT_UNEXPECTED_PDU, "command fragment while a dataset was expected")
        if len(self.command) + size > MAX_COMMAND:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set too long")
        self.command += self.reader.take(size)
        self.command_context = context_id
        if last:
            try:
                elements = decode_command(self.command)
            except ValueError as exc:
                raise ProtocolError(ABORT_INVALID_PARAMETER, str(exc)) from None
            self.command.clear()
            self._on_command(context_id, elements)

    def _dataset_fragment(self, context_id: int, size: int, last: bool) -> None:
        store = self.store
        if store is None and self.pending is None:
            raise ProtocolError(ABORT_UNEXPECTED_PDU, "dataset fragment without a command")
        if context_id != self.command_context:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "dataset on another presentation context than its command")
        if store is not None and store.status is None:
            self._write(store, size)
        elif self.pending_data is not None:
            if len(self.pending_data) + size > MAX_N_DATASET:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"a data set of more than {MAX_N_DATASET} bytes "
                                                             f"with a command other than C-STORE")
            self.pending_data += self.reader.take(size)
        else:
            for _ in self.reader.pieces(size):
                pass  # drained: the answer is already decided
        if last:
            if store is not None:
                self.store = None
                self._finish_store(store)
            elif self.pending_data is not None:
                elements, data = self.pending or {}, bytes(self.pending_data)
                self.pending, self.pending_data = None, None
                if self.pending_service is not None:
                    service, self.pending_service = self.pending_service, None
                    service.dataset = data
                    self._start_operation(service)
                else:
                    self._commitment_message(context_id, elements, data)
            else:
                elements, self.pending = self.pending, None
                self._refuse(context_id, elements or {})

    # -- DIMSE services --

    def _on_command(self, context_id: int, elements: dict[int, bytes]) -> None:
        command_field = command_us(elements, COMMAND_FIELD)
        if command_field is None:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set without CommandField")
        if command_field & RESPONSE_BIT:  # names the request it answers, not a MessageID of its own
            if command_field == N_EVENT_REPORT_RSP:
                self._report_answered(elements)
            elif command_field == C_STORE_RSP:
                self._store_answered(elements)
            else:
                log.debug("ignoring DIMSE response %#06x from %s", command_field, self.calling_ae)
            return
        if command_field == C_CANCEL_RQ:
            self._cancel(elements)
            return
        message_id = command_us(elements, MESSAGE_ID)
        if message_id is None:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set without MessageID")
        has_dataset = command_us(elements, COMMAND_DATA_SET_TYPE) != NO_DATA_SET
        if command_field == C_STORE_RQ and has_dataset:
            self._start_store(context_id, message_id, elements)
        elif command_field == C_ECHO_RQ:
            self._respond(context_id, C_ECHO_RSP, message_id, echo_status(),
                          command_ui(elements, AFFECTED_SOP_CLASS_UID) or Verification, "")
        elif command_field in (N_EVENT_REPORT_RQ, N_ACTION_RQ) and has_dataset \
                and self.abstract_syntaxes.get(context_id) == STORAGE_COMMITMENT_PUSH:
            self.pending, self.pending_data = elements, bytearray()  # answered once its dataset is read
        elif (service := self._service_request(context_id, command_field, message_id, elements)) is not None:
            if has_dataset:
                self.pending, self.pending_data, self.pending_service = elements, bytearray(), service
            else:
                self._start_operation(service)
        elif has_dataset:
            self.pending = elements  # refused once its dataset has been read
        else:
            self._refuse(context_id, elements)

    # -- services: C-FIND, C-MOVE, C-GET, MPPS (router/services) --

    def _service_request(self, context_id: int, command_field: int, message_id: int,
                         elements: dict[int, bytes]) -> DimseRequest | None:
        """The request, when a service of ``router/services`` performs it on this context."""
        services = self.scp.services
        abstract_syntax = self.abstract_syntaxes.get(context_id, "")
        if services is None or services.operation(abstract_syntax, command_field) is None:
            return None
        return DimseRequest(context_id, command_field, message_id, elements, b"", self.contexts[context_id],
                            abstract_syntax)

    def _start_operation(self, request: DimseRequest) -> None:
        """Answer ``request`` on a thread of its own, after the one before it (one at a time)."""
        if self.operation is not None:
            self.operation.join()
        services = self.scp.services
        assert services is not None
        operation = services.operation(request.abstract_syntax, request.command_field)
        assert operation is not None
        self.operation = Running(operation, self, request)

    def _cancel(self, elements: dict[int, bytes]) -> None:
        """A C-CANCEL-RQ (PS3.7 §9.3.2.3): the operation it names stops and answers Cancel."""
        message_id = command_us(elements, MESSAGE_ID_BEING_RESPONDED_TO)
        running = self.operation
        if running is not None and running.running and running.request.message_id == message_id:
            log.info("C-CANCEL of message %s from %s", message_id, self.calling_ae)
            running.cancel()
        else:
            log.debug("C-CANCEL of message %s from %s: nothing running by that id", message_id, self.calling_ae)

    @property
    def gone(self) -> bool:
        return self.ended

    def syntax(self, context_id: int) -> str:
        return self.contexts[context_id]

    def respond(self, context_id: int, command: bytes, dataset: bytes | None = None) -> bool:
        data = pdu.p_data(context_id, command, COMMAND, self.fragment)
        if dataset is not None:
            data += pdu.p_data(context_id, dataset, 0, self.fragment)
        with self.send_lock:
            if self.ended:
                return False
            try:
                self.sock.sendall(data)
            except OSError as exc:
                log.info("answer to %s not sent: %s", self.calling_ae, exc)
                return False
        return True

    def storage_contexts(self, sop_class: str) -> list[tuple[int, str]]:
        if sop_class not in self.caller_scp_classes:
            return []
        return [(context_id, self.contexts[context_id]) for context_id, abstract in self.abstract_syntaxes.items()
                if abstract == sop_class]

    def send_store(self, context_id: int, command: bytes, message_id: int, dataset: tuple[BinaryIO, int] | bytes,
                   timeout: float) -> int | None:
        with self.send_lock:
            if self.ended:
                return None
            try:
                self.sock.sendall(pdu.p_data(context_id, command, COMMAND, self.fragment))
                if isinstance(dataset, tuple):
                    self._send_file(context_id, *dataset)
                else:
                    self.sock.sendall(pdu.p_data(context_id, dataset, 0, self.fragment))
            except OSError as exc:
                log.info("C-STORE to %s not sent: %s", self.calling_ae, exc)
                return None
        with self.answered:
            self.answered.wait_for(lambda: message_id in self.store_answers or self.ended, timeout)
            return self.store_answers.pop(message_id, None)

    def _send_file(self, context_id: int, fp: BinaryIO, length: int) -> None:
        """``length`` bytes of ``fp`` as data set PDVs, a fragment at a time (send_lock held)."""
        remaining = length
        while True:
            chunk = fp.read(min(self.fragment, remaining))
            if len(chunk) < min(self.fragment, remaining):
                raise OSError(f"file ended {remaining - len(chunk)} bytes early")
            remaining -= len(chunk)
            self.sock.sendall(pdu.p_data_header(context_id, len(chunk), LAST if not remaining else 0) + chunk)
            if not remaining:
                return

    def next_message_id(self) -> int:
        """A Message ID for a request the router sends on this association (reports, C-GET's C-STOREs)."""
        with self.send_lock:
            return self._next_message_id_locked()

    def _next_message_id_locked(self) -> int:
        self.report_message_id = self.report_message_id % 0xFFFF + 1
        return self.report_message_id

    def _store_answered(self, elements: dict[int, bytes]) -> None:
        """The caller's C-STORE-RSP to a C-GET sub-operation ``send_store`` sent."""
        message_id = command_us(elements, MESSAGE_ID_BEING_RESPONDED_TO) or 0
        status = command_us(elements, STATUS)
        with self.answered:
            self.store_answers[message_id] = Status.PROCESSING_FAILURE if status is None else status
            self.answered.notify_all()

    def _commitment_message(self, context_id: int, elements: dict[int, bytes], data: bytes) -> None:
        """A whole storage commitment message (PS3.4 Annex J): a destination's report,
        or a modality's request."""
        if command_us(elements, COMMAND_FIELD) == N_ACTION_RQ:
            self._commitment_request(context_id, elements, data)
            return
        message_id = command_us(elements, MESSAGE_ID) or 0
        event_type = command_us(elements, EVENT_TYPE_ID) or 0
        caller = f"{self.calling_ae}@{self.peer_ip}"
        try:
            report = decode_report(data, self.contexts[context_id])
        except ValueError as exc:
            log.warning("commitment report from %s: %s", caller, exc)
            status = Status.PROCESSING_FAILURE
        else:
            status = self.scp.commitments.take_report(report, caller)
        answer = n_response(N_EVENT_REPORT_RSP, message_id, status, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE,
                            EVENT_TYPE_ID, event_type)
        self._send(pdu.p_data(context_id, answer, COMMAND, self.fragment))

    def _commitment_request(self, context_id: int, elements: dict[int, bytes], data: bytes) -> None:
        """A modality's N-ACTION-RQ: answered at once; the report follows from the reporter.

        The answer is sent under ``send_lock``, taken before the request is
        handed over, so a report decided at once cannot overtake it.
        """
        message_id = command_us(elements, MESSAGE_ID) or 0
        action_type = command_us(elements, ACTION_TYPE_ID) or 0
        with self.send_lock:
            self.report_context = context_id
            status = self.scp.commitments.take_request(
                action_type, command_ui(elements, REQUESTED_SOP_INSTANCE_UID), data, self.contexts[context_id],
                self.calling_ae, self.peer_ip, self)
            answer = n_response(N_ACTION_RSP, message_id, status, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE,
                                ACTION_TYPE_ID, action_type)
            self.sock.sendall(pdu.p_data(context_id, answer, COMMAND, self.fragment))

    def send_report(self, report: Report) -> int | None:
        """Send a commitment report on this association and wait for its answer (the
        reporter thread's call; :class:`router.kernel.commitment.from_modalities.Channel`).

        Returns:
            The N-EVENT-REPORT-RSP status, or None when the association ended first.
        """
        context_id = self.report_context
        with self.send_lock:
            if self.ended:
                return None
            message_id = self._next_message_id_locked()
            command = n_event_report_rq(message_id, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE, report.event_type)
            dataset = encode_report(report, self.contexts[context_id])
            try:
                self.sock.sendall(pdu.p_data(context_id, command, COMMAND, self.fragment)
                                  + pdu.p_data(context_id, dataset, 0, self.fragment))
            except OSError as exc:
                log.warning("commitment report %s to %s: %s", report.transaction_uid, self.calling_ae, exc)
                return None
        with self.answered:
            self.answered.wait_for(lambda: message_id in self.report_answers or self.ended, REPORT_ANSWER_TIMEOUT)
            return self.report_answers.pop(message_id, None)

    def _report_answered(self, elements: dict[int, bytes]) -> None:
        """The modality's N-EVENT-REPORT-RSP to a report ``send_report`` sent."""
        message_id = command_us(elements, MESSAGE_ID_BEING_RESPONDED_TO) or 0
        status = command_us(elements, STATUS)
        log.debug("commitment report answer %s from %s: %s", message_id, self.calling_ae, status)
        with self.answered:
            self.report_answers[message_id] = Status.PROCESSING_FAILURE if status is None else status
            self.answered.notify_all()

    def _end(self) -> None:
        """No more reports on this association: wake a reporter waiting for an answer."""
        with self.send_lock:
            self.ended = True
        with self.answered:
            self.answered.notify_all()

    def _send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def _refuse(self, context_id: int, elements: dict[int, bytes]) -> None:
        """Answer a request this SCP does not perform, keeping the association (PS3.7 §C.4.2)."""
        command_field = command_us(elements, COMMAND_FIELD) or 0
        sop_class = command_ui(elements, AFFECTED_SOP_CLASS_UID) or command_ui(elements, REQUESTED_SOP_CLASS_UID)
        log.info("refused DIMSE command %#06x from %s: not performed here", command_field, self.calling_ae)
        status = Status.UNRECOGNIZED_OPERATION if command_field != C_STORE_RQ else Status.CANNOT_UNDERSTAND
        self._respond(context_id, command_field | RESPONSE_BIT, command_us(elements, MESSAGE_ID) or 0, status, sop_class, command_ui(elements, AFFECTED_SOP_INSTANCE_UID))

    def _respond(self, context_id: int, command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str) -> None:
        command = response(command_field, message_id, status, sop_class, sop_instance)
        self._send(pdu.p_data(context_id, command, COMMAND, self.fragment))

    def _start_store(self, context_id: int, message_id: int, elements: dict[int, bytes]) -> None:
        assert self.origin is not None
        self.store = Store(
            message_id=message_id,
            context_id=context_id,
            sop_class_uid=command_ui(elements, AFFECTED_SOP_CLASS_UID),
            sop_instance_uid=command_ui(elements, AFFECTED_SOP_INSTANCE_UID),
            transfer_syntax=self.contexts[context_id],
            context_class=self.abstract_syntaxes[context_id],
        )
        originator = command_us(elements, MOVE_ORIGINATOR_MESSAGE_ID)
        if originator is not None and self.scp.services is not None:
            # A sub-operation of a C-MOVE: perhaps one the router asked a source for.
            try:
                retrieve = self.scp.services.retrieve_for(command_ui(elements, MOVE_ORIGINATOR_AE_TITLE), originator)
            except Exception as exc:  # noqa: BLE001 - Redis away: not taken as an ordinary instance either
                log.warning("C-STORE from %s for a retrieve of ours: %s", self.calling_ae, exc)
                self.store.status, self.store.why = Status.OUT_OF_RESOURCES, f"retrieve not found: {exc}"
            else:
                if retrieve == "":
                    self.store.status = Status.PROCESSING_FAILURE
                    self.store.why = f"for a retrieve of ours (message {originator}) that has ended"
                elif retrieve is not None:
                    self.store.retrieve = retrieve
        self.scp.stores.begin(self.store, self.origin)

    def _write(self, store: Store, size: int) -> None:
        """Stream ``size`` bytes of dataset from the socket into the temp file."""
        stores = self.scp.stores
        for piece in self.reader.pieces(size):
            stores.write(store, piece)
        stores.flush(store)

    def _finish_store(self, store: Store) -> None:
        """The last fragment arrived: check, make durable, answer, then hand over.

        Handing over comes after the answer: the instance is durable in
        ``incoming/`` already and the reconciler would find it should routing
        or queueing fail (docs/architecture.md, "Recovery"), so the peer need
        not wait for it — it sends its next instance meanwhile.
        """
        status, spool_id = self.scp.stores.finish(store, f"{self.calling_ae}@{self.peer_ip}")
        if store.retrieved is not None:
            status = self._retrieved(store)
            self._respond(store.context_id, C_STORE_RSP, store.message_id, status, store.sop_class_uid,
                          store.sop_instance_uid)
            return
        if spool_id is None:
            self.refused += 1
        else:
            self.accepted += 1
        self._respond(store.context_id, C_STORE_RSP, store.message_id, status, store.sop_class_uid,
                      store.sop_instance_uid)
        if spool_id is not None:
            self.scp.hand_over(Received(spool_id, store.sop_instance_uid, store.sop_class_uid, self.calling_ae,
                                        self.peer_ip, time.time(), store.route))

    def _retrieved(self, store: Store) -> int:
        """Pass an instance retrieved for one of the router's operations to it; the status to answer."""
        assert store.retrieved is not None and self.scp.services is not None
        try:
            self.scp.services.arrived(store.retrieve, store.retrieved)
        except Exception as exc:  # noqa: BLE001 - Redis away: the source is told, nothing is kept
            log.warning("C-STORE %s for retrieve %s not passed on: %s", store.sop_instance_uid, store.retrieve, exc)
            store.retrieved.unlink(missing_ok=True)
            return Status.OUT_OF_RESOURCES
        self.accepted += 1
        return Status.SUCCESS

    def _drop_store(self) -> None:
        """Forget an instance whose association ended before its last fragment."""
        if self.store is not None:
            self.scp.stores.discard(self.store)
            self.store = None
