"""Transcoding: one spool file re-encoded in a syntax its destination accepts, faithfully.

docs/guarantees.md, "Faithful": transcoding never changes an instance's identity
(its UIDs) nor its pixels beyond what the target syntax implies; byte order
is converted together with the values; lossy input is never re-encoded
lossy; what cannot be transcoded is a dead letter with the reason. So every
result is checked before it leaves: the UIDs are compared, and the result is
parsed back and its pixels decoded and compared, value for value, with
pydicom's decode of the source. Anything that does not hold raises
:class:`PermanentSendError` naming what.

Compressed sources are decoded by pydicom's decoders: JPEG through
imagecodecs (:mod:`workers.decoders`), JPEG-LS through pyjpegls, JPEG 2000
and HTJ2K through pylibjpeg-openjpeg, RLE through pylibjpeg-rle or pydicom.

The targets are a table (:data:`TARGETS`), all lossless: the uncompressed
syntaxes, and RLE, JPEG Lossless SV1, JPEG-LS lossless and JPEG 2000
lossless, whose pixel data is encoded from the decoded (reference) pixels
by pydicom's encoders (pylibjpeg-rle or pydicom's own RLE, pyjpegls,
pylibjpeg-openjpeg; imagecodecs for JPEG Lossless and small JPEG 2000
images, :mod:`workers.encoders`),
encapsulated with a Basic Offset Table, and verified by decoding the result
with pydicom like every other target. What an encoder cannot take (a
Photometric Interpretation or bit depth outside PS3.5 §8.2's tables, Float
Pixel Data) is refused with the reason; the sender then tries the
destination's next accepted preference.

Lossy input (JPEG baseline/extended, JPEG-LS near-lossless, JPEG 2000 or
HTJ2K lossy) is never re-encoded lossy: no lossy target exists. Its decoded
pixels may be re-encoded losslessly, because that is what decompressing it
to explicit little endian already sends, in fewer bytes: the receiver gets
exactly the pixels any uncompressed copy would hold, and the header keeps
saying the image was lossy (PS3.3 §C.7.6.1.1.5: Lossy Image Compression
stays "01" once set; it is set here for a JPEG baseline/extended source,
which is lossy by definition, when the modality left it out). A lossless
target never claims lossy, nor clears what the modality said.

What pydicom 3.0.2 leaves to us, and where it disagrees with the standard:

* ``Dataset.decompress()`` mints a new SOP Instance UID unless told not
  to. Decompression is done here from the decoder's output (one decode,
  whose array is then also the reference for verification).
* pydicom reads OB/OW/OF/OD/OL/OV values as raw bytes and writes them back
  raw: Explicit VR Big Endian written as little endian would keep every
  such value byte-swapped. :func:`_to_little_endian` swaps them by the word
  size of their VR (PS3.5 §7.3), in every sequence item.
* Pixel Data with VR OW is a string of 16-bit words in either byte order
  (PS3.5 2016b §8.1.1: "the byte ordering of the resulting 2-byte words is
  defined by the ... Transfer Syntax"), and OB is never swapped. For pixel
  cells of 8 and 16 bits every reader agrees. For 32- and 64-bit cells
  (RT Dose) they do not: DCMTK swaps 16-bit words, pydicom reads whole
  32-bit big-endian values. The router follows pydicom, whose reading of
  pydicom's own ``rtdose_expb.dcm`` gives exactly the values of its little
  endian twin ``rtdose.dcm`` (DCMTK's gives other numbers), and swaps such
  Pixel Data by Bits Allocated.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_sequence
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.common import PhotometricInterpretation
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MPEGTransferSyntaxes,
    RLELossless,
)
from pydicom.valuerep import VR

from router.kernel.errors import PermanentSendError
from router.kernel.vr import WORD_SIZE
from workers import decoders  # noqa: F401 - adds the JPEG decoding plugin to pydicom's decoders
from workers.encoders import ENCODERS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """How a target transfer syntax encodes the data set (PS3.5 Annex A)."""

    implicit_vr: bool
    deflated: bool = False  # PS3.5 §A.5: the encoded data set is then deflated
    encapsulated: bool = False  # PS3.5 §A.4: Pixel Data compressed, in fragments
    planar_configuration: int = 0
    """What Planar Configuration says of a compressed colour image: 0 for the
    JPEG family (PS3.5 §8.2.1, §8.2.3 as of CP-1843, §8.2.4), 1 for RLE
    (PS3.5 §G.2: one segment per sample)."""


TARGETS: dict[str, Target] = {
    ExplicitVRLittleEndian: Target(implicit_vr=False),
    ImplicitVRLittleEndian: Target(implicit_vr=True),
    DeflatedExplicitVRLittleEndian: Target(implicit_vr=False, deflated=True),
    RLELossless: Target(implicit_vr=False, encapsulated=True, planar_configuration=1),
    JPEGLosslessSV1: Target(implicit_vr=False, encapsulated=True),
    JPEGLSLossless: Target(implicit_vr=False, encapsulated=True),
    JPEG2000Lossless: Target(implicit_vr=False, encapsulated=True),
}

# JPEG's DCT processes are lossy whatever the modality wrote (PS3.5 §8.2.1).
# JPEG-LS near-lossless and JPEG 2000 may hold lossless bitstreams too: for
# those the modality's Lossy Image Compression is left as it said.
ALWAYS_LOSSY = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}
LOSSY = "01"

# MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 (PS3.5 §8.2.5-8.2.8): decoding a
# video to frames is not a change of syntax but a new, far larger object.
VIDEO = frozenset(MPEGTransferSyntaxes)

YBR_FULL = PhotometricInterpretation.YBR_FULL
YBR_FULL_422 = PhotometricInterpretation.YBR_FULL_422

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
PIXEL_DATA = 0x7FE00010
# Extended Offset Table and its lengths (PS3.5 §A.4) describe fragments of
# encapsulated Pixel Data; once it is native they describe nothing.
ENCAPSULATION_TAGS = (0x7FE00001, 0x7FE00002)
UNDEFINED_LENGTH = 0xFFFFFFFF

# VRs whose values pydicom keeps as raw bytes in the byte order of the syntax
# read; the other binary VRs (US, SL, FD, AT...) it reads as numbers.
_WORDS = {vr: size for vr, size in WORD_SIZE.items() if vr.startswith("O")}

# What pydicom and its decoder plugins raise for bytes they cannot read or
# decode (a malformed sequence is an OSError). Anything else (MemoryError)
# is not the instance's fault.
_PYDICOM_ERRORS = (
    InvalidDicomError, BytesLengthException, ValueError, TypeError, KeyError, IndexError,
    AttributeError,
    EOFError, OSError, NotImplementedError, RuntimeError, struct.error, zlib.error,
    UnicodeError, OverflowError,
)

# Level 1 deflates images a third as fast as the default level 6 for a few
# per cent more bytes (measured on the test ultrasounds: 0.35 vs 0.34 of the
# size, 0.9 s vs 1.9 s for 43 MB); a router deflates in the path of delivery.
DEFLATE_LEVEL = 1

_COMPARE_CHUNK = 1 << 24  # values compared at a time (bounds the temporary boolean array)

Where = tuple[int, ...]  # tag, item index, tag, ... down to one element


def transcode(path: Path, source_ts: str, target_ts: str) -> bytes:
    """The data set of ``path`` (without file meta) encoded in ``target_ts``.

    Args:
        path: a spool file (PS3.10 format, with file meta).
        source_ts: its transfer syntax, as read from its file meta.
        target_ts: one of :data:`TARGETS`, not ``source_ts`` itself.

    Returns:
        The encoded data set, ready to travel as a C-STORE's data set.

    Raises:
        PermanentSendError: the file cannot be transcoded faithfully: a video,
            an unreadable file, pixel data pydicom cannot decode, pixel data
            the target's encoder does not take, or a result whose UIDs or
            pixels differ from the source's.
        OSError: the file cannot be read at all.
    """
    source = UID(source_ts)
    target = TARGETS.get(target_ts)
    if target is None:
        raise PermanentSendError(f"no transcoding to {target_ts}")
    if source in VIDEO:
        raise PermanentSendError(f"video ({source.name}) is never transcoded")
    ds = _read(path, source)
    pixels = next((tag for tag in PIXEL_TAGS if tag in ds), None)
    reference: np.ndarray | bytes | None = None
    if pixels is not None and not source.is_compressed and target.encapsulated:
        # Encoded from the decoded values, which are also the reference.
        reference = _decode(ds, source, pixels)
    elif pixels is not None and source == ExplicitVRBigEndian:
        # Decoded before any swapping: pydicom's reading of the source as it is.
        reference = _decode(ds, source, pixels)
    elif pixels is not None and not source.is_compressed:
        # Little endian to little endian leaves the pixel bytes as they are:
        # compare bytes, which also passes on pixel data whose describing
        # attributes pydicom cannot use (badVR.dcm's Number of Frames "1A").
        reference = bytes(ds[pixels].value)
    if source == ExplicitVRBigEndian:
        _to_little_endian(ds, _pixel_word(ds))
    try:
        identity = dict(_uids(ds))  # this reads every value: a malformed one fails here
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"cannot read the data set: {exc}") from exc
    if pixels is not None and source.is_compressed:
        reference = _decompress(ds, source, pixels)
    if source in ALWAYS_LOSSY and ds.get("LossyImageCompression") != LOSSY:
        ds.LossyImageCompression = LOSSY
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = ALWAYS_LOSSY[source]
    if target.encapsulated and isinstance(reference, np.ndarray):  # decoded above, whatever the source
        _encapsulate(ds, reference, UID(target_ts), target, pixels)

    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = target.implicit_vr, True
    try:
        write_dataset(fp, ds)
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"cannot encode in {UID(target_ts).name}: {exc}") from exc
    del ds  # the source's pixel data, if it was replaced, is no longer needed
    encoded = fp.getvalue()
    del fp

    _verify(encoded, UID(target_ts), identity, reference, pixels)
    del reference
    if target.deflated:  # PS3.5 §A.5: raw deflate (RFC 1951), no zlib header
        packer = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        encoded = packer.compress(encoded) + packer.flush()
    log.debug("%s: transcoded %s -> %s", path.name, source, target_ts)
    return encoded


def _read(path: Path, source: UID) -> Dataset:
    """The data set of ``path``, all of it; an OSError opening the file is the caller's.

    pydicom stops quietly at an early end of file: it keeps a value cut
    short, drops an element whose header is cut, and loses the whole data
    set if a sequence is cut. Sending what is left would not be faithful.
    """
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        try:
            ds = dcmread(fp)
        except _PYDICOM_ERRORS as exc:
            raise PermanentSendError(f"cannot read the data set: {exc}") from exc
    found = ds.file_meta.get("TransferSyntaxUID")
    if found != source:
        raise PermanentSendError(f"file meta gives transfer syntax {found}, not {source}")
    if not len(ds):
        raise PermanentSendError("the data set is empty or cut short")
    last = None
    for tag in ds.keys():
        last = ds.get_item(tag)
        if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and last.value is not None \
                and len(last.value) != last.length:
            raise PermanentSendError(f"the data set is cut short in {BaseTag(tag)}")
    # Positions in a deflated file are those of the inflated stream.
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and not source.is_deflated:
        end = last.value_tell + last.length
        if end != size:
            raise PermanentSendError(f"the data set ends at byte {end} of {size}: cut short or followed by stray bytes")
    return ds


def _pixel_word(ds: Dataset) -> int:
    """Bytes per swapped unit of big-endian OW Pixel Data: 2, or 4/8 for 32/64-bit cells (see above)."""
    try:
        bits = int(ds.get("BitsAllocated") or 0)
    except _PYDICOM_ERRORS:
        return 2
    return bits // 8 if bits in (32, 64) else 2


def _to_little_endian(ds: Dataset, pixel_word: int = 2) -> None:
    """Swap, in place, the values pydicom keeps raw, from big to little endian.

    Numbers of the other binary VRs pydicom has read as numbers; they are
    written in the new byte order by themselves.
    A UN value is never swapped (PS3.5 §6.2.2: it is little endian whatever
    the syntax), so it is re-read as little endian if its VR is looked up.

    Raises:
        PermanentSendError: a value pydicom cannot read, or whose bytes are
            not whole words.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.VR == VR.UN and raw.length != UNDEFINED_LENGTH:
            ds[tag] = raw._replace(is_implicit_VR=True, is_little_endian=True)
            continue
        try:
            elem = ds[tag]
        except _PYDICOM_ERRORS as exc:
            raise PermanentSendError(f"{BaseTag(tag)}: unreadable value: {exc}") from exc
        if elem.VR == VR.SQ:
            for item in elem.value:
                _to_little_endian(item)
        elif elem.VR in _WORDS and elem.value:
            size = pixel_word if tag == PIXEL_DATA and elem.VR == VR.OW else _WORDS[elem.VR]
            elem.value = _swapped(elem.value, size, tag)


