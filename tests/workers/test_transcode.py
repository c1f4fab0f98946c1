"""Faithful transcoding (workers/transcode.py) of every real test file we have.

Every file of pydicom's test set (with pydicom-data's) and of deid-data that
has file meta and pixel data is transcoded to each uncompressed target; the
result must parse in that syntax, keep every UID and decode to exactly what
pydicom decodes from the original. A file pydicom cannot decode must be
refused with a reason. Big endian conversion is checked against a real peer:
DCMTK's ``dcmconv +te``.

Every lossless one (uncompressed, deflated, big endian, RLE, JPEG Lossless
.57/.70, JPEG-LS lossless, JPEG 2000 lossless) is also encoded in each
lossless compressed target: RLE, JPEG Lossless SV1, JPEG-LS lossless and
JPEG 2000 lossless. The result must decode, with pydicom, to the source's
pixels, keep every UID and say the right things in its header; what an
encoder cannot take is refused with a reason listed in
:data:`REFUSED_COMPRESSED`. Rule for time: a source is not encoded in its
own syntax (the sender sends it as it is), and a source whose decoded
pixels exceed :data:`COMPRESSED_LIMIT` bytes is encoded only in RLE
(the fastest encoder); each such pair is named in the test ids as
skipped by rule, never silently.

Decoding without pylibjpeg-libjpeg (GPLv3): every JPEG, JPEG-LS and JPEG 2000
real file that decoded while it was installed (``jpeg_family_decodes.json``,
recorded then) still decodes, to the same values, or for the lossy DCT
processes within two decoders' rounding; and every JPEG process DCMTK's
``dcmcjpeg`` writes decodes, the lossless ones (.57 included) to exactly
their source's pixels.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import warnings
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import deid_data
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
    generate_uid,
)

import workers.transcode
from router.kernel import filemeta
from router.kernel.errors import PermanentSendError
from tests import corpus
from workers.transcode import transcode

# pydicom warns about the real files' invalid values (overlong LO, UIDs that
# are not UIDs); a router passes them through, and so do these tests.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

TARGETS = {ExplicitVRLittleEndian: "explicit-le", ImplicitVRLittleEndian: "implicit-le",
           DeflatedExplicitVRLittleEndian: "deflate"}
PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
DEID_DATA = Path(deid_data.__file__).parent / "data"
DCMCONV = shutil.which("dcmconv")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
ORIGIN = filemeta.Origin("MODALITY", "ROUTER", "127.0.0.1", 104)

# 32-bit pixel cells as OW in big endian: DCMTK swaps 16-bit words, pydicom
# (and the router) whole 32-bit values; each file's little endian twin says
# which values were meant.
LITTLE_ENDIAN_TWIN = {"rtdose_expb.dcm": "rtdose.dcm", "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm"}
REFUSED: dict[str, str] = {}

COMPRESSED = {RLELossless: "rle", JPEGLosslessSV1: "jpeg-lossless", JPEGLSLossless: "jpeg-ls-lossless",
              JPEG2000Lossless: "jpeg-2000-lossless"}
LOSSLESS_SOURCES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                    ExplicitVRBigEndian, RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                    JPEG2000Lossless}
# Decoded bytes above which only the fast encoders are tried: every real file but one
# (a 100 MB multi-frame, ~20 s per slow target) goes through every target.
COMPRESSED_LIMIT = 64 * 1024 * 1024
FAST = (RLELossless,)
# What the encoders refuse, file by file, and why; a new refusal fails the
# test until it is listed here. 32-bit and 1-bit pixels are outside PS3.5
# §8.2's tables for RLE, JPEG and JPEG-LS, and OpenJPEG (both bindings)
# encodes at most 24 bits; CharLS (pyjpegls) fails on a 3x3 colour image.
_BITS_32 = ["SC_rgb_32bit.dcm", "SC_rgb_32bit_2frame.dcm", "SC_rgb_expb_32bit.dcm", "SC_rgb_expb_32bit_2frame.dcm",
            "SC_rgb_rle_32bit.dcm", "SC_rgb_rle_32bit_2frame.dcm", "rtdose.dcm", "rtdose_1frame.dcm",
            "rtdose_expb.dcm", "rtdose_expb_1frame.dcm", "rtdose_rle.dcm", "rtdose_rle_1frame.dcm"]
_BITS_1 = ["liver.dcm", "liver_expb.dcm", "liver_1frame.dcm", "liver_expb_1frame.dcm"]
REFUSED_COMPRESSED: dict[tuple[str, str], str] = {
    **{(name, target): ("must be in the range [1, 24]" if target == JPEG2000Lossless else "Bits Stored: 32")
       for name in _BITS_32 for target in COMPRESSED},
    **{(name, target): "Bits Allocated: 1" for name in _BITS_1 for target in COMPRESSED},
    **{(name, JPEGLSLossless): "destination buffer is too small"
       for name in ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm")},
}

# What pydicom decoded of every JPEG, JPEG-LS and JPEG 2000 real file while
# pylibjpeg-libjpeg (GPLv3) was installed, made by running this module
# (``python -m tests.workers.test_transcode``) before it was removed.
DECODE_RECORD = Path(__file__).with_name("jpeg_family_decodes.json")
JPEG_FAMILY = {*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes}
# The DCT processes are lossy, and two decoders of one image may differ by
# their IDCT's rounding (ITU-T T.83 allows one grey level) and their chroma
# upsampling (not in T.81 at all): libjpeg and libjpeg-turbo differ by at
# most 1, or 3 in upsampled YBR_FULL_422 chroma, and each sample's mean by at
# most 0.032 on the real files. Every other syntax decodes to exact values.
DCT = {JPEGBaseline8Bit, JPEGExtended12Bit}
MEAN_TOLERANCE = 0.1
DCMCJPEG = shutil.which("dcmcjpeg")


@dataclass(frozen=True)
class Source:
    """A real test file: a path, or a member of a zip extracted when first used."""

    label: str
    syntax: str
    path: Path
    member: str = ""


def _quietly_read(path, **kwargs) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kwargs)


def _source(label: str, path: Path) -> Source | None:
    """The file as a Source if it has file meta and pixel data, else None."""
    try:
        ds = _quietly_read(path, defer_size=1024)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None  # not a DICOM file (README, JSON, ICC profile...)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if not syntax or not any(tag in ds for tag in PIXEL_TAGS):
        return None
    return Source(label, str(syntax), path)


def _sources() -> list[Source]:
    found = []
    for name in sorted(pydicom.data.get_testdata_files()):
        path = Path(name)
        package = "pydicom" if path.is_relative_to(PYDICOM_DATA) else "pydicom-data"
        if path.is_file() and (source := _source(f"{package}/{path.name}", path)):
            found.append(source)
    for path in sorted(DEID_DATA.rglob("*.dcm")):
        if source := _source(f"deid/{path.relative_to(DEID_DATA)}", path):
            found.append(source)
    for archive in sorted(DEID_DATA.rglob("*.zip")):
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                if member.endswith(".dcm"):
                    with zipped.open(member) as fp:
                        syntax = _quietly_read(fp, stop_before_pixels=True).file_meta.TransferSyntaxUID
                    found.append(Source(f"deid/{archive.relative_to(DEID_DATA)}!{member}", str(syntax),
                                        archive, member))
    return found


def _big_endian() -> list[Path]:
    """Every Explicit VR Big Endian test file, with pixel data or not (a DICOMDIR)."""
    found = []
    for name in sorted(pydicom.data.get_testdata_files()):
        try:
            syntax = pydicom.filereader.read_file_meta_info(name).get("TransferSyntaxUID")
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if syntax == ExplicitVRBigEndian:
            found.append(Path(name))
    return found


SOURCES = _sources()
BIG_ENDIAN = _big_endian()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """``local(source)``: the source's path on disk, a zip member extracted once."""
    extracted: dict[Source, Path] = {}
    directory = tmp_path_factory.mktemp("unzipped")

    def resolve(source: Source) -> Path:
        if not source.member:
            return source.path
        if source not in extracted:
            with zipfile.ZipFile(source.path) as zipped:
                extracted[source] = Path(zipped.extract(source.member, directory))
        return extracted[source]

    return resolve


