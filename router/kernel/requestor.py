"""The associations the router requests: a lean, synchronous upper layer.

Forwarding workers send C-STOREs and N-ACTIONs on them, probes C-ECHOs, and
the ingest its commitment reports to modalities that have released. One
request is in flight at a time (no asynchronous operations window is
negotiated, PS3.7 §D.3.3.3), so the exchange fits on one blocking socket in
the caller's thread: write the request's PDUs, read PDUs until the response
is complete. pynetdicom runs every association on two threads that poll with
1 ms sleeps; in a forwarding worker that was ~63 % of the CPU
(bench/README.md).

pynetdicom encodes the A-ASSOCIATE-RQ and decodes the AC/RJ (cold, once per
association); PDUs are ``router/kernel/pdu.py``'s, the socket is read by
``router/kernel/reader.py`` — the same as the associations the ingest
accepts — and TLS (PS3.15 Annex B) is ``router/kernel/tls.py``'s. Failures
leave as the router's own errors: a failed connection, handshake or
negotiation is :class:`DestinationUnavailable` (or :class:`DestinationBusy`),
a broken association after it :class:`TransientSendError` (and the
association is closed).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from router.kernel import pdu
from router.kernel import tls as tls_contexts
from router.kernel.dimse import (
    APPLICATION_CONTEXT,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    MESSAGE_ID_BEING_RESPONDED_TO,
    NO_DATA_SET,
    RESPONSE_BIT,
    STATUS,
    c_cancel_rq,
    command_us,
    decode_command,
    user_information,
)
from router.kernel.errors import (
    DestinationBusy,
    DestinationTimeout,
    DestinationUnavailable,
    TransientSendError,
)
from router.kernel.pdu import COMMAND, LAST, ProtocolError
from router.kernel.reader import Reader
from router.kernel.settings import PeerTLSSettings

log = logging.getLogger(__name__)

PDU_CAP = 1 << 20
"""A peer that announces 0 (unlimited, PS3.8 §D.1) or a huge maximum still gets
PDUs of at most this size: one read buffer, bounded memory."""
SEND_BATCH = 256 * 1024
"""Several PDUs go out per sendmsg() when they are small: one read() and one
system call per ~256 KiB of data set instead of one per PDU."""
MAX_PARTS = 512  # buffers per sendmsg(), below Linux's IOV_MAX of 1024
RELEASE_TIMEOUT = 2.0
REJECTED_TRANSIENT = 2  # A-ASSOCIATE-RJ result (PS3.8 Table 9-21)
MAX_RECEIVED = 16 << 20
"""What a peer may send us in one message, whatever it claims: command sets
and, for commitment, a report of references (kilobytes). A length beyond this
is a broken or hostile peer, and must not make the router allocate it."""
MAX_ASSOCIATE_AC = 1 << 20
MAX_COMMAND = 1 << 16  # a command set is a few hundred bytes
PENDING = frozenset({0xFF00, 0xFF01})
"""Pending statuses (PS3.4 C.4.1.1.4): more responses follow."""

IncomingRequest = Callable[[int, str, dict[int, bytes], bytes], bytes]
"""Answers a request the peer sends us on our association (a storage commitment
N-EVENT-REPORT-RQ, PS3.4 §J.3.3): (context id, its transfer syntax, command set,
data set) -> the response command set."""


class RequestedAssociation:
    """One established association the router requested, used by one thread at a time.

    Args:
        sock: the connected socket (TLS-wrapped for a TLS peer), after A-ASSOCIATE-AC.
        reader: the reader that took the A-ASSOCIATE-AC from ``sock``.
        label: prefix for error messages (the destination's or modality's name).
        contexts: accepted presentation contexts, (SOP class, transfer syntax) -> context ID.
        max_pdu: the largest PDU to send (the peer's maximum, capped).
        dimse_timeout: seconds to wait for a response or for the peer to take data.
    """

    def __init__(self, sock: socket.socket, reader: Reader, label: str, contexts: dict[tuple[str, str], int],
                 max_pdu: int, dimse_timeout: float) -> None:
        self.label = label
        self.contexts = contexts
        self.max_pdu = max_pdu
        self._sock: socket.socket | None = sock
        self._reader = reader
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.dimse_timeout = dimse_timeout
        self._sock.settimeout(dimse_timeout)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._message_id = 0
        self._fragment = pdu.fragment_size(max_pdu, PDU_CAP)
        per_batch = max(1, min(SEND_BATCH // self._fragment, MAX_PARTS // 2 - 2))
        self._buffer = bytearray(self._fragment * per_batch)
        self.on_request: IncomingRequest | None = None
        self._syntax_of = {context_id: ts for (_, ts), context_id in contexts.items()}

    # -- opening -----------------------------------------------------------

    @classmethod
    def negotiate(cls, host: str, port: int, *, calling_ae_title: str, called_ae_title: str,
                  contexts: list[tuple[str, str]], max_pdu: int, connect_timeout: float,
                  dimse_timeout: float, label: str, scp_role_for: Iterable[str] = (),
                  tls: PeerTLSSettings | None = None) -> RequestedAssociation:
        """Connect and negotiate an association (PS3.8 §7.1).

        Args:
            contexts: (SOP class, transfer syntax) pairs, one presentation
                context each, given odd IDs 1, 3, 5… (PS3.8 §9.3.2.2).
            max_pdu: the largest PDU we accept (0 = unlimited).
            connect_timeout: for the TCP connection, the TLS handshake and
                the A-ASSOCIATE-AC (ARTIM), each.
            scp_role_for: SOP classes for which the router proposes itself as
                SCP only (SCP/SCU Role Selection, PS3.7 §D.3.3.4): a
                commitment report goes from SCP to SCU.
            tls: connect with DICOM TLS (PS3.15 Annex B) on these settings;
                the peer's certificate must verify, or nothing is sent.

        Raises:
            DestinationUnavailable: unreachable, untrusted, rejected, aborted or not answering.
            DestinationBusy: rejected for now (transient), it may take us later.
        """
        context = None
        if tls is not None:
            try:
                context = tls_contexts.for_peer(tls, label)
            except (OSError, ssl.SSLError) as exc:
                raise DestinationUnavailable(f"{label}: its TLS settings do not load: {exc}; nothing sent") from exc
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise DestinationUnavailable(f"{label}: cannot connect to {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # docs/measurements.md: Nagle
        if context is not None:
            try:
                # PS3.15 §B.1: the handshake comes first, before any DICOM PDU.
                sock = context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise DestinationUnavailable(f"{label}: TLS: the certificate of {host}:{port} does not verify: "
                                             f"{exc.verify_message or exc}; nothing sent") from exc
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise DestinationUnavailable(f"{label}: TLS handshake with {host}:{port} failed: {exc}") from exc
        reader = Reader(sock)
        try:
            proposed = {2 * i + 1: pair for i, pair in enumerate(contexts)}
            sock.sendall(_associate_rq(calling_ae_title, called_ae_title, proposed, max_pdu, scp_role_for))
            pdu_type, whole = _read_whole_pdu(reader)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise DestinationUnavailable(f"{label}: no answer to A-ASSOCIATE-RQ from {host}:{port}: {exc}") from exc
        if pdu_type == pdu.A_ASSOCIATE_AC_PDU:
            ac = A_ASSOCIATE_AC()
            try:
                ac.decode(whole)
                primitive = ac.to_primitive()
            except Exception as exc:  # pynetdicom's item decoders raise several types
                sock.close()
                raise DestinationUnavailable(f"{label}: malformed A-ASSOCIATE-AC: {exc}") from exc
            accepted = {}
            for cx in primitive.presentation_context_definition_results_list:
                if cx.result == 0 and cx.context_id in proposed and cx.transfer_syntax:
                    sop_class, _ = proposed[cx.context_id]
                    accepted[(sop_class, str(cx.transfer_syntax[0]))] = cx.context_id
            peer_max = next((item.maximum_length_received for item in primitive.user_information
                             if isinstance(item, MaximumLengthNotification)), 0) or 0
            max_send = min(peer_max, PDU_CAP) if peer_max > 0 else PDU_CAP
            if max_send < 64:  # cannot carry a PDV at all: a broken peer
                sock.close()
                raise DestinationUnavailable(f"{label}: peer maximum PDU length {peer_max} is unusable")
            return cls(sock, reader, label, accepted, max_send, dimse_timeout)
        sock.close()
        if pdu_type == pdu.A_ASSOCIATE_RJ_PDU:
            rj = A_ASSOCIATE_RJ()
            rj.decode(whole)
            # Rejected-transient (PS3.8 §9.3.4): it may take us later, or take fewer of us.
            refused = DestinationBusy if rj.result == REJECTED_TRANSIENT else DestinationUnavailable
            raise refused(
                f"{label}: association rejected by {called_ae_title}: result {rj.result} "
                f"({rj.result_str}), source {rj.source} ({rj.source_str}), "
                f"diagnostic {rj.reason_diagnostic} ({rj.reason_str})")
        if pdu_type == pdu.A_ABORT_PDU:
            raise DestinationUnavailable(f"{label}: association aborted by {called_ae_title}: "
                                         f"{pdu.abort_reason(whole[pdu.HEADER.size:])}")
        raise DestinationUnavailable(f"{label}: unexpected PDU type 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")

    # -- state -------------------------------------------------------------

    def is_alive(self) -> bool:
        """Whether the association can still carry a request.

        Between our requests the peer has only one thing to say on it: a
        request of its own (a storage commitment report), which is answered
        here. Anything else readable is an A-ABORT, an A-RELEASE-RQ or the
        end of the connection (a peer restarted, or its idle timer fired),
        so the association is dead. No wait when nothing came.
        """
        while self._sock is not None and (self._reader.buffered() or self._poll.poll(0)):
            if self.on_request is None:
                self.close()
                return False
            try:
                self._socket().settimeout(self.dimse_timeout)
                self._serve_request(*self._read_message())
            except (TransientSendError, OSError, ValueError) as exc:
                log.info("%s: association ended while idle: %s", self.label, exc or type(exc).__name__)
                self.abort()
                return False
        return self._sock is not None

    def next_message_id(self) -> int:
        """A fresh Message ID: 1..65535, then wraps (PS3.7 §E.1: unique among outstanding requests)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    # -- requests ----------------------------------------------------------

    def request(self, context_id: int, command: bytes, message_id: int,
                dataset: bytes | tuple[BinaryIO, int] | None = None,
                timeout: float | None = None) -> dict[int, bytes]:
        """Send one DIMSE request and wait for its response (PS3.7 §9.3, §10.3).

        Args:
            context_id: the accepted presentation context to use.
            command: the encoded command set (``router/kernel/dimse.py``).
            message_id: the Message ID in ``command``; the response must answer it.
            dataset: the encoded data set, as bytes or as (file positioned
                at its start, length) to stream from; None when the
                command says no data set follows.
            timeout: seconds the peer may take to take the data and answer
                (default: the association's DIMSE timeout).

        Returns:
            The response's command set (element -> raw value; a data set the
            response carries under the key -1).

        Raises:
            DestinationTimeout: no answer in time; the association is aborted,
                so a late answer can never be taken for another request's.
            TransientSendError: the association broke, was aborted or released
                by the peer, or the peer broke the protocol; the association
                is closed.
        """
        limit = timeout or self.dimse_timeout
        with self._exchange(limit):
            self._socket().settimeout(limit)
            # The command goes out in the same system call as the first data.
            parts = pdu.pdv_parts(context_id, command, COMMAND, self._fragment)
            if isinstance(dataset, tuple):
                self._stream_pdvs(context_id, *dataset, parts)
            else:
                if dataset is not None:
                    parts += pdu.pdv_parts(context_id, dataset, 0, self._fragment)
                self._send_parts(parts)
            response = self._read_response()
            self._check_answers(response, message_id)
        return response

    def responses(self, context_id: int, command: bytes, message_id: int, dataset: bytes,
                  timeout: float | None = None) -> Iterator[dict[int, bytes]]:
        """Send a request that is answered by several responses (C-FIND, C-MOVE, C-GET:
        pending ones, then a final one, PS3.7 §9.1.2-9.1.4) and yield each as it arrives.

        Each response is a command set as :meth:`request` returns it (its data set under
        the key -1). The generator ends after the final response (a status that is not
        Pending, 0xFF00/0xFF01). ``timeout`` bounds the wait for each response, not the
        whole exchange. Errors are :meth:`request`'s.
        """
        limit = timeout or self.dimse_timeout
        with self._exchange(limit):
            self._socket().settimeout(limit)
            self._send_parts(pdu.pdv_parts(context_id, command, COMMAND, self._fragment)
                             + pdu.pdv_parts(context_id, dataset, 0, self._fragment))
            while True:
                response = self._read_response()
                self._check_answers(response, message_id)
                yield response
                if command_us(response, STATUS) not in PENDING:
                    return

    @contextlib.contextmanager
    def _exchange(self, limit: float) -> Iterator[None]:
        """One request's failures as the router's errors, the association aborted first,
        so that a late answer can never be taken for another request's."""
        try:
            yield
        except TransientSendError:
            self.abort()
            raise
        except TimeoutError as exc:
            self.abort()
            raise DestinationTimeout(f"{self.label}: no answer within {limit:g} s; association aborted") from exc
        except (OSError, ValueError) as exc:
            self.abort()
            raise TransientSendError(f"{self.label}: association lost: {exc or type(exc).__name__}") from exc

    def _check_answers(self, response: dict[int, bytes], message_id: int) -> None:
        answered = command_us(response, MESSAGE_ID_BEING_RESPONDED_TO)
        if answered != message_id:
            raise TransientSendError(
                f"{self.label}: association lost: response to message {answered}, expected {message_id}")

    def cancel(self, context_id: int, message_id: int) -> None:
        """Send a C-CANCEL-RQ for the request ``message_id`` (PS3.7 §9.3.2.3): its
        responses go on, ending with Cancel (0xFE00) or whatever the peer had finished.

        On a plain association another thread may call this while the one in
        :meth:`responses` waits (a socket takes a send beside a receive); on a TLS
        one only that thread may (:attr:`cancellable_from_anywhere`).
        """
        self._send_parts(pdu.pdv_parts(context_id, c_cancel_rq(message_id), COMMAND, self._fragment))

    @property
    def cancellable_from_anywhere(self) -> bool:
        """Whether :meth:`cancel` may come from another thread than the reading one: not
        on TLS, whose one SSL object is never used by two threads at once."""
        return not self._tls

    def _stream_pdvs(self, context_id: int, fp: BinaryIO, length: int, parts: list) -> None:
        """Send ``parts``, then ``length`` bytes of ``fp`` as data set PDVs, never
        holding more than one buffer of the file.

        Raises:
            ValueError: the file ended early (the message is then unfinishable).
        """
        fragment = self._fragment
        buffer = self._buffer
        view = memoryview(buffer)
        remaining = length
        if remaining == 0:
            self._send_parts(parts + pdu.pdv_parts(context_id, view[:0], 0, fragment))
            return
        while remaining > 0:
            want = min(len(buffer), remaining)
            got = 0
            while got < want:
                n = fp.readinto(view[got:want])
                if not n:
                    raise ValueError(f"file ended {remaining - got} bytes early")
                got += n
            for pos in range(0, got, fragment):
                n = min(fragment, got - pos)
                last = remaining - pos - n == 0
                parts.append(pdu.p_data_header(context_id, n, LAST if last else 0))
                parts.append(view[pos : pos + n])
            self._send_parts(parts)
            parts = []
            remaining -= got

    def _send_parts(self, parts: list) -> None:
        """Write all of ``parts``: on a plain socket without copying them, one
        sendmsg() per ``MAX_PARTS`` buffers; a TLS socket has no sendmsg(), so
        its parts are joined per batch (one TLS record stream per ~256 KiB)."""
        sock = self._socket()
        for start in range(0, len(parts), MAX_PARTS):
            batch = parts[start : start + MAX_PARTS]
            if self._tls:
                sock.sendall(b"".join(batch))
                continue
            sent = sock.sendmsg(batch)
            if sent == sum(map(len, batch)):
                continue
            for part in batch:  # partial write (full send buffer under a timeout): finish the rest
                if sent >= len(part):
                    sent -= len(part)
                    continue
                sock.sendall(memoryview(part)[sent:])
                sent = 0

    def _read_response(self) -> dict[int, bytes]:
        """Read messages until a response arrives; requests the peer sends meanwhile
        (a commitment report) are answered on the way."""
        while True:
            context_id, response, dataset = self._read_message()
            field = command_us(response, COMMAND_FIELD) or 0
            if field & RESPONSE_BIT:
                if dataset:
                    response[-1] = dataset  # the response's data set, for requests that expect one
                return response
            self._serve_request(context_id, response, dataset)

    def _serve_request(self, context_id: int, command: dict[int, bytes], dataset: bytes) -> None:
        """Answer a request from the peer, or break the association when none is expected."""
        if self.on_request is None:
            field = command_us(command, COMMAND_FIELD) or 0
            raise TransientSendError(f"{self.label}: association lost: unexpected request {field:#06x} from the peer")
        answer = self.on_request(context_id, self._syntax_of.get(context_id, ""), command, dataset)
        self._send_parts(pdu.pdv_parts(context_id, answer, COMMAND, self._fragment))

    def _read_message(self) -> tuple[int, dict[int, bytes], bytes]:
        """Read PDUs until one whole message (command set and its data set, if any) arrived.

        Returns:
            Its presentation context, command set and data set (empty without one).
        """
        reader = self._reader
        command = bytearray()
        dataset = bytearray()
        command_done = dataset_done = False
        decoded: dict[int, bytes] | None = None
        context_id = 0
        while True:
            pdu_type, length = pdu.read_header(reader)
            if pdu_type == pdu.A_ABORT_PDU:
                why = pdu.abort_reason(pdu.read_control_body(reader, pdu_type, length))
                self.close()
                raise TransientSendError(f"{self.label}: association lost: aborted by the peer ({why})")
            if pdu_type == pdu.A_RELEASE_RQ_PDU:
                # The acceptor may not release (PS3.8 §7.2): treat it as the end.
                self.close()
                raise TransientSendError(f"{self.label}: association lost: the peer released it mid-request")
            if pdu_type != pdu.P_DATA_TF_PDU:
                raise TransientSendError(f"{self.label}: association lost: unexpected PDU type 0x{pdu_type:02X}")
            if length > MAX_RECEIVED:
                self.close()
                raise TransientSendError(f"{self.label}: association lost: the peer sent a PDU of {length} bytes "
                                         f"(at most {MAX_RECEIVED} taken)")
            for context_id, control, size in pdu.pdv_items(reader, length):
                if control & COMMAND:
                    if command_done:
                        raise ProtocolError(pdu.ABORT_UNEXPECTED_PDU, "command fragment after the last one")
                    if len(command) + size > MAX_COMMAND:
                        raise ProtocolError(pdu.ABORT_INVALID_PARAMETER, "command set too long")
                    command += reader.take(size)
                    command_done = bool(control & LAST)
                else:
                    if len(dataset) + size > MAX_RECEIVED:
                        raise ProtocolError(pdu.ABORT_INVALID_PARAMETER,
                                            f"a data set of more than {MAX_RECEIVED} bytes from the peer")
                    for piece in reader.pieces(size):
                        dataset += piece
                    dataset_done = bool(control & LAST)
            if command_done and decoded is None:
                decoded = decode_command(command)
            if decoded is not None and (dataset_done or command_us(decoded, COMMAND_DATA_SET_TYPE) == NO_DATA_SET):
                return context_id, decoded, bytes(dataset)

    # -- closing -----------------------------------------------------------

    def release(self) -> None:
        """Release (PS3.8 §7.2): A-RELEASE-RQ, wait briefly for A-RELEASE-RP, close.

        Any trouble on the way just closes the connection: the peer sees
        the end of the association either way.
        """
        if self._sock is None:
            return
        try:
            self._sock.settimeout(RELEASE_TIMEOUT)
            self._sock.sendall(pdu.RELEASE_RQ)
            while True:
                pdu_type, length = pdu.read_header(self._reader)
                if pdu_type in (pdu.A_RELEASE_RP_PDU, pdu.A_ABORT_PDU, pdu.A_RELEASE_RQ_PDU):
                    break  # a release collision (RQ) ends it too
                if length > MAX_RECEIVED:
                    break
                for _ in self._reader.pieces(length):
                    pass  # a message that crossed our release: nobody waits for it
        except (OSError, ValueError, TransientSendError):
            pass
        finally:
            self.close()

    def abort(self) -> None:
        """Send an A-ABORT (best effort) and close (PS3.8 §7.3)."""
        if self._sock is None:
            return
        try:
            self._sock.settimeout(0.5)
            self._sock.sendall(pdu.abort())
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection without any PDU."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                self._poll.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError("association closed")
        return self._sock


def _associate_rq(calling: str, called: str, contexts: dict[int, tuple[str, str]], max_pdu: int,
                  scp_role_for: Iterable[str]) -> bytes:
    """Encode an A-ASSOCIATE-RQ as pynetdicom's ACSE would (acse.py ``send_request``)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = user_information(max_pdu)
    for sop_class in scp_role_for:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sop_class
        role.scu_role, role.scp_role = False, True
        items.append(role)
    primitive.user_information = items
    definitions = []
    for context_id, (sop_class, ts) in contexts.items():
        context = build_context(sop_class, [ts])
        context.context_id = context_id
        definitions.append(context)
    primitive.presentation_context_definition_list = definitions
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return rq.encode()


def _read_whole_pdu(reader: Reader) -> tuple[int, bytes]:
    """Read one PDU including its header (pynetdicom's decoders want it whole)."""
    pdu_type, length = pdu.read_header(reader)
    if length > MAX_ASSOCIATE_AC:
        raise ConnectionError(f"answer of {length} bytes (at most {MAX_ASSOCIATE_AC} taken)")
    return pdu_type, pdu.HEADER.pack(pdu_type, length) + bytes(reader.take(length))