def _swapped(value: bytes, size: int, tag: int) -> bytes:
    if len(value) % size:
        raise PermanentSendError(
            f"{BaseTag(tag)}: {len(value)} bytes are not whole {size}-byte words; "
            "their byte order cannot be converted")
    return np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def _uids(ds: Dataset, parent: Where = ()) -> Iterator[tuple[Where, str]]:
    """Every UI value in the data set, in every sequence item, by where it is."""
    for elem in ds:
        where = (*parent, elem.tag)
        if elem.VR == VR.SQ:
            for index, item in enumerate(elem.value):
                yield from _uids(item, (*where, index))
        elif elem.VR == VR.UI:
            yield where, _text(elem.value)


def _text(value: object) -> str:
    """A UI value as text, whether pydicom read it as a UI or as UN bytes."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\x00 ")
    if isinstance(value, str):
        return value
    return "\\".join(str(v) for v in value)  # a multi-valued UI


def _decode(ds: Dataset, syntax: UID, tag: int) -> np.ndarray:
    """pydicom's decode of native pixel data, the reference the result must match."""
    try:
        arr, _ = get_decoder(syntax).as_array(ds, as_rgb=False, view_only=True)
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"pydicom cannot decode the {BaseTag(tag)} pixel data: {exc}") from exc
    return arr


