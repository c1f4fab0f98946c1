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
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from router.kernel import syntaxes
from router.kernel.errors import MalformedDataset
from router.kernel.uids import UID_MAX
from router.kernel.vr import KNOWN_VRS, SHORT_VRS

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_ACCESSION_NUMBER = 0x00080050
_READ = frozenset({_SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _ACCESSION_NUMBER})
"""Top-level values the walk reads on its way (the rest it only skips)."""
_VR_TEXT = {vr: vr.decode() for vr in KNOWN_VRS}
_raw = tuple.__new__
if RawDataElement._fields[7:] != ("is_raw", "is_buffered"):
    raise ImportError(f"pydicom's RawDataElement has other fields than _header builds: {RawDataElement._fields}")


@dataclass(frozen=True)
class DatasetFacts:
    """What the walk read on its way: the dataset's own identity (PS3.3 C.12.1),
    '' where the dataset does not carry it; and, when asked for, its header."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    identifiers: tuple[str, ...] = ()
    """Its Study and Series Instance UIDs and Accession Number, when the dataset has
    them in plain ASCII: what its history is found by besides the SOP Instance UID."""
    header: Dataset | None = None
    """The elements before Pixel Data, as pydicom reads them (values decoded when
    first used), when :func:`check_dataset` was asked for it."""
    read_header: Callable[[], Dataset] | None = None
    """Builds that header when called, when :func:`check_dataset` was asked for it
    ``lazy``: only routing rules that look at the dataset need it."""


class NeedsWhole(Exception):
    """The walk of a dataset's first bytes (:func:`check_dataset`'s ``length``) needs bytes
    past them: walk the whole dataset instead."""


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool, end: int | None = None) -> None:
        self.data = memoryview(data)
        self.end = len(self.data) if end is None else end
        self.implicit = implicit
        self.prefix = prefix = "<" if little else ">"
        self._explicit = struct.Struct(prefix + "HH2sH").unpack_from
        self._implicit = struct.Struct(prefix + "HHI").unpack_from
        self._long = struct.Struct(prefix + "I").unpack_from
        self.uids: dict[int, str] = {}
        self.top: list[tuple[int, bytes, int, int, int]] | None = None
        """With a header wanted: (tag, VR, length, value offset, end) of each element
        before Pixel Data, outside any item (length -1: undefined)."""
        # The element read before the current one: when a header does not
        # parse, it is usually this element's length that was wrong.
        self.previous: tuple[int, int, bytes, int] | None = None

    def fail(self, offset: int, what: str) -> MalformedDataset:
        where = f"{what} at byte {offset} of {self.end}"
        if self.previous is not None:
            tag, pos, vr, length = self.previous
            kind = f" {vr.decode('ascii', 'replace')}" if vr else ""
            where += f", after{kind} element {_name(tag)} at byte {pos} with a length of {length}"
        return MalformedDataset(where)

    def dataset(self, pos: int, implicit: bool, in_item: bool) -> int:
        """Walk elements from ``pos``; returns the offset after the dataset (or its item).

        Each element's header (tag, VR, short or long length; PS3.5 §7.1) is read
        inline with precompiled structs: this loop runs for every element of
        every instance.
        """
        data, end = self.data, self.end
        explicit_unpack, implicit_unpack, long_unpack = self._explicit, self._implicit, self._long
        top = self.top if not in_item else None
        count = 0
        while pos < end:
            if pos + 8 > end:
                raise self.fail(pos, "element header runs past the end")
            if implicit:
                group, elem, length = implicit_unpack(data, pos)
                vr, pos_value = b"", pos + 8
            else:
                group, elem, vr, length = explicit_unpack(data, pos)
                pos_value = pos + 8
                if group == 0xFFFE:
                    vr, length = b"", long_unpack(data, pos + 4)[0]
                elif vr not in SHORT_VRS:
                    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                        raise self.fail(pos, f"invalid VR {vr!r} for {_name((group << 16) | elem)}")
                    # The long form: every VR of PS3.5 Table 7.1-1, and any VR a later
                    # edition adds (PS3.5 §7.1.2 reserves the short form to the VRs it lists).
                    if pos + 12 > end:
                        raise self.fail(pos, "element header runs past the end")
                    length, pos_value = long_unpack(data, pos + 8)[0], pos + 12
            tag = (group << 16) | elem
            if tag == _ITEM_END:
                if not in_item:
                    raise self.fail(pos, "item delimiter outside an item")
                return pos_value
            self.previous = (tag, pos, vr, length)
            if not in_item and tag in _READ:
                # Enough of an over-long value to differ from any command's UID.
                if pos_value + min(length, UID_MAX + 2) > len(data) and len(data) < end:
                    raise NeedsWhole
                self.uids[tag] = _uid(data[pos_value : pos_value + min(length, UID_MAX + 2)])
            start = pos
            if length != _UNDEFINED:
                pos = pos_value + length
                if pos > end:
                    raise self.fail(pos_value, f"value of {_name(tag)} runs past the end")
            elif implicit or vr in (b"SQ", b"UN") or (vr in (b"OB", b"OW") and tag == _PIXEL_DATA):
                # The items of an undefined-length UN are Implicit VR Little
                # Endian whatever the transfer syntax (PS3.5 §6.2.2).
                pos = self.sequence(pos_value, implicit=implicit or vr == b"UN")
            else:
                raise self.fail(pos, f"undefined length on {vr.decode()} element {_name(tag)}")
            if top is not None and tag < _PIXEL_DATA:
                top.append((tag, vr, -1 if length == _UNDEFINED else length, pos_value, start, pos))
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


def _uid(value: memoryview) -> str:
    return bytes(value).rstrip(b"\x00 ").decode("ascii", "replace")


def check_dataset(data: bytes | memoryview, transfer_syntax: str, header: bool = False,
                  length: int | None = None, lazy: bool = False) -> DatasetFacts:
    """Raise :class:`MalformedDataset` unless ``data`` walks as one whole dataset.

    Args:
        data: the encoded dataset as the peer sent it (no file meta), or its
            first bytes when ``length`` says how long it is.
        transfer_syntax: the presentation context's transfer syntax UID.
        header: also return the elements before Pixel Data as a pydicom
            Dataset, built from what the walk found (the values are copied;
            ``data`` may go away afterwards).
        length: the whole dataset's length, when ``data`` is only its start.
            A dataset whose elements all begin in ``data`` (an uncompressed
            image: the header, then one Pixel Data value that ends the
            dataset) is walked without the rest being read.
        lazy: with ``header``, build it only when ``read_header`` is called
            (``data`` must then stay as it is until then).

    Raises:
        NeedsWhole: ``length`` was given and the walk needs bytes past ``data``
            (encapsulated fragments, a deflated dataset, a long header).

    Returns:
        The SOP Class and SOP Instance UIDs the dataset itself carries, read
        on the way (they sit near its start: no extra pass).
    """
    if length is not None and length <= len(data):
        length = None  # the whole dataset is at hand
    if length is not None and transfer_syntax in syntaxes.DEFLATED:
        raise NeedsWhole
    if transfer_syntax in syntaxes.DEFLATED:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(data)) + inflater.flush()
        except zlib.error as exc:
            raise MalformedDataset(f"deflated dataset does not inflate: {exc}") from exc
        if not inflater.eof:
            raise MalformedDataset("deflated dataset is truncated")
    implicit = syntaxes.is_implicit_vr(transfer_syntax)
    little = syntaxes.is_little_endian(transfer_syntax)
    try:
        return _walk(data, implicit=implicit, little=little, header=header, end=length, lazy=lazy)
    except MalformedDataset:
        if implicit or not little:
            raise
        # Some senders encode Implicit VR under an explicit context; pydicom
        # and most archives read such data, so the router does not refuse it.
        try:
            return _walk(data, implicit=True, little=True, header=header, end=length, lazy=lazy)
        except MalformedDataset:
            pass
        raise


def _walk(data: bytes | memoryview, implicit: bool, little: bool, header: bool = False,
          end: int | None = None, lazy: bool = False) -> DatasetFacts:
    walker = _Walker(data, implicit=implicit, little=little, end=end)
    if header:
        walker.top = []
    try:
        walker.dataset(0, implicit, in_item=False)
    except struct.error:  # an element header past the bytes at hand (within the dataset's length)
        if len(walker.data) < walker.end:
            raise NeedsWhole from None
        raise
    uids = walker.uids
    identifiers = tuple(value for tag in (_STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _ACCESSION_NUMBER)
                        if (value := uids.get(tag, "").strip()) and value.isascii())
    if header and lazy:
        if walker.top and walker.top[-1][5] > len(walker.data):
            raise NeedsWhole  # as _header would: an element before Pixel Data ends past the bytes at hand
        return DatasetFacts(uids.get(_SOP_CLASS_UID, ""), uids.get(_SOP_INSTANCE_UID, ""), identifiers,
                            read_header=lambda: _header(walker, implicit, little))
    return DatasetFacts(uids.get(_SOP_CLASS_UID, ""), uids.get(_SOP_INSTANCE_UID, ""), identifiers,
                        _header(walker, implicit, little) if header else None)


def _header(walker: _Walker, implicit: bool, little: bool) -> Dataset:
    """The walked elements before Pixel Data as pydicom's reader would give them (with
    ``stop_before_pixels``): raw, decoded when first used. An undefined-length
    sequence is read by pydicom's reader at once, as its reader does."""
    data = walker.data
    elements: dict[BaseTag, RawDataElement | object] = {}
    for tag, vr, length, pos_value, start, end in walker.top or ():
        if end > len(data):
            raise NeedsWhole
        key = BaseTag(tag)
        if length < 0:
            nested = read_dataset(BytesIO(bytes(data[start:end])), implicit, little)
            for element in nested.elements():
                elements[key] = element
            continue
        text = _VR_TEXT.get(vr) or (vr.decode() if vr else None)
        # RawDataElement(...) without its namedtuple constructor: half the cost, per element of every instance.
        elements[key] = _raw(RawDataElement, (key, text, length, bytes(data[pos_value:end]), pos_value, implicit,
                                              little, True, False))
    dataset = Dataset(elements)
    dataset.set_original_encoding(implicit, little)
    return dataset


def identity_problem(facts: DatasetFacts, sop_class_uid: str, sop_instance_uid: str) -> str | None:
    """Why the dataset is not the instance its C-STORE-RQ announced, or None.

    PS3.4 §B.2.3: the SCP stores the instance the command names; a dataset
    that says it is another instance, or of another SOP class, would be filed
    under the command's UID with the dataset's content, and a PACS refuses it
    (0xA900). Attributes the dataset lacks are left to the destination.
    """
    if facts.sop_instance_uid and facts.sop_instance_uid != sop_instance_uid:
        return f"dataset SOP Instance UID {facts.sop_instance_uid} differs from the command's {sop_instance_uid}"
    if facts.sop_class_uid and facts.sop_class_uid != sop_class_uid:
        return f"dataset SOP Class UID {facts.sop_class_uid} differs from the command's {sop_class_uid}"
    return None
