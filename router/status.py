"""Named DICOM status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).

A raw hex literal in a branch is how ``0x210`` slips in where ``0xC210`` was
meant; every status the router sends or interprets is named here.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    # Warnings (PS3.4 B.2.3): the SCP stored the instance, perhaps altered.
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


def category(status: int) -> str:
    """Classify a C-STORE response status as ``success``, ``warning``,
    ``transient`` or ``permanent``.

    0xA7xx (Out of Resources) is the only family a retry can cure; 0xA9xx and
    0xCxxx say the SCP will never take this dataset as it is (PS3.4 B.2.3).
    Unknown codes are treated as permanent rather than retried forever.
    """
    if status == Status.SUCCESS:
        return "success"
    if status in (0x0001,) or (status & 0xF000) == 0xB000:
        return "warning"
    if (status & 0xFF00) == 0xA700:
        return "transient"
    return "permanent"