def _decompress(ds: Dataset, syntax: UID, tag: int) -> np.ndarray:
    """Replace encapsulated Pixel Data by its native form, as ``Dataset.decompress``
    does but keeping every UID; return the decoded array as the reference.

    The decoded values are kept as they come out of the codec, with no
    colour conversion: a YCbCr image stays YCbCr (a lossless one is then
    identical, a lossy one only decompressed: docs/guarantees.md, "Faithful"). The image
    pixel elements are updated as pydicom's decoder describes its output
    (Photometric Interpretation, Planar Configuration, Number of Frames);
    nothing else changes.

    Raises:
        PermanentSendError: no decoder here for the syntax, decoding fails, or
            a sequence item (an icon) holds encapsulated pixel data too.
    """
    if tag != PIXEL_DATA:
        raise PermanentSendError(f"{BaseTag(tag)} in the encapsulated syntax {syntax.name}")
    nested = _nested_encapsulated(ds)
    if nested:
        raise PermanentSendError(f"{_where(nested)} holds encapsulated pixel data too; it is not decompressed")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise PermanentSendError(f"no decoder for {syntax.name}") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise PermanentSendError(f"no decoder available for {syntax.name}: {missing}")
    try:
        arr, image = decoder.as_array(ds, as_rgb=False)
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"pydicom cannot decode the {syntax.name} pixel data: {exc}") from exc
    pixels = arr.tobytes()
    shape, dtype = arr.shape, arr.dtype
    del arr
    frames = int(image["number_of_frames"])
    if len(pixels) % 2:
        pixels += b"\x00"  # PS3.5 §7.1.1: values have an even length
    elem = ds[PIXEL_DATA]
    elem.value = pixels
    elem.VR = VR.OB if ds.BitsAllocated <= 8 else VR.OW
    elem.is_undefined_length = False
    interpretation = image["photometric_interpretation"]
    if interpretation == YBR_FULL_422:
        # The decoder upsampled the chroma (pydicom decodes to every sample of
        # every pixel); natively, YBR_FULL_422 would mean the subsampled
        # layout of PS3.3 §C.7.6.3.1.2, so these values are YBR_FULL.
        interpretation = YBR_FULL
    ds.PhotometricInterpretation = interpretation
    if int(image["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = image["planar_configuration"]
    if "NumberOfFrames" in ds or frames > 1:
        ds.NumberOfFrames = frames
    for tag in ENCAPSULATION_TAGS:
        if tag in ds:
            del ds[tag]
    return np.frombuffer(pixels, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _encoder(syntax: UID):
    """pydicom's encoder for a compressed target, or ours where pydicom's falls short (workers/encoders.py)."""
    return ENCODERS.get(syntax) or get_encoder(syntax)


def _encapsulate(ds: Dataset, reference: np.ndarray, syntax: UID, target: Target, tag: int | None) -> None:
    """Replace native Pixel Data by its lossless encoding in ``syntax``, keeping every UID.

    ``Dataset.compress`` would mint a new SOP Instance UID by default and
    leaves Planar Configuration as it was; this encodes ``reference`` (the
    decoded pixels: frames x rows x columns x samples, samples interleaved)
    frame by frame and encapsulates the fragments with a Basic Offset Table
    (PS3.5 §A.4), or an Extended Offset Table past 4 GiB of fragments.

    Raises:
        PermanentSendError: Float Pixel Data, or an image the encoder refuses
            (its Photometric Interpretation, bit depth or signedness), naming why.
    """
    if tag != PIXEL_DATA:
        raise PermanentSendError(f"{BaseTag(tag)} has no encapsulated form (PS3.5 §A.4): not encoded in {syntax.name}")
    encoder = _encoder(syntax)
    if not encoder.is_available:
        missing = "; ".join(encoder.missing_dependencies)
        raise PermanentSendError(f"no encoder available for {syntax.name}: {missing}")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if ds.get("PhotometricInterpretation") == YBR_FULL_422:
        # pydicom decodes the subsampled native layout to every sample of
        # every pixel (as _decompress says): these values are YBR_FULL.
        ds.PhotometricInterpretation = YBR_FULL
    try:
        options = {
            "rows": int(ds.Rows), "columns": int(ds.Columns),
            "number_of_frames": int(ds.get("NumberOfFrames") or 1),
            "samples_per_pixel": samples, "bits_allocated": int(ds.BitsAllocated),
            "bits_stored": int(ds.BitsStored), "pixel_representation": int(ds.PixelRepresentation),
            "photometric_interpretation": str(ds.PhotometricInterpretation),
            "planar_configuration": 0,  # the decoded array interleaves the samples
        }
        frames = list(encoder.iter_encode(reference, **options))
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"the {syntax.name} encoder refuses this image: {exc}") from exc
    total = sum(len(frame) + 8 for frame in frames)  # each fragment's item header
    if total > 0xFFFFFFFF:  # a 32-bit Basic Offset Table cannot point past 4 GiB
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    else:
        ds.PixelData = encapsulate(frames, has_bot=True)
    elem = ds[PIXEL_DATA]
    elem.VR = VR.OB  # PS3.5 §A.4: encapsulated Pixel Data is OB of undefined length
    elem.is_undefined_length = True
    if samples > 1:
        ds.PlanarConfiguration = target.planar_configuration


def _nested_encapsulated(ds: Dataset, parent: Where = ()) -> Where | None:
    """Where a sequence item holds encapsulated Pixel Data (an Icon Image Sequence's), if anywhere."""
    for elem in ds:
        if elem.VR != VR.SQ:
            continue
        for index, item in enumerate(elem.value):
            where = (*parent, elem.tag, index)
            inner = item.get(PIXEL_DATA)
            if inner is not None and inner.is_undefined_length:
                return (*where, PIXEL_DATA)
            found = _nested_encapsulated(item, where)
            if found:
                return found
    return None


def _verify(encoded: bytes, syntax: UID, identity: dict[Where, str],
            reference: np.ndarray | bytes | None, pixels: int | None) -> None:
    """Parse the result back; its UIDs and pixels must be the source's.

    A compressed result is decoded by pydicom in its own syntax, so the bytes
    that leave are the ones checked.

    Raises:
        PermanentSendError: the result does not parse, a UID differs, or a
            pixel value differs.
    """
    try:
        result = read_dataset(DicomBytesIO(encoded), TARGETS[syntax].implicit_vr, True)
        uids = {where: _text(_lookup(result, where).value) for where in identity}
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"the transcoded data set does not parse back: {exc}") from exc
    changed = [where for where, uid in identity.items() if uids[where] != uid]
    if changed:
        first = changed[0]
        raise PermanentSendError(
            f"transcoding changed {len(changed)} UID(s), first {_where(first)}: "
            f"{identity[first]} -> {uids[first]}")
    if reference is None or pixels is None:
        return
    if isinstance(reference, bytes):
        if bytes(result[pixels].value) != reference:
            raise PermanentSendError(f"transcoding changed the {BaseTag(pixels)} bytes")
        return
    decodable = ExplicitVRLittleEndian if syntax == DeflatedExplicitVRLittleEndian else syntax  # not yet deflated
    result.file_meta = FileMetaDataset()
    result.file_meta.TransferSyntaxUID = decodable
    try:
        decoded, _ = get_decoder(decodable).as_array(result, as_rgb=False, view_only=True)
    except _PYDICOM_ERRORS as exc:
        raise PermanentSendError(f"the transcoded {BaseTag(pixels)} pixel data does not decode: {exc}") from exc
    difference = _difference(reference, decoded, int(result.get("NumberOfFrames") or 1))
    if difference:
        raise PermanentSendError(
            f"transcoded pixels differ from the source's: {difference} "
            f"(Bits Allocated {result.get('BitsAllocated')}, {result[pixels].VR})")


def _lookup(ds: Dataset, where: Where) -> DataElement:
    for step in range(0, len(where) - 1, 2):
        ds = _items(ds[where[step]])[where[step + 1]]
    return ds[where[-1]]


def _items(elem: DataElement) -> Sequence | list[Dataset]:
    """A sequence's items, also of a private one read back from Implicit VR as UN bytes
    (pydicom knows no VR for it, PS3.5 §6.2.2: it is still an implicit little endian sequence)."""
    if isinstance(elem.value, bytes):
        return read_sequence(DicomBytesIO(elem.value), True, True, len(elem.value), default_encoding)
    return elem.value


def _where(where: Where) -> str:
    return ".".join(
        str(BaseTag(part)) if step % 2 == 0 else f"[{part}]" for step, part in enumerate(where)
    ).replace(".[", "[")


def _difference(reference: np.ndarray, decoded: np.ndarray, frames: int) -> str | None:
    """How two decoded pixel arrays differ, or None if they are equal value for value."""
    if reference.shape != decoded.shape:
        return f"shape {decoded.shape} instead of {reference.shape}"
    flat_ref, flat_new = reference.reshape(-1), decoded.reshape(-1)
    floats = reference.dtype.kind == "f" or decoded.dtype.kind == "f"
    count, first = 0, -1
    for start in range(0, flat_ref.size, _COMPARE_CHUNK):
        a = flat_ref[start : start + _COMPARE_CHUNK]
        b = flat_new[start : start + _COMPARE_CHUNK]
        unequal = a != b
        if floats:
            unequal &= ~(np.isnan(a) & np.isnan(b))
        if unequal.any():
            where = np.flatnonzero(unequal)
            count += where.size
            if first < 0:
                first = start + int(where[0])
    if not count:
        return None
    per_frame = max(flat_ref.size // max(frames, 1), 1)
    return (f"{count} of {flat_ref.size} values, first at index {first} (frame {first // per_frame}): "
            f"{flat_new[first]} instead of {flat_ref[first]}")
