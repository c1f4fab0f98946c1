"""The DICOM wire vocabulary both sides of the router speak by hand.

The ingest SCP (``router/ingest/fastscp.py``) and the sender
(``workers/association.py``) leave pynetdicom's threads out of the data
path; what they share — PDU types, the command set elements, encoding and
decoding a command set — lives here once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pynetdicom import _config
from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from router.kernel.implementation import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1: the DICOM application context

# PDU types (PS3.8 §9.3.1)
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

# Message control header of a PDV (PS3.8 §E.2): bit 0 command, bit 1 last fragment.
COMMAND, LAST = 0x01, 0x02

# Command set elements, group 0000 (PS3.7 §E.1).
COMMAND_GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE_UID = 0x1000
REQUESTED_SOP_INSTANCE_UID = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008

# Command Field values (PS3.7 §E.1-1); a response sets bit 15 of its request's.
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
RESPONSE_BIT = 0x8000

NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 §E.1-1)
DATA_SET_PRESENT = 0x0000  # ... any other value means one does
PRIORITY_MEDIUM = 0x0000

_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length
_PDV_HEADER = struct.Struct(">BxIIBB")  # P-DATA-TF header + one PDV item header (PS3.8 §9.3.5)


def p_data_header(context_id: int, length: int, control: int) -> bytes:
    """The 12 bytes before a PDV of ``length`` bytes sent alone in its P-DATA-TF PDU:
    PDU type and length, PDV item length, presentation context, control header
    (``COMMAND`` and/or ``LAST``, PS3.8 §E.2)."""
    return _PDV_HEADER.pack(P_DATA_TF_PDU, length + 6, length + 2, context_id, control)


def user_information(max_pdu: int) -> list[object]:
    """The user information items both sides send while associating (PS3.7 D.3.3):
    the largest PDU we receive (0 = no limit) and who we are."""
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [maximum, class_uid, version]


def us(value: int) -> bytes:
    """An unsigned short (US) element value."""
    return struct.pack("<H", value)


def encode_command(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode a command set: implicit VR little endian, group 0000 (PS3.7 §6.3.1).

    Args:
        elements: (element number, value) in ascending order; odd-length
            values (UIDs) get the NUL padding PS3.5 §9.1 requires.

    Returns:
        The command set, led by its Command Group Length.
    """
    parts = []
    for element, value in elements:
        if len(value) % 2:
            value += b"\x00"
        parts.append(_ELEMENT.pack(0x0000, element, len(value)) + value)
    body = b"".join(parts)
    return _ELEMENT.pack(0x0000, COMMAND_GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


def decode_command(data: bytes | bytearray) -> dict[int, bytes]:
    """Decode a command set into element number -> raw value.

    Raises:
        ValueError: not a well-formed group 0000 in implicit VR little endian.
    """
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ValueError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError(f"malformed command element ({group:04X},{element:04X})")
        elements[element] = bytes(data[pos : pos + length])
        pos += length
    return elements


def command_us(command: dict[int, bytes], element: int) -> int | None:
    """An unsigned short element of a decoded command set, if present."""
    value = command.get(element)
    return int.from_bytes(value[:2], "little") if value and len(value) >= 2 else None


def command_ui(command: dict[int, bytes], element: int) -> str:
    """A UID element of a decoded command set ('' when absent)."""
    return command.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings for a fast, quiet data path (every router process).

    The standard log handler copies and prints every dataset (and would log
    patient data); a third of stock handler time (docs/measurements.md).
    """
    _config.LOG_HANDLER_LEVEL = "none"
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.STORE_SEND_CHUNKED_DATASET = True
