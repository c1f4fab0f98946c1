"""Named DICOM status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).

A raw hex literal in a branch is how ``0x210`` slips in where ``0xC210`` was
meant; every status the router sends or interprets is named here.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS


class Status(IntEnum):
    SUCCESS = 0x0000
    # Warnings (PS3.4 B.2.3): the SCP stored the instance, perhaps altered.
    # PS3.7 Annex C.4: warnings despite their 0x0xxx codes.
    OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # Failures
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 §C.4.2: refused, the association stays
    # N-ACTION failures (PS3.7 §10.1.4.1.10, Annex C): a commitment request refused.
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_ACTION = 0x0123
    RESOURCE_LIMITATION = 0x0213
    # Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01  # optional keys not supported
    CANCEL = 0xFE00
    UNABLE_TO_CALCULATE_MATCHES = 0xA701
    UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUB_OPERATIONS_WARNING = 0xB000  # one or more sub-operations failed or had a warning
    UNABLE_TO_PROCESS = 0xC001
    # N-CREATE / N-SET (PS3.7 Annex C): an MPPS the router could not relay.
    DUPLICATE_SOP_INSTANCE = 0x0111


class Category(str, Enum):
    """What a C-STORE response status means for the sender."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, perhaps altered
    TRANSIENT = "transient"  # refused now; a later attempt may succeed
    PERMANENT = "permanent"  # refused for good, as the instance is


# What pynetdicom's tables lack, and the families of PS3.4 Table B.2-1 for
# codes an SCP picks within them.
_MEANINGS = {
    Status.OPTIONAL_ATTRIBUTES_NOT_SUPPORTED: "Warning: Requested optional Attributes are not supported",
    Status.PENDING: "Pending",
    Status.PENDING_WARNING: "Pending: optional keys not supported",
    Status.CANCEL: "Cancel",
    Status.UNABLE_TO_CALCULATE_MATCHES: "Refused: Out of Resources, unable to calculate number of matches",
    Status.UNABLE_TO_PERFORM_SUB_OPERATIONS: "Refused: Out of Resources, unable to perform sub-operations",
    Status.MOVE_DESTINATION_UNKNOWN: "Refused: Move Destination unknown",
    Status.UNABLE_TO_PROCESS: "Failed: Unable to process",
}
"""Meanings pynetdicom's storage table lacks, or gives for another service (0xA702 is
not a C-STORE's)."""
_FAMILIES = {
    0xA700: "Refused: Out of Resources",
    0xA900: "Error: Data Set Does Not Match SOP Class",
    0xC000: "Error: Cannot Understand",
    0xB000: "Warning",
}


_LOW_WARNINGS = {
    Status.OPTIONAL_ATTRIBUTES_NOT_SUPPORTED, Status.ATTRIBUTE_LIST_ERROR, Status.ATTRIBUTE_VALUE_OUT_OF_RANGE,
}


def category(status: int) -> Category:
    """Classify a C-STORE response status.

    0xA7xx (Out of Resources) is the only family a retry can cure; 0xA9xx and
    0xCxxx say the SCP will never take this dataset as it is (PS3.4 B.2.3).
    Unknown codes are treated as permanent rather than retried forever.
    """
    if status == Status.SUCCESS:
        return Category.SUCCESS
    if status in _LOW_WARNINGS or (status & 0xF000) == 0xB000:
        return Category.WARNING
    if (status & 0xFF00) == 0xA700:
        return Category.TRANSIENT
    return Category.PERMANENT


def is_failure(status: int) -> bool:
    """Whether ``status`` is a Failure of the 0xAxxx or 0xCxxx families (PS3.4 C.4), the ones
    a relay passes on to its caller as they are."""
    return status & 0xF000 in (0xA000, 0xC000)


def describe(status: int) -> str:
    """A status and its meaning in words, e.g. ``0xA700 Refused: Out of Resources``,
    for logs and dead-letter records an operator reads."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    if status in _MEANINGS:
        meaning = _MEANINGS[status]
    elif known:
        meaning = known[1] or known[0]
    else:
        meaning = _FAMILIES.get(status & 0xFF00) or _FAMILIES.get(status & 0xF000) or "unknown status"
    return f"0x{status:04X} {meaning}"
