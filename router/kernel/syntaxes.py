"""Transfer syntaxes and storage SOP classes the router knows, read from pydicom's UID registry.

The ingest routes on the header and never decodes pixels, so it has no reason
to refuse any transfer syntax DICOM defines (PS3.5 §10, Annex A): a fixed
list would refuse HTJ2K, MPEG and HEVC video for nothing. The registry that
pydicom ships is the standard's own table (PS3.6 Annex A); taking it from
there means a new edition arrives with a pydicom upgrade, not an edit here.
"""

from __future__ import annotations

from pydicom._uid_dict import UID_dictionary

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

# Not network transfer syntaxes: MIME/XML encodings (retired, PS3.5 Annex A.6,
# A.7) and Papyrus 3 (never part of DICOM).
_NOT_FOR_THE_NETWORK = {"1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"}

VERIFICATION_SYNTAXES = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN]
"""C-ECHO carries no dataset: the uncompressed syntaxes are all it needs."""

TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    uid for uid, entry in UID_dictionary.items()
    if entry[1] == "Transfer Syntax" and uid not in _NOT_FOR_THE_NETWORK
)
"""Every transfer syntax DICOM defines, retired ones included (senders still use them)."""

DEFLATED: frozenset[str] = frozenset(
    uid for uid in TRANSFER_SYNTAXES if UID_dictionary[uid][0].endswith("Deflate")
) | {DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
"""Whose whole dataset is a raw deflate stream (PS3.5 §A.5; JPIP Referenced Deflate, A.7)."""

VIDEO: frozenset[str] = frozenset(
    uid for uid in TRANSFER_SYNTAXES
    if UID_dictionary[uid][0].startswith(("MPEG", "Fragmentable MPEG", "HEVC", "SMPTE ST 2110"))
)
"""Video and audio streams: routed as they are, never transcoded."""

# Not sent over a network (PS3.10 DICOMDIR): not a storage SOP class for an SCP.
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    uid for uid, entry in UID_dictionary.items()
    if entry[1] == "SOP Class" and entry[0].endswith("Storage") and uid != _MEDIA_STORAGE_DIRECTORY
)
"""Every SOP class whose name says Storage, including those PS3.4 files under
other service classes (Color Palette, Hanging Protocol, Implant Templates,
Protocols, Inventory): each is stored by C-STORE like an image."""


def is_little_endian(transfer_syntax: str) -> bool:
    return transfer_syntax != EXPLICIT_VR_BIG_ENDIAN


def is_implicit_vr(transfer_syntax: str) -> bool:
    return transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
