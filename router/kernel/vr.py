"""Value Representations and their header form, in one table (PS3.5 Table 7.1-1, 7.1-2).

In Explicit VR, a data element's header is either short — tag, VR, a 2-byte
length (8 bytes) — or long — tag, VR, 2 reserved bytes, a 4-byte length
(12 bytes). Which one depends only on the VR. Every piece of the router that
walks encoded elements by hand (the ingest check, the file meta writer and
reader, the sender) takes the answer from here; a VR added to the standard
(OV, SV and UV came in 2019) is added once.
"""

from __future__ import annotations

# PS3.5 Table 7.1-1: VRs with the 12-byte header (reserved 2 bytes, 32-bit length).
LONG_VRS = frozenset({
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
})

# PS3.5 Table 7.1-2: VRs with the 8-byte header (16-bit length).
SHORT_VRS = frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
    b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
})

KNOWN_VRS = LONG_VRS | SHORT_VRS

# Bytes per value of the binary VRs whose byte order follows the transfer
# syntax (PS3.5 §7.3): what a change of endianness must swap.
WORD_SIZE = {
    "AT": 2, "OW": 2, "SS": 2, "US": 2,
    "FL": 4, "OF": 4, "OL": 4, "SL": 4, "UL": 4,
    "FD": 8, "OD": 8, "OV": 8, "SV": 8, "UV": 8,
}


def header_length(vr: bytes) -> int:
    """8 or 12: the length of an Explicit VR element header with this VR."""
    return 12 if vr in LONG_VRS else 8