@dataclass
class Original:
    """pydicom's reading of a source file: its UIDs and decoded pixels (or why not)."""

    meta: Dataset
    uids: dict
    pixels: np.ndarray | None
    error: Exception | None


@pytest.fixture(scope="module")
def originals():
    """``originals(path)``: pydicom's decode of the file, kept for the three targets in a row."""
    cache: dict[Path, Original] = {}

    def read(path: Path) -> Original:
        if path not in cache:
            cache.clear()  # one file at a time: the largest decodes to 104 MB
            ds = _quietly_read(path)
            try:
                pixels, error = pixel_array(ds, raw=True), None
            except Exception as exc:  # noqa: BLE001 - whatever pydicom raises is the point
                pixels, error = None, exc
            cache[path] = Original(ds.file_meta, _uids(ds), pixels, error)
        return cache[path]

    return read


def _uids(ds: Dataset, parent: tuple = ()) -> dict:
    """Every standard UI value, by where it is (private elements are opaque in Implicit VR)."""
    found = {}
    for tag in ds.keys():
        if tag.is_private:
            continue
        elem = ds[tag]
        where = (*parent, int(tag))
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                found |= _uids(item, (*where, index))
        elif elem.VR == "UI":
            found[where] = str(elem.value) if isinstance(elem.value, str) else tuple(map(str, elem.value))
    return found


