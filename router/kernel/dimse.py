"""DIMSE command sets (PS3.7 §9.3, §10.3, Annex E): their elements, and every
command set the router sends, built here once.

Both directions use them: the ingest (``router/ingest/fastscp.py``) answers
requests and sends commitment reports; the requestor
(``router/kernel/requestor.py``) carries C-STORE, C-ECHO and N-ACTION
requests for the forwarding workers and probes. PDUs are ``router/kernel/pdu.py``'s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from router.kernel.implementation import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from router.kernel.uids import uid_problem

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1: the DICOM application context
VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (PS3.4 Annex A)

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
MOVE_DESTINATION = 0x0600
OFFENDING_ELEMENT = 0x0901
ERROR_COMMENT = 0x0902
REMAINING = 0x1020  # Number of Remaining / Completed / Failed / Warning Sub-operations
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

# Command Field values (PS3.7 §E.1-1); a response sets bit 15 of its request's.
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
C_GET_RQ = 0x0010
C_FIND_RQ = 0x0020
C_MOVE_RQ = 0x0021
C_CANCEL_RQ = 0x0FFF
N_SET_RQ = 0x0120
N_CREATE_RQ = 0x0140
RESPONSE_BIT = 0x8000

NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 §E.1-1)
DATA_SET_PRESENT = 0x0000  # ... any other value means one does
PRIORITY_MEDIUM = 0x0000

_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length


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


# -- the command sets the router sends ------------------------------------------


def _ui(value: str) -> bytes:
    return value.encode("ascii")


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 §9.3.1.1); its data set follows."""
    return encode_command((
        (AFFECTED_SOP_CLASS_UID, _ui(sop_class)),
        (COMMAND_FIELD, us(C_STORE_RQ)),
        (MESSAGE_ID, us(message_id)),
        (PRIORITY, us(PRIORITY_MEDIUM)),
        (COMMAND_DATA_SET_TYPE, us(DATA_SET_PRESENT)),
        (AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance)),
    ))


def c_echo_rq(message_id: int) -> bytes:
    """The C-ECHO-RQ command set (PS3.7 §9.3.5.1)."""
    return encode_command((
        (AFFECTED_SOP_CLASS_UID, _ui(VERIFICATION)),
        (COMMAND_FIELD, us(C_ECHO_RQ)),
        (MESSAGE_ID, us(message_id)),
        (COMMAND_DATA_SET_TYPE, us(NO_DATA_SET)),
    ))


def response(command_field: int, message_id: int, status: int, sop_class: str = "", sop_instance: str = "") -> bytes:
    """A response without a data set (C-STORE-RSP, C-ECHO-RSP, a refusal of any request).

    The affected UIDs are echoed only when they are ones the router can handle
    (``router/kernel/uids.py``): a refused one (non-ASCII, a control character,
    too long) is left out, which the responses allow (PS3.7 §9.3: both are
    optional, "U(=)").
    """
    elements = [
        (COMMAND_FIELD, us(command_field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, us(message_id)),
        (COMMAND_DATA_SET_TYPE, us(NO_DATA_SET)),
        (STATUS, us(status)),
    ]
    if sop_class and uid_problem("", sop_class) is None:
        elements.insert(0, (AFFECTED_SOP_CLASS_UID, _ui(sop_class)))
    if sop_instance and uid_problem("", sop_instance) is None:
        elements.append((AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance)))
    return encode_command(elements)


def n_action_rq(message_id: int, sop_class: str, sop_instance: str, action_type: int) -> bytes:
    """An N-ACTION-RQ command set (PS3.7 §10.3.4.1); its data set follows."""
    return encode_command((
        (REQUESTED_SOP_CLASS_UID, _ui(sop_class)),
        (COMMAND_FIELD, us(N_ACTION_RQ)),
        (MESSAGE_ID, us(message_id)),
        (COMMAND_DATA_SET_TYPE, us(DATA_SET_PRESENT)),
        (REQUESTED_SOP_INSTANCE_UID, _ui(sop_instance)),
        (ACTION_TYPE_ID, us(action_type)),
    ))


def n_event_report_rq(message_id: int, sop_class: str, sop_instance: str, event_type: int) -> bytes:
    """An N-EVENT-REPORT-RQ command set (PS3.7 §10.3.1.1); its data set follows."""
    return encode_command((
        (AFFECTED_SOP_CLASS_UID, _ui(sop_class)),
        (COMMAND_FIELD, us(N_EVENT_REPORT_RQ)),
        (MESSAGE_ID, us(message_id)),
        (COMMAND_DATA_SET_TYPE, us(DATA_SET_PRESENT)),
        (AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance)),
        (EVENT_TYPE_ID, us(event_type)),
    ))


def n_response(command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str,
               type_element: int, type_id: int) -> bytes:
    """An N-ACTION-RSP or N-EVENT-REPORT-RSP without a data set (PS3.7 §10.3.4.2, §10.3.1.2).

    Args:
        type_element: ``ACTION_TYPE_ID`` or ``EVENT_TYPE_ID``, echoed with ``type_id``.
    """
    return encode_command((
        (AFFECTED_SOP_CLASS_UID, _ui(sop_class)),
        (COMMAND_FIELD, us(command_field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, us(message_id)),
        (COMMAND_DATA_SET_TYPE, us(NO_DATA_SET)),
        (STATUS, us(status)),
        (AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance)),
        (type_element, us(type_id)),
    ))


def encode_elements(elements: dict[int, bytes]) -> bytes:
    """:func:`encode_command` of elements in any order."""
    return encode_command(sorted(elements.items()))


def ui(value: str) -> bytes:
    """A UID (or AE title, CS) element value, encoded."""
    return value.encode("ascii")


