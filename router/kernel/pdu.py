"""The DICOM upper layer's PDUs (PS3.8 §9.3), framed and parsed once.

Every association the router accepts (``router/ingest/fastscp.py``) or
requests (``router/kernel/requestor.py``) reads and writes its P-DATA-TF,
A-RELEASE and A-ABORT PDUs through this module; pynetdicom encodes and
decodes only the A-ASSOCIATE PDUs, which are cold (once per association).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from router.kernel.reader import Reader

# PDU types (PS3.8 §9.3.1)
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07
KNOWN_PDU_TYPES = frozenset(range(A_ASSOCIATE_RQ_PDU, A_ABORT_PDU + 1))

# Message control header of a PDV (PS3.8 §E.2): bit 0 command, bit 1 last fragment.
COMMAND, LAST = 0x01, 0x02

# A-ABORT source and reasons (PS3.8 Table 9-26).
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

HEADER = struct.Struct(">BxI")
"""A PDU's header: type, reserved, length of what follows (PS3.8 §9.3.1)."""
_PDV_ITEM = struct.Struct(">IBB")  # PDV item length, presentation context ID, control header
_P_DATA_PDV = struct.Struct(">BxIIBB")  # a P-DATA-TF header and one PDV item header together
_CONTROL = struct.Struct(">BxIxxxx")  # A-RELEASE-RQ/RP: 4 reserved bytes (PS3.8 Tables 9-24, 9-25)

RELEASE_RQ = _CONTROL.pack(A_RELEASE_RQ_PDU, 4)
RELEASE_RP = _CONTROL.pack(A_RELEASE_RP_PDU, 4)
MAX_CONTROL_PDU = 1 << 10
"""What an A-RELEASE or A-ABORT may carry: 4 bytes, and some slack for a sloppy peer."""


class ProtocolError(ValueError):
    """The peer broke the upper layer protocol: the association is aborted with ``reason``."""

    def __init__(self, reason: int, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def abort(source: int = ABORT_SOURCE_USER, reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU (PS3.8 Table 9-26): a service user gives no reason (0),
    the service provider one of the ``ABORT_*`` reasons."""
    return HEADER.pack(A_ABORT_PDU, 4) + bytes((0, 0, source, reason))


def abort_reason(body: bytes | bytearray | memoryview) -> str:
    """Source and reason of an A-ABORT, from its body (the 4 bytes after the header)."""
    if len(body) < 4:
        return "no reason given"
    return f"source {body[2]}, reason {body[3]}"


def p_data_header(context_id: int, length: int, control: int) -> bytes:
    """The 12 bytes before a PDV of ``length`` bytes sent alone in its P-DATA-TF PDU:
    PDU type and length, PDV item length, presentation context, control header
    (``COMMAND`` and/or ``LAST``, PS3.8 §E.2)."""
    return _P_DATA_PDV.pack(P_DATA_TF_PDU, length + 6, length + 2, context_id, control)


def fragment_size(peer_max_pdu: int, cap: int) -> int:
    """The largest PDV value to send a peer that receives PDUs of ``peer_max_pdu``
    (0: no limit, then ``cap``). PS3.8 §D.1: the maximum counts the PDV items
    (4-byte length, context ID, control header, data), not the 6-byte PDU header."""
    limit = min(peer_max_pdu, cap) if peer_max_pdu > 0 else cap
    return max(limit - 6, 1)


def pdv_parts(context_id: int, data: memoryview | bytes, control: int, fragment: int) -> list:
    """``data`` as P-DATA-TF PDUs of one PDV each, the last flagged (PS3.8 §9.3.5):
    alternating headers and views of ``data``, ready for one ``sendmsg``. Empty
    ``data`` is one empty PDV, flagged last (a message is never left unended)."""
    data = memoryview(data)
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


def p_data(context_id: int, data: bytes, control: int, fragment: int) -> bytes:
    """:func:`pdv_parts` joined into one buffer (command sets, small data sets)."""
    return b"".join(pdv_parts(context_id, data, control, fragment))


def read_header(reader: Reader) -> tuple[int, int]:
    """The next PDU's type and length."""
    return HEADER.unpack(reader.take(HEADER.size))


def read_control_body(reader: Reader, pdu_type: int, length: int) -> bytes:
    """The body of an A-RELEASE or A-ABORT PDU, bounded (a peer announcing
    gigabytes for one is broken or hostile)."""
    if length > MAX_CONTROL_PDU:
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDU type {pdu_type:#04x} of {length} bytes")
    return bytes(reader.take(length))


def pdv_items(reader: Reader, length: int) -> Iterator[tuple[int, int, int]]:
    """The PDV items of one P-DATA-TF PDU of ``length`` bytes (PS3.8 §9.3.5, Annex E.2).

    Yields (presentation context ID, control header, value length); the caller
    takes exactly that many bytes from ``reader`` before asking for the next.

    Raises:
        ProtocolError: an item's length does not fit the PDU.
    """
    remaining = length
    while remaining:
        if remaining < _PDV_ITEM.size:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF ends inside a PDV header")
        item_length, context_id, control = _PDV_ITEM.unpack(reader.take(_PDV_ITEM.size))
        if item_length < 2 or item_length + 4 > remaining:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDV of {item_length} bytes in {remaining}")
        remaining -= 4 + item_length
        yield context_id, control, item_length - 2
