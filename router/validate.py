"""Check that received bytes are a whole dataset, without decoding values.

The ingest SCP spools the peer's bytes as they came, so a truncated or
garbled dataset would otherwise only surface in a worker, after the peer was
told Success. This walk reads each element's tag and length (PS3.5 §7.1),
skips the value, descends into undefined-length sequences and encapsulated
pixel data (PS3.5 §7.5, A.4) and fails when anything runs past the end. It
costs tens of microseconds for a CT header; values are never parsed.
"""

from __future__ import annotations

import struct
import zlib

from router.errors import MalformedDataset

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool) -> None:
        self.data = memoryview(data)
        self.end = len(self.data)
        self.implicit = implicit
        self.prefix = "<" if little else ">"

    def fail(self, offset: int, what: str) -> MalformedDataset:
        return MalformedDataset(f"{what} at byte {offset} of {self.end}")

    def tag_length(self, pos: int, implicit: bool) -> tuple[int, int, bytes, int]:
        """(tag, length, VR or b"" when implicit, value offset) of the element at ``pos``."""
        if pos + 8 > self.end:
            raise self.fail(pos, "element header runs past the end")
        group, elem = struct.unpack_from(self.prefix + "HH", self.data, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE or implicit:
            (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 4)
            return tag, length, b"", pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise self.fail(pos, f"invalid VR {vr!r} for {_name(tag)}")
        if vr in _LONG_VRS:
            if pos + 12 > self.end:
                raise self.fail(pos, "element header runs past the end")
            (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 8)
            return tag, length, vr, pos + 12
        (length,) = struct.unpack_from(self.prefix + "H", self.data, pos + 6)
        return tag, length, vr, pos + 8

    def dataset(self, pos: int, implicit: bool, in_item: bool) -> int:
        """Walk elements from ``pos``; returns the offset after the dataset (or its item)."""
        count = 0
        while pos < self.end:
            tag, length, vr, pos_value = self.tag_length(pos, implicit)
            if tag == _ITEM_END:
                if not in_item:
                    raise self.fail(pos, "item delimiter outside an item")
                return pos_value
            if length != _UNDEFINED:
                pos = pos_value + length
                if pos > self.end:
                    raise self.fail(pos_value, f"value of {_name(tag)} runs past the end")
            elif implicit or vr in (b"SQ", b"UN") or (vr in (b"OB", b"OW") and tag == _PIXEL_DATA):
                # The items of an undefined-length UN are Implicit VR Little
                # Endian whatever the transfer syntax (PS3.5 §6.2.2).
                pos = self.sequence(pos_value, implicit=implicit or vr == b"UN")
            else:
                raise self.fail(pos, f"undefined length on {vr.decode()} element {_name(tag)}")
            count += 1
        if in_item:
            raise self.fail(pos, "item without its delimiter")
        if count == 0:
            raise self.fail(pos, "empty dataset")
        return pos

    def sequence(self, pos: int, implicit: bool) -> int:
        """Walk undefined-length items (or pixel data fragments) up to the sequence delimiter."""
        while True:
            if pos + 8 > self.end:
                raise self.fail(pos, "sequence without its delimiter")
            group, elem, length = struct.unpack_from(self.prefix + "HHI", self.data, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise self.fail(pos - 8, f"expected an item, found {_name(tag)}")
            if length == _UNDEFINED:
                pos = self.dataset(pos, implicit, in_item=True)
            else:
                pos += length
                if pos > self.end:
                    raise self.fail(pos - length, "item runs past the end")


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def check_dataset(data: bytes | memoryview, transfer_syntax: str) -> None:
    """Raise :class:`MalformedDataset` unless ``data`` walks as one whole dataset.

    Args:
        data: the encoded dataset as the peer sent it (no file meta).
        transfer_syntax: the presentation context's transfer syntax UID.
    """
    if transfer_syntax == _DEFLATED:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(data)) + inflater.flush()
        except zlib.error as exc:
            raise MalformedDataset(f"deflated dataset does not inflate: {exc}") from exc
        if not inflater.eof:
            raise MalformedDataset("deflated dataset is truncated")
    implicit = transfer_syntax == _IMPLICIT
    try:
        _walk(data, implicit=implicit, little=transfer_syntax != _BIG_ENDIAN)
    except MalformedDataset:
        if implicit or transfer_syntax == _BIG_ENDIAN:
            raise
        # Some senders encode Implicit VR under an explicit context; pydicom
        # and most archives read such data, so the router does not refuse it.
        try:
            _walk(data, implicit=True, little=True)
        except MalformedDataset:
            pass
        else:
            return
        raise


def _walk(data: bytes | memoryview, implicit: bool, little: bool) -> None:
    _Walker(data, implicit=implicit, little=little).dataset(0, implicit, in_item=False)