def c_request(command_field: int, message_id: int, sop_class: str, **extra: bytes) -> bytes:
    """A C-FIND-, C-MOVE- or C-GET-RQ command set (PS3.7 §9.3.2-9.3.4); its identifier follows.

    Args:
        extra: more elements by name: ``move_destination`` (C-MOVE).
    """
    elements = {
        AFFECTED_SOP_CLASS_UID: ui(sop_class),
        COMMAND_FIELD: us(command_field),
        MESSAGE_ID: us(message_id),
        PRIORITY: us(PRIORITY_MEDIUM),
        COMMAND_DATA_SET_TYPE: us(DATA_SET_PRESENT),
    }
    if "move_destination" in extra:
        elements[MOVE_DESTINATION] = extra["move_destination"].ljust(16, b" ")
    return encode_elements(elements)


def c_cancel_rq(message_id: int) -> bytes:
    """A C-CANCEL-RQ for the request ``message_id`` (PS3.7 §9.3.2.3)."""
    return encode_elements({
        COMMAND_FIELD: us(C_CANCEL_RQ),
        MESSAGE_ID_BEING_RESPONDED_TO: us(message_id),
        COMMAND_DATA_SET_TYPE: us(NO_DATA_SET),
    })


def c_store_sub_rq(message_id: int, sop_class: str, sop_instance: str, originator_ae: str = "",
                   originator_message_id: int = 0) -> bytes:
    """A C-STORE-RQ of a retrieve's sub-operation, naming the C-MOVE it serves when it does
    (Move Originator AE Title and Message ID, PS3.7 §9.3.1.1)."""
    elements = {
        AFFECTED_SOP_CLASS_UID: ui(sop_class),
        COMMAND_FIELD: us(C_STORE_RQ),
        MESSAGE_ID: us(message_id),
        PRIORITY: us(PRIORITY_MEDIUM),
        COMMAND_DATA_SET_TYPE: us(DATA_SET_PRESENT),
        AFFECTED_SOP_INSTANCE_UID: ui(sop_instance),
    }
    if originator_ae:
        elements[MOVE_ORIGINATOR_AE_TITLE] = originator_ae.encode("ascii").ljust(16, b" ")
        elements[MOVE_ORIGINATOR_MESSAGE_ID] = us(originator_message_id)
    return encode_elements(elements)


def _error_comment(text: str) -> bytes:
    """An Error Comment (0000,0902), LO: at most 64 characters, ASCII, padded to even length."""
    value = text.encode("ascii", "replace")[:64]
    return value + (b" " if len(value) % 2 else b"")


def _answer(command_field: int, message_id: int, status: int, has_dataset: bool, sop_class: str,
            sop_instance: str, comment: str) -> dict[int, bytes]:
    """The elements every response of the services carries: what it answers, its status, the
    affected UIDs and Error Comment when given."""
    elements = {
        COMMAND_FIELD: us(command_field),
        MESSAGE_ID_BEING_RESPONDED_TO: us(message_id),
        COMMAND_DATA_SET_TYPE: us(DATA_SET_PRESENT if has_dataset else NO_DATA_SET),
        STATUS: us(status),
    }
    if sop_class:
        elements[AFFECTED_SOP_CLASS_UID] = ui(sop_class)
    if sop_instance:
        elements[AFFECTED_SOP_INSTANCE_UID] = ui(sop_instance)
    if comment:
        elements[ERROR_COMMENT] = _error_comment(comment)
    return elements


def c_response(command_field: int, message_id: int, status: int, sop_class: str, *, has_dataset: bool = False,
               counts: tuple[int, int, int, int] | None = None, comment: str = "") -> bytes:
    """A C-FIND-, C-MOVE- or C-GET-RSP (PS3.7 §9.3.2.2-9.3.4.2).

    Args:
        has_dataset: an identifier follows (a pending C-FIND answer; a retrieve's
            list of failed SOP instances).
        counts: (remaining, completed, failed, warning) sub-operations of a retrieve;
            ``remaining`` is left out when negative (a final response has none).
        comment: Error Comment, for a failure the caller should read.
    """
    elements = _answer(command_field, message_id, status, has_dataset, sop_class, "", comment)
    if counts is not None:
        remaining, completed, failed, warning = counts
        if remaining >= 0:
            elements[REMAINING] = us(remaining)
        elements[COMPLETED] = us(completed)
        elements[FAILED] = us(failed)
        elements[WARNING] = us(warning)
    return encode_elements(elements)


def n_request(command_field: int, message_id: int, sop_class: str, sop_instance: str, has_dataset: bool) -> bytes:
    """An N-CREATE-RQ (Affected SOP Instance UID; may be omitted) or N-SET-RQ
    (Requested SOP Instance UID) command set (PS3.7 §10.3.5.1, §10.3.3.1)."""
    if command_field == N_CREATE_RQ:
        elements = {AFFECTED_SOP_CLASS_UID: ui(sop_class)}
        if sop_instance:
            elements[AFFECTED_SOP_INSTANCE_UID] = ui(sop_instance)
    else:
        elements = {REQUESTED_SOP_CLASS_UID: ui(sop_class), REQUESTED_SOP_INSTANCE_UID: ui(sop_instance)}
    elements.update({
        COMMAND_FIELD: us(command_field),
        MESSAGE_ID: us(message_id),
        COMMAND_DATA_SET_TYPE: us(DATA_SET_PRESENT if has_dataset else NO_DATA_SET),
    })
    return encode_elements(elements)


def n_set_create_response(command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str,
                          has_dataset: bool, comment: str = "") -> bytes:
    """An N-CREATE-RSP or N-SET-RSP (PS3.7 §10.3.5.2, §10.3.3.2)."""
    return encode_elements(_answer(command_field, message_id, status, has_dataset, sop_class, sop_instance, comment))