def _read_every_value(ds: Dataset, private: bool) -> None:
    """Convert every value (raises if one does not parse); in Implicit VR a private
    value is read with pydicom's guess of its VR, which need not be its creator's."""
    for tag in ds.keys():
        if tag.is_private and not private:
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _read_every_value(item, private)


def _received(encoded: bytes, target: str, meta: Dataset) -> Dataset:
    """What a peer stores: our file meta for ``target`` and the transcoded data set."""
    head = filemeta.encode(str(meta.get("MediaStorageSOPClassUID", "")),
                           str(meta.get("MediaStorageSOPInstanceUID", "")), target, ORIGIN, "ROUTER")
    return _quietly_read(BytesIO(head + encoded))


def _same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _values(ds: Dataset, parent: tuple = ()) -> dict:
    """Every element's VR and value, by where it is, without the retired group
    lengths (gggg,0000) that pydicom drops and DCMTK keeps (PS3.5 §7.2)."""
    found = {}
    for tag in ds.keys():
        if tag.element == 0:
            continue
        elem = ds[tag]
        where = (*parent, int(tag))
        if elem.VR == "SQ":
            found[where] = ("SQ", len(elem.value))
            for index, item in enumerate(elem.value):
                found |= _values(item, (*where, index))
        else:
            value = elem.value
            found[where] = (elem.VR, tuple(value) if isinstance(value, MultiValue) else value)
    return found


