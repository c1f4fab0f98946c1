"""Encode the File Meta Information of a spooled instance (PS3.10 §7.1) by hand.

pynetdicom's ``Event.encoded_dataset()`` builds, validates and encodes a
pydicom FileMetaDataset for every instance: a third of the C-STORE handler's
time (docs/measurements.md). The group is a handful of short
Explicit VR Little Endian elements, so it is cheaper written directly; the
tests check the bytes against pydicom's own encoder.

The association's facts travel inside the file, in the attributes PS3.10
defines for them, so a spool file alone is enough to route it::

    (0002,0016) Source AE Title        this router (it wrote the file)
    (0002,0017) Sending AE Title       the peer's calling AE title
    (0002,0018) Receiving AE Title     the AE title the peer called
    (0002,0027) Sending Presentation Address   dicom://IP:PORT of the peer
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from router.kernel.implementation import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from router.kernel.vr import LONG_VRS

PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class Origin:
    """Who sent an instance: the association facts rules can match on."""

    calling_ae_title: str
    called_ae_title: str
    source_ip: str
    source_port: int = 0

    @property
    def address(self) -> str:
        host = f"[{self.source_ip}]" if ":" in self.source_ip else self.source_ip
        return f"dicom://{host}:{self.source_port}"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    tag = struct.pack("<HH", 0x0002, element)
    if vr in LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def encode(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    origin: Origin,
    source_ae_title: str,
) -> bytes:
    """The 128-byte preamble, ``DICM`` and the encoded group 0002 of a spool file."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class_uid.encode("ascii")),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
            _element(0x0016, b"AE", source_ae_title.encode("ascii", "replace")),
            _element(0x0017, b"AE", origin.calling_ae_title.encode("ascii", "replace")),
            _element(0x0018, b"AE", origin.called_ae_title.encode("ascii", "replace")),
            _element(0x0027, b"UR", origin.address.encode("ascii", "replace")),
        )
    )
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def origin_of(file_meta: object) -> Origin:
    """Read the association facts back from a spool file's meta (a pydicom FileMetaDataset)."""
    address = str(getattr(file_meta, "SendingPresentationAddress", "") or "")
    host, port = "", 0
    if address.startswith("dicom://"):
        hostport = address[len("dicom://") :]
        host, _, port_text = hostport.rpartition(":")
        host = host.strip("[]")
        port = int(port_text) if port_text.isdigit() else 0
    return Origin(
        calling_ae_title=str(getattr(file_meta, "SendingApplicationEntityTitle", "") or "").strip(),
        called_ae_title=str(getattr(file_meta, "ReceivingApplicationEntityTitle", "") or "").strip(),
        source_ip=host,
        source_port=port,
    )
