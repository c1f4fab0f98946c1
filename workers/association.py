"""A lean, synchronous DICOM upper-layer association for the sending side.

pynetdicom runs every association on two threads that poll with 1 ms sleeps
and hand each response across a ``Condition``: in a forwarding worker that
was ~63 % of the CPU, and an idle association still cost 8 % of a core
(bench/README.md). A sender only ever has one request in flight (no
asynchronous operations window is negotiated, PS3.7 §D.3.3.3), so the whole
exchange fits on one blocking socket in the caller's thread: write the
request's PDUs, read PDUs until the response is complete.

pynetdicom still encodes the A-ASSOCIATE-RQ and decodes the AC/RJ (cold,
once per association); P-DATA-TF, command sets, release and abort are done
here by hand. Failures leave as the router's own errors: a failed
negotiation is :class:`DestinationUnavailable`, a broken association after
it is :class:`TransientSendError` (and the association is closed).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import BinaryIO

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from router.kernel.dimse import (
    A_ABORT_PDU,
    A_ASSOCIATE_AC_PDU,
    A_ASSOCIATE_RJ_PDU,
    A_RELEASE_RP_PDU,
    A_RELEASE_RQ_PDU,
    APPLICATION_CONTEXT,
    COMMAND,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    LAST,
    MESSAGE_ID_BEING_RESPONDED_TO,
    NO_DATA_SET,
    P_DATA_TF_PDU,
    RESPONSE_BIT,
    command_us,
    decode_command,
    p_data_header,
    user_information,
)
from router.kernel.errors import (
    DestinationBusy,
    DestinationTimeout,
    DestinationUnavailable,
    TransientSendError,
)

log = logging.getLogger(__name__)

# A peer that announces 0 (unlimited, PS3.8 §D.1) or a huge maximum still
# gets PDUs of at most this size: one read buffer, bounded memory.
PDU_CAP = 1 << 20
# Several PDUs go out per sendmsg() when they are small: one read() and one
# system call per ~256 KiB of dataset instead of one per PDU.
SEND_BATCH = 256 * 1024
MAX_PARTS = 512  # buffers per sendmsg(), below Linux's IOV_MAX of 1024
RELEASE_TIMEOUT = 2.0
REJECTED_TRANSIENT = 2  # A-ASSOCIATE-RJ result (PS3.8 Table 9-21)
# What a peer may send us, whatever it claims: a destination answers with
# command sets and, for commitment, a report of references (kilobytes); an
# A-ASSOCIATE-AC is a few kilobytes. A length beyond these is a broken or
# hostile peer, and must not make the sender allocate it (4 GiB at most).
MAX_RECEIVED_PDU = 16 << 20
MAX_ASSOCIATE_AC = 1 << 20

# PS3.8 Tables 9-24 and 9-26: type, reserved, length 4, two reserved bytes,
# then source 0 (service user) and reason 0 for an A-ABORT.
_RELEASE_RQ = bytes((A_RELEASE_RQ_PDU, 0, 0, 0, 0, 4, 0, 0, 0, 0))
_ABORT = bytes((A_ABORT_PDU, 0, 0, 0, 0, 4, 0, 0, 0, 0))

_PDU_HEADER = struct.Struct(">BxI")  # PDU type, reserved, length

IncomingRequest = Callable[[int, str, dict[int, bytes], bytes], bytes]
"""Answers a request the peer sends us on our association (a storage commitment
N-EVENT-REPORT-RQ, PS3.4 §J.3.3): (context id, its transfer syntax, command set,
data set) -> the response command set."""


class Association:
    """One established association, used by one thread at a time.

    Args:
        sock: the connected socket, after A-ASSOCIATE-AC.
        label: prefix for error messages (the destination's name).
        contexts: accepted presentation contexts, (SOP class, transfer syntax) -> context ID.
        max_pdu: the largest PDU to send (the peer's maximum, capped).
        dimse_timeout: seconds to wait for a response or for the peer to take data.
    """

    def __init__(self, sock: socket.socket, label: str, contexts: dict[tuple[str, str], int],
                 max_pdu: int, dimse_timeout: float) -> None:
        self.label = label
        self.contexts = contexts
        self.max_pdu = max_pdu
        self._sock: socket.socket | None = sock
        self.dimse_timeout = dimse_timeout
        self._sock.settimeout(dimse_timeout)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._message_id = 0
        # PS3.8 §D.1: the maximum length counts the PDV items (4-byte length,
        # context ID, control header, data), not the 6-byte PDU header.
        self._fragment = max_pdu - 6
        per_batch = max(1, min(SEND_BATCH // self._fragment, MAX_PARTS // 2 - 2))
        self._buffer = bytearray(self._fragment * per_batch)
        self._header = bytearray(_PDU_HEADER.size)
        self.on_request: IncomingRequest | None = None
        self._syntax_of = {context_id: ts for (_, ts), context_id in contexts.items()}

    # -- opening -----------------------------------------------------------

    @classmethod
    def negotiate(cls, host: str, port: int, *, calling_ae_title: str, called_ae_title: str,
                  contexts: list[tuple[str, str]], max_pdu: int, connect_timeout: float,
                  dimse_timeout: float, label: str) -> Association:
        """Connect and negotiate an association (PS3.8 §7.1).

        Args:
            contexts: (SOP class, transfer syntax) pairs, one presentation
                context each, given odd IDs 1, 3, 5… (PS3.8 §9.3.2.2).
            max_pdu: the largest PDU we accept (0 = unlimited).
            connect_timeout: for the TCP connection and the A-ASSOCIATE-AC (ARTIM).

        Raises:
            DestinationUnavailable: unreachable, rejected, aborted or not answering.
        """
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise DestinationUnavailable(f"{label}: cannot connect to {host}:{port}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # docs/measurements.md: Nagle
            proposed = {2 * i + 1: pair for i, pair in enumerate(contexts)}
            sock.sendall(_associate_rq(calling_ae_title, called_ae_title, proposed, max_pdu))
            pdu_type, pdu = _read_whole_pdu(sock)
        except OSError as exc:
            sock.close()
            raise DestinationUnavailable(f"{label}: no answer to A-ASSOCIATE-RQ from {host}:{port}: {exc}") from exc
        if pdu_type == A_ASSOCIATE_AC_PDU:
            ac = A_ASSOCIATE_AC()
            try:
                ac.decode(pdu)
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
            return cls(sock, label, accepted, max_send, dimse_timeout)
        sock.close()
        if pdu_type == A_ASSOCIATE_RJ_PDU:
            rj = A_ASSOCIATE_RJ()
            rj.decode(pdu)
            # Rejected-transient (PS3.8 §9.3.4): it may take us later, or take fewer of us.
            refused = DestinationBusy if rj.result == REJECTED_TRANSIENT else DestinationUnavailable
            raise refused(
                f"{label}: association rejected by {called_ae_title}: result {rj.result} "
                f"({rj.result_str}), source {rj.source} ({rj.source_str}), "
                f"diagnostic {rj.reason_diagnostic} ({rj.reason_str})")
        if pdu_type == A_ABORT_PDU:
            raise DestinationUnavailable(f"{label}: association aborted by {called_ae_title}: {_abort_reason(pdu)}")
        raise DestinationUnavailable(f"{label}: unexpected PDU type 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")

    # -- state -------------------------------------------------------------

    def is_alive(self) -> bool:
        """Whether the association can still carry a request.

        Between our requests the peer has only one thing to say on it: a
        request of its own (a storage commitment report), which is answered
        here. Anything else readable is an A-ABORT, an A-RELEASE-RQ or the
        end of the connection (a peer restarted, or its idle timer fired),
        so the association is dead. One poll() call, no wait, when nothing
        came.
        """
        while self._sock is not None and self._poll.poll(0):
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
            command: the encoded command set (see :func:`encode_command`).
            message_id: the Message ID in ``command``; the response must answer it.
            dataset: the encoded data set, as bytes or as (file positioned
                at its start, length) to stream from; None when the
                command says no data set follows.
            timeout: seconds the peer may take to take the data and answer
                (default: the association's DIMSE timeout).

        Returns:
            The response's command set (element -> raw value).

        Raises:
            DestinationTimeout: no answer in time; the association is aborted,
                so a late answer can never be taken for another request's.
            TransientSendError: the association broke, was aborted or released
                by the peer, or the peer broke the protocol; the association
                is closed.
        """
        limit = timeout or self.dimse_timeout
        try:
            self._socket().settimeout(limit)
            # The command goes out in the same system call as the first data.
            parts = self._pdv_parts(context_id, memoryview(command), COMMAND)
            if isinstance(dataset, tuple):
                self._stream_pdvs(context_id, *dataset, parts)
            else:
                if dataset is not None:
                    parts += self._pdv_parts(context_id, memoryview(dataset), 0)
                self._send_parts(parts)
            response = self._read_response()
        except TransientSendError:
            self.abort()
            raise
        except TimeoutError as exc:
            self.abort()
            raise DestinationTimeout(f"{self.label}: no answer within {limit:g} s; association aborted") from exc
        except (OSError, ValueError) as exc:
            self.abort()
            raise TransientSendError(f"{self.label}: association lost: {exc or type(exc).__name__}") from exc
        answered = command_us(response, MESSAGE_ID_BEING_RESPONDED_TO)
        if answered != message_id:
            self.abort()
            raise TransientSendError(
                f"{self.label}: association lost: response to message {answered}, expected {message_id}")
        return response

    def _pdv_parts(self, context_id: int, data: memoryview, control: int) -> list:
        """``data`` as P-DATA-TF PDUs of one PDV each, the last one flagged (PS3.8 §9.3.5):
        alternating headers and views of ``data``, ready for sendmsg()."""
        fragment = self._fragment
        total = len(data)
        parts: list = []
        pos = 0
        while True:
            n = min(fragment, total - pos)
            last = pos + n >= total
            parts.append(p_data_header(context_id, n, control | (LAST if last else 0)))
            parts.append(data[pos : pos + n])
            pos += n
            if last:
                return parts

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
            self._send_parts(parts + self._pdv_parts(context_id, view[:0], 0))
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
                parts.append(p_data_header(context_id, n, LAST if last else 0))
                parts.append(view[pos : pos + n])
            self._send_parts(parts)
            parts = []
            remaining -= got

    def _send_parts(self, parts: list) -> None:
        """Write all of ``parts`` without copying them: one sendmsg() per
        ``MAX_PARTS`` buffers when the socket takes them whole."""
        sock = self._socket()
        for start in range(0, len(parts), MAX_PARTS):
            batch = parts[start : start + MAX_PARTS]
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
        self._send_parts(self._pdv_parts(context_id, memoryview(answer), COMMAND))

    def _read_message(self) -> tuple[int, dict[int, bytes], bytes]:
        """Read PDUs until one whole message (command set and its data set, if any) arrived.

        Returns:
            Its presentation context, command set and data set (empty without one).
        """
        command = bytearray()
        dataset = bytearray()
        command_done = dataset_done = False
        decoded: dict[int, bytes] | None = None
        context_id = 0
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == A_ABORT_PDU:
                self.close()
                raise TransientSendError(f"{self.label}: association lost: aborted by the peer ({_abort_reason(body)})")
            if pdu_type == A_RELEASE_RQ_PDU:
                # The acceptor may not release (PS3.8 §7.2): treat it as the end.
                self.close()
                raise TransientSendError(f"{self.label}: association lost: the peer released it mid-request")
            if pdu_type != P_DATA_TF_PDU:
                raise TransientSendError(f"{self.label}: association lost: unexpected PDU type 0x{pdu_type:02X}")
            pos, end = 0, len(body)
            while pos < end:
                (length,) = struct.unpack_from(">I", body, pos)
                if length < 2 or pos + 4 + length > end:
                    raise ValueError("malformed PDV item")
                context_id = body[pos + 4]
                control = body[pos + 5]
                fragment = body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & COMMAND:
                    if command_done:
                        raise ValueError("command fragment after the last one")
                    command += fragment
                    command_done = bool(control & LAST)
                else:
                    if len(dataset) + len(fragment) > MAX_RECEIVED_PDU:
                        raise ValueError(f"a data set of more than {MAX_RECEIVED_PDU} bytes from the peer")
                    dataset += fragment
                    dataset_done = bool(control & LAST)
            if command_done and decoded is None:
                decoded = decode_command(command)
            if decoded is not None and (dataset_done or command_us(decoded, COMMAND_DATA_SET_TYPE) == NO_DATA_SET):
                return context_id, decoded, bytes(dataset)

    def _read_pdu(self) -> tuple[int, bytearray]:
        """Read one PDU: its type and body (without the 6-byte header)."""
        sock = self._socket()
        header = self._header
        _recv_exactly(sock, memoryview(header))
        pdu_type, length = _PDU_HEADER.unpack(header)
        if length > MAX_RECEIVED_PDU:
            self.close()
            raise TransientSendError(f"{self.label}: association lost: the peer sent a PDU of {length} bytes "
                                     f"(at most {MAX_RECEIVED_PDU} taken)")
        body = bytearray(length)
        _recv_exactly(sock, memoryview(body))
        return pdu_type, body

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
            self._sock.sendall(_RELEASE_RQ)
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type in (A_RELEASE_RP_PDU, A_ABORT_PDU, A_RELEASE_RQ_PDU):
                    break  # a release collision (RQ) ends it too
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
            self._sock.sendall(_ABORT)
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


def _associate_rq(calling: str, called: str, contexts: dict[int, tuple[str, str]], max_pdu: int) -> bytes:
    """Encode an A-ASSOCIATE-RQ as pynetdicom's ACSE would (acse.py ``send_request``)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.user_information = user_information(max_pdu)
    definitions = []
    for context_id, (sop_class, ts) in contexts.items():
        context = build_context(sop_class, [ts])
        context.context_id = context_id
        definitions.append(context)
    primitive.presentation_context_definition_list = definitions
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _read_whole_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Read one PDU including its header (pynetdicom's decoders want it whole)."""
    header = bytearray(_PDU_HEADER.size)
    _recv_exactly(sock, memoryview(header))
    pdu_type, length = _PDU_HEADER.unpack(header)
    if length > MAX_ASSOCIATE_AC:
        raise ConnectionError(f"answer of {length} bytes (at most {MAX_ASSOCIATE_AC} taken)")
    body = bytearray(length)
    _recv_exactly(sock, memoryview(body))
    return pdu_type, bytes(header + body)


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got, want = 0, len(view)
    while got < want:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError("connection closed by the peer")
        got += n


def _abort_reason(pdu: bytes | bytearray) -> str:
    """Source and reason of an A-ABORT, from its body or whole PDU (PS3.8 Table 9-26)."""
    body = pdu[6:] if len(pdu) >= 10 and pdu[0] == A_ABORT_PDU else pdu
    if len(body) < 4:
        return "no reason given"
    return f"source {body[2]}, reason {body[3]}"