def _dcmconv_le(path: Path, directory: Path) -> Dataset:
    out = directory / f"{path.name}.dcmtk-le.dcm"
    done = subprocess.run([DCMCONV, "+te", str(path), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return _quietly_read(out)


# -- every real file -----------------------------------------------------------

@pytest.mark.parametrize(
    ("source", "target"),
    [pytest.param(s, t, id=f"{s.label}->{name}") for s in SOURCES for t, name in TARGETS.items()],
)
def test_real_file_keeps_uids_and_pixels_or_is_refused(source, target, local, originals):
    """A real file becomes ``target`` with the same UIDs and pixels, or a PermanentSendError."""
    path = local(source)
    original = originals(path)
    little_endian_native = not UID(source.syntax).is_compressed and source.syntax != ExplicitVRBigEndian
    if original.error is not None and little_endian_native:
        # Pixels pydicom cannot decode (badVR.dcm: Number of Frames "1A") but
        # that no little endian target changes: they go out byte for byte,
        # unless the data set itself is cut short (MR_truncated.dcm).
        try:
            encoded = transcode(path, source.syntax, target)
        except PermanentSendError as exc:
            assert "cut short" in str(exc)
            return
        got = _received(encoded, target, original.meta)
        assert _uids(got) == original.uids
        assert bytes(got.PixelData) == bytes(_quietly_read(path).PixelData)
        return
    if original.error is not None or path.name in REFUSED:
        with pytest.raises(PermanentSendError) as refused:
            transcode(path, source.syntax, target)
        assert str(refused.value).strip()
        assert REFUSED.get(path.name, "") in str(refused.value)
        return
    got = _received(transcode(path, source.syntax, target), target, original.meta)
    assert got.file_meta.TransferSyntaxUID == target
    _read_every_value(got, private=target != ImplicitVRLittleEndian)
    assert _uids(got) == original.uids
    assert _same_pixels(pixel_array(got, raw=True, view_only=True), original.pixels)


def _compressed_pairs():
    for s in SOURCES:
        if s.syntax not in LOSSLESS_SOURCES:
            continue
        for target, name in COMPRESSED.items():
            if target != s.syntax:
                yield pytest.param(s, target, id=f"{s.label}->{name}")


@pytest.mark.parametrize(("source", "target"), list(_compressed_pairs()))
def test_lossless_file_encodes_in_compressed_target_with_same_pixels_or_is_refused(source, target, local, originals):
    """A lossless real file becomes ``target`` (decoding to the same pixels, same UIDs,
    encapsulated Pixel Data, honest header) or a PermanentSendError with a listed reason."""
    path = local(source)
    original = originals(path)
    if original.pixels is not None and original.pixels.nbytes > COMPRESSED_LIMIT and target not in FAST:
        pytest.skip(f"rule: {original.pixels.nbytes} decoded bytes, only {[t.name for t in FAST]} tried")
    if original.error is not None:  # no target holds pixels pydicom cannot decode (badVR.dcm...)
        with pytest.raises(PermanentSendError, match="cannot decode|cut short"):
            transcode(path, source.syntax, target)
        return
    refusal = REFUSED_COMPRESSED.get((path.name, target))
    if refusal is not None:
        with pytest.raises(PermanentSendError, match="encoder refuses this image") as refused:
            transcode(path, source.syntax, target)
        assert refusal in str(refused.value)
        return
    got = _received(transcode(path, source.syntax, target), target, original.meta)
    assert got.file_meta.TransferSyntaxUID == target
    assert _uids(got) == original.uids
    pixels = next(tag for tag in PIXEL_TAGS if tag in got)
    assert got[pixels].is_undefined_length and got[pixels].VR == "OB"
    assert _same_pixels(pixel_array(got, raw=True), original.pixels)
    if int(got.get("SamplesPerPixel") or 1) > 1:
        assert got.PlanarConfiguration == (1 if target == RLELossless else 0)
    source_ds = _quietly_read(path, stop_before_pixels=True)
    assert got.get("LossyImageCompression") == source_ds.get("LossyImageCompression")


def test_compressed_refusals_are_rare():
    """The encoders take nearly every lossless real file: refusals are the listed few."""
    pairs = sum(1 for _ in _compressed_pairs())
    assert len({name for name, _ in REFUSED_COMPRESSED}) == 18
    assert len(REFUSED_COMPRESSED) <= pairs // 7, (len(REFUSED_COMPRESSED), pairs)


def test_lossy_source_is_reencoded_losslessly_and_still_says_lossy(tmp_path):
    """A JPEG baseline image without Lossy Image Compression goes to RLE with its decoded
    pixels, exactly, and the header now says it was lossy (PS3.3 §C.7.6.1.1.5)."""
    ds = _quietly_read(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod"):
        ds.pop(keyword, None)
    source = tmp_path / "baseline.dcm"
    ds.save_as(source, enforce_file_format=True)
    got = _received(transcode(source, JPEGBaseline8Bit, RLELossless), RLELossless, ds.file_meta)
    assert got.LossyImageCompression == "01" and got.LossyImageCompressionMethod == "ISO_10918_1"
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert _same_pixels(pixel_array(got, raw=True), pixel_array(ds, raw=True))


def test_signed_pixels_survive_every_compressed_target(tmp_path):
    """Signed 16-bit CT values (negative Hounsfield units) come back equal from every target."""
    ds = _quietly_read(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.PixelData = (pixel_array(ds).astype("<i2") - 1024).tobytes()  # air and fat below zero
    path = tmp_path / "signed.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert ds.PixelRepresentation == 1 and pixel_array(ds).min() < 0
    for target in COMPRESSED:
        got = _received(transcode(path, ExplicitVRLittleEndian, target), target, ds.file_meta)
        assert _same_pixels(pixel_array(got, raw=True), pixel_array(ds, raw=True)), target.name


def test_every_source_is_tried():
    """The corpus is the wide one: pydicom's, pydicom-data's and deid-data's files, zips included."""
    labels = [s.label for s in SOURCES]
    assert len(SOURCES) >= 170
    assert sum(label.startswith("deid/") for label in labels) >= 15
    assert any(label.endswith("RGB_CINE.dcm") for label in labels)
    assert len(BIG_ENDIAN) >= 19


# -- decoding without pylibjpeg-libjpeg ----------------------------------------

def _fingerprint(pixels: np.ndarray, samples: int) -> dict:
    """What the decode record keeps of decoded pixels: their exact bytes (a hash) and each sample's mean."""
    means = np.atleast_1d(pixels.mean(axis=tuple(range(pixels.ndim - 1)) if samples > 1 else None, dtype=np.float64))
    return {"shape": list(pixels.shape), "dtype": str(pixels.dtype),
            "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "means": [round(float(m), 4) for m in means]}


def _samples(path: Path) -> int:
    return int(_quietly_read(path, stop_before_pixels=True).get("SamplesPerPixel") or 1)


DECODED_BEFORE: dict[str, dict] = json.loads(DECODE_RECORD.read_text())["files"]


@pytest.mark.parametrize("source", [pytest.param(s, id=s.label) for s in SOURCES
                                    if "sha256" in DECODED_BEFORE.get(s.label, {})])
def test_jpeg_family_file_decodes_as_it_did_with_libjpeg(source, local, originals):
    """A real JPEG, JPEG-LS or JPEG 2000 file that pydicom decoded with pylibjpeg-libjpeg decodes
    now to the same values; a DCT one to the same shape, each sample's mean within rounding."""
    before = DECODED_BEFORE[source.label]
    path = local(source)
    original = originals(path)
    assert original.error is None, f"decoded before, not now: {original.error}"
    now = _fingerprint(original.pixels, _samples(path))
    assert (now["shape"], now["dtype"]) == (before["shape"], before["dtype"])
    if source.syntax in DCT:
        assert np.allclose(now["means"], before["means"], rtol=0, atol=MEAN_TOLERANCE), (now, before)
    else:
        assert now["sha256"] == before["sha256"]


def test_decode_record_covers_every_jpeg_family_source():
    """The record names every real file of the JPEG family, in its syntax; 53 of them decoded."""
    family = {s.label: s.syntax for s in SOURCES if s.syntax in JPEG_FAMILY}
    assert {label: rec["syntax"] for label, rec in DECODED_BEFORE.items()} == family
    assert sum("sha256" in rec for rec in DECODED_BEFORE.values()) == 53
    assert set(family.values()) >= {*DCT, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless}


@pytest.mark.skipif(DCMCJPEG is None, reason="DCMTK dcmcjpeg not installed")
@pytest.mark.parametrize(("name", "option"), [(name, options[0]) for name, tool, options in corpus.CONVERSIONS
                                              if tool == "dcmcjpeg"])
def test_dcmtk_jpeg_decodes_to_its_source_pixels(name, option, tmp_path):
    """Every JPEG process DCMTK writes (.50, .51, .57, .70; grey and colour) decodes: a lossless
    one to exactly its source's pixels, a lossy one within two grey levels of them on average."""
    source = Path(pydicom.data.get_testdata_file(name))
    out = tmp_path / "jpeg.dcm"
    done = subprocess.run([DCMCJPEG, option, str(source), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got, want = pixel_array(_quietly_read(out)), pixel_array(_quietly_read(source))
    assert got.shape == want.shape
    if pydicom.filereader.read_file_meta_info(out).TransferSyntaxUID in DCT:
        assert np.abs(got.astype(np.float64) - want).mean() < 2
    else:
        assert _same_pixels(got, want)


# -- big endian against DCMTK ---------------------------------------------------

@pytest.mark.skipif(DCMCONV is None, reason="DCMTK dcmconv not installed")
@pytest.mark.parametrize("path", [p for p in BIG_ENDIAN if p.name not in LITTLE_ENDIAN_TWIN], ids=lambda p: p.name)
def test_big_endian_file_converts_as_dcmtk_converts_it(path, tmp_path):
    """Big to little endian gives DCMTK's pixel bytes and DCMTK's value for every element, OW palettes included."""
    meta = _quietly_read(path).file_meta
    ours = _received(transcode(path, ExplicitVRBigEndian, ExplicitVRLittleEndian), ExplicitVRLittleEndian, meta)
    theirs = _dcmconv_le(path, tmp_path)
    if "PixelData" in theirs:
        assert ours.PixelData == theirs.PixelData
    assert _values(ours) == _values(theirs)


@pytest.mark.skipif(DCMCONV is None, reason="DCMTK dcmconv not installed")
@pytest.mark.parametrize("name", sorted(LITTLE_ENDIAN_TWIN))
def test_32_bit_big_endian_pixels_get_the_values_of_their_little_endian_twin(name, tmp_path):
    """32-bit OW pixel cells in big endian, where DCMTK and pydicom read different
    numbers: the router's little endian copy holds exactly the values of the
    file's little endian twin (pydicom's reading), not DCMTK's."""
    path = Path(pydicom.data.get_testdata_file(name))
    twin = _quietly_read(Path(pydicom.data.get_testdata_file(LITTLE_ENDIAN_TWIN[name]))).pixel_array
    meta = _quietly_read(path).file_meta
    ours = _received(transcode(path, ExplicitVRBigEndian, ExplicitVRLittleEndian), ExplicitVRLittleEndian, meta)
    assert _same_pixels(ours.pixel_array, twin)
    assert not _same_pixels(_dcmconv_le(path, tmp_path).pixel_array, twin)


@pytest.mark.skipif(DCMCONV is None, reason="DCMTK dcmconv not installed")
def test_nested_private_and_unknown_big_endian_values_match_dcmtk(tmp_path):
    """OW in a sequence item, private OF/OD/OL/OW and UN values convert as DCMTK converts them."""
    ds = _quietly_read(pydicom.data.get_testdata_file("MR_small_bigendian.dcm"))
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.add(DataElement(0x00283006, "OW", np.array([1, 256, 4095, 65535], ">u2").tobytes()))
    ds.ModalityLUTSequence = Sequence([lut])
    ds.add_new(0x00110010, "LO", "ROUTER TEST")
    ds.add_new(0x00111001, "OF", np.array([1.5, -2.25], ">f4").tobytes())
    ds.add_new(0x00111002, "OD", np.array([3.125], ">f8").tobytes())
    ds.add_new(0x00111003, "OL", np.array([0x01020304], ">u4").tobytes())
    ds.add_new(0x00111004, "OW", np.array([0x0102, 0x0304], ">u2").tobytes())
    # PS3.5 §6.2.2: a UN value is little endian in any syntax and never swapped.
    unknown = DataElement(0x00181310, "OB", np.array([0, 64, 64, 0], "<u2").tobytes())
    unknown.VR = "UN"
    ds[0x00181310] = unknown
    source = tmp_path / "nested_be.dcm"
    ds.save_as(source, enforce_file_format=True)
    assert pydicom.filereader.read_file_meta_info(source).TransferSyntaxUID == ExplicitVRBigEndian

    ours = _received(transcode(source, ExplicitVRBigEndian, ExplicitVRLittleEndian),
                     ExplicitVRLittleEndian, ds.file_meta)
    theirs = _dcmconv_le(source, tmp_path)
    assert _values(ours) == _values(theirs)
    assert np.frombuffer(ours.ModalityLUTSequence[0].LUTData, "<u2").tolist() == [1, 256, 4095, 65535]
    assert np.frombuffer(ours[0x00111001].value, "<f4").tolist() == [1.5, -2.25]
    assert list(ours.AcquisitionMatrix) == [0, 64, 64, 0] == list(theirs.AcquisitionMatrix)


# -- refusals and what the verification catches --------------------------------

@pytest.mark.parametrize("syntax", [f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)])
def test_video_is_never_transcoded(syntax):
    """MPEG-2, H.264 and HEVC are dead letters with the reason, whatever the target."""
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    with pytest.raises(PermanentSendError, match=r"video .* is never transcoded"):
        transcode(path, syntax, ExplicitVRLittleEndian)


def test_unknown_target_is_refused():
    """A target without a row in the table is refused, not attempted."""
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    with pytest.raises(PermanentSendError, match="no transcoding to"):
        transcode(path, ExplicitVRLittleEndian, JPEGLSNearLossless)


@pytest.mark.parametrize("keep", [300, 700, 1500, 39106])
def test_cut_short_file_is_refused(keep, tmp_path):
    """A file cut short (in a header, a value or the pixel data) is refused, never sent in part."""
    path = tmp_path / "cut.dcm"
    path.write_bytes(Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()[:keep])
    with pytest.raises(PermanentSendError, match="cut short"):
        transcode(path, ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def test_compressed_source_keeps_its_sop_instance_uid():
    """Decompression keeps every UID (pydicom's decompress() would mint a new SOP Instance UID)."""
    path = Path(pydicom.data.get_testdata_file("SC_rgb_rle.dcm"))
    got = _received(transcode(path, "1.2.840.10008.1.2.5", ExplicitVRLittleEndian),
                    ExplicitVRLittleEndian, _quietly_read(path).file_meta)
    assert got.SOPInstanceUID == _quietly_read(path).SOPInstanceUID


def test_changed_uid_is_refused(monkeypatch):
    """A result whose UID changed on the way is a PermanentSendError naming the element."""
    real = workers.transcode.write_dataset

    def minting(fp, ds):
        ds.SOPInstanceUID = generate_uid()
        return real(fp, ds)

    monkeypatch.setattr(workers.transcode, "write_dataset", minting)
    path = Path(pydicom.data.get_testdata_file("JPEG2000.dcm"))
    with pytest.raises(PermanentSendError, match=r"changed 1 UID\(s\), first \(0008,0018\)"):
        transcode(path, "1.2.840.10008.1.2.4.91", ExplicitVRLittleEndian)


def test_changed_pixel_is_refused(monkeypatch):
    """A result whose pixels differ from pydicom's decode of the source is a PermanentSendError."""
    real = workers.transcode.write_dataset

    def corrupting(fp, ds):
        pixels = bytearray(ds.PixelData)
        pixels[100] ^= 0xFF
        ds.PixelData = bytes(pixels)
        return real(fp, ds)

    monkeypatch.setattr(workers.transcode, "write_dataset", corrupting)
    path = Path(pydicom.data.get_testdata_file("MR_small_bigendian.dcm"))
    with pytest.raises(PermanentSendError, match="pixels differ from the source's: 1 of 4096 values, first at index 50"):
        transcode(path, ExplicitVRBigEndian, ImplicitVRLittleEndian)


def test_uids_in_private_sequence_survive_implicit_vr(tmp_path):
    """A private sequence, opaque to pydicom once in Implicit VR, still has its UIDs checked and kept."""
    ds = _quietly_read(pydicom.data.get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.add_new(0x00290010, "LO", "ROUTER TEST")
    ds.add_new(0x00291001, "SQ", Sequence([item]))
    source = tmp_path / "private_sq.dcm"
    ds.save_as(source, enforce_file_format=True)

    got = _received(transcode(source, ExplicitVRLittleEndian, ImplicitVRLittleEndian),
                    ImplicitVRLittleEndian, ds.file_meta)
    assert b"1.2.3.4.5.6.7" in got[0x00291001].value
    assert got.SOPInstanceUID == ds.SOPInstanceUID


def _record() -> dict:
    """The decode record: what pydicom's pylibjpeg plugin decodes of each JPEG-family real file (with
    pylibjpeg-libjpeg installed, it was the first plugin pydicom tried for each of these syntaxes)."""
    from importlib import metadata

    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in SOURCES:
            if source.syntax not in JPEG_FAMILY:
                continue
            if source.member:
                with zipfile.ZipFile(source.path) as zipped:
                    ds = pydicom.dcmread(BytesIO(zipped.read(source.member)))
            else:
                ds = pydicom.dcmread(source.path)
            try:
                pixels = pixel_array(ds, raw=True, decoding_plugin="pylibjpeg")
            except Exception as exc:  # noqa: BLE001 - whatever pydicom raises is recorded
                files[source.label] = {"syntax": source.syntax, "error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            samples = int(ds.get("SamplesPerPixel") or 1)
            files[source.label] = {"syntax": source.syntax, **_fingerprint(pixels, samples)}
    packages = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls")
    return {"decoded_by": {name: metadata.version(name) for name in packages}, "files": files}


if __name__ == "__main__":
    print(json.dumps(_record(), indent=1))
