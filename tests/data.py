"""Real and generated DICOM test data; nothing is downloaded.

``real_files()`` picks the real images bundled in the pydicom wheel that both
DCMTK ``storescp +xa`` and Orthanc accept, in eleven transfer syntaxes.
``fresh_copies()`` gives them distinct UIDs without touching pixel data.
``ct_series()`` / ``small_series()`` generate realistic CT series quickly.
``dataset_bytes_after_meta()`` is what byte-identity checks compare.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import secrets
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from router.kernel.vr import SHORT_VRS

WHEEL_DATA = Path(pydicom.__file__).parent / "data"

# Color Palette Storage: a palette, not an image; neither storescp nor Orthanc
# accepts it.
COLOR_PALETTE_STORAGE = "1.2.840.10008.5.1.4.39.1"
# JPEG Lossless, Non-Hierarchical (Process 14): storescp +xa does not accept it.
JPEG_LOSSLESS_P14 = "1.2.840.10008.1.2.4.57"

# Files that pass the structural filter below but are broken or odd on
# purpose (pydicom's regression tests); they are not "real images".
EXCLUDED_NAMES = frozenset({
    "bad_sequence.dcm",          # invalid UI value, broken sequence
    "MR_truncated.dcm",          # pixel data cut short
    "badVR.dcm",                 # deliberately wrong VRs
    "explicit_VR-UN.dcm",        # explicit VR file with UN for known elements
    "J2K_pixelrep_mismatch.dcm",  # header and codestream disagree
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    "SC_rgb_jpeg.dcm",           # implicit VR body under an explicit-VR syntax
    "rtdose_rle.dcm",            # gdcmconv wrote every element as UN:
    "rtdose_rle_1frame.dcm",     # DCMTK finds no SOP Class UID in them
})


@contextlib.contextmanager
def _quiet_reading():
    """Silence pydicom's UI value warnings while reading real-world files.

    rtdose*.dcm reference an instance by a UID with a leading-zero component
    ("...9.0123...", invalid per PS3.5 9.1); real data is like that and a
    router must pass it through, so the files stay in the set, quietly.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI",
                                category=UserWarning)
        yield


def _is_real_image(path: Path) -> bool:
    """A file with meta, pixel data and the UIDs a PACS needs to file it."""
    if path.name in EXCLUDED_NAMES or not path.is_file():
        return False
    try:
        with _quiet_reading():
            ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size=256)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not in the set
        return False
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta or "MediaStorageSOPClassUID" not in meta:
        return False
    if str(meta.TransferSyntaxUID) == JPEG_LOSSLESS_P14:
        return False
    if "PixelData" not in ds:
        return False
    # Orthanc answers 0xA700 to an instance without Study/Series Instance UID.
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            return False
    if str(ds.SOPClassUID) == COLOR_PALETTE_STORAGE:
        return False
    return str(ds.SOPClassUID) == str(meta.MediaStorageSOPClassUID)


@functools.cache
def _real_files(include_external: bool) -> tuple[Path, ...]:
    files = {Path(f) for f in pydicom.data.get_testdata_files()}
    if not include_external:
        files = {f for f in files if f.is_relative_to(WHEEL_DATA)}
    return tuple(sorted((f for f in files if _is_real_image(f)),
                        key=lambda p: (p.name, str(p))))


def real_files(include_external: bool = False) -> list[Path]:
    """Real DICOM images that both ``storescp +xa`` and Orthanc store.

    Args:
        include_external: also use the files of the ``pydicom-data``
            package (a test extra): 147 files instead of 83, all checked
            against both peers; default: the pydicom wheel only.

    Returns:
        Paths, sorted by file name.  Several share SOP Instance UIDs (the
        same image in several transfer syntaxes): use ``fresh_copies()``
        when instances must be distinct.
    """
    return list(_real_files(include_external))


def transfer_syntax(path: str | os.PathLike) -> str:
    """Transfer Syntax UID from a file's meta."""
    return str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)


def sop_instance_uid(path: str | os.PathLike) -> str:
    """SOP Instance UID from a file's meta (MediaStorageSOPInstanceUID)."""
    return str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)


def _dcmtk_canonical(ds: Dataset) -> None:
    """Encode ``ds`` the way DCMTK sends it, so storescu sends the file as is.

    storescu parses a file and re-encodes the dataset for the network: it
    writes sequences and items with explicit lengths and drops Data Set
    Trailing Padding (FFFC,FFFC).  A copy already in that form is sent byte
    for byte, which is what lets tests compare sent and received bytes.
    Encapsulated pixel data gets VR OB, as PS3.5 A.4 requires and DCMTK
    sends it (some files say OW); its bytes are left untouched.
    """
    pixel_data = ds["PixelData"] if "PixelData" in ds else None
    if pixel_data is not None and pixel_data.is_undefined_length:
        pixel_data.VR = "OB"

    def visit(item: Dataset) -> None:
        if 0xFFFCFFFC in item:
            del item[0xFFFCFFFC]
        for elem in item:
            if elem.VR == "SQ":
                elem.is_undefined_length = False
                for child in elem.value:
                    child.is_undefined_length_sequence_item = False
                    visit(child)

    visit(ds)


def fresh_copies(files: Iterable[str | os.PathLike], dest_dir: str | os.PathLike,
                 uid_map: dict[str, str] | None = None) -> list[Path]:
    """Copy ``files`` into ``dest_dir`` with new Study/Series/SOP Instance UIDs.

    Pixel data is never decoded: pydicom keeps unread elements as their raw
    encoded bytes and writes them back unchanged, so a compressed file stays
    compressed bit for bit.  Study and Series UIDs are remapped consistently
    (files of one study stay one study); every SOP Instance UID is new.

    Args:
        files: source files (with file meta).
        dest_dir: created if missing.
        uid_map: old -> new Study/Series UIDs, shared across calls if given.

    Returns:
        The copies, in the order of ``files``, named ``NNNN_<source name>``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    uid_map = {} if uid_map is None else uid_map
    return [fresh_copy(src, dest / f"{i:04d}_{Path(src).name}", uid_map)
            for i, src in enumerate(files)]


def fresh_copy(src: str | os.PathLike, target: str | os.PathLike,
               uid_map: dict[str, str], missing_ok: bool = False) -> Path:
    """Copy one file to ``target`` with new Study/Series/SOP Instance UIDs.

    The single-file form of ``fresh_copies`` (same rules: pixel data never
    decoded, Study/Series remapped through ``uid_map``, a new SOP Instance
    UID, DCMTK's canonical encoding).

    Args:
        src: source file (with file meta).
        target: where the copy goes (its folder must exist).
        uid_map: old -> new Study/Series UIDs, updated in place.
        missing_ok: leave an absent Study/Series Instance UID absent
            (real files lack them; a PACS may refuse them, which is what
            a test may want to see) instead of raising KeyError.

    Returns:
        ``target`` as a Path.
    """
    target = Path(target)
    with _quiet_reading():
        ds = pydicom.dcmread(src)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if missing_ok and not ds.get(keyword):
                continue
            old = str(ds[keyword].value)
            ds[keyword].value = uid_map.setdefault(old, fresh_uid_like(old))
        _dcmtk_canonical(ds)
        new_sop = fresh_uid_like(str(ds.SOPInstanceUID))
        ds.SOPInstanceUID = new_sop
        ds.file_meta.MediaStorageSOPInstanceUID = new_sop
        ds.save_as(target, enforce_file_format=False)
    return target


def fresh_uid_like(old: str) -> str:
    """A new SOP Instance UID of the same kind as ``old``.

    A PS3.5 §9.1 UID gets a new one of pydicom's; one that is not (64 hex
    characters in pydicom-data's bad_sequence.dcm) gets a new value of the
    same length from its own characters, so the copy still tests what the
    original did: that the router passes such a UID on as archives do.
    """
    if not old or set(old) <= set("0123456789.") and "" not in old.split("."):
        return generate_uid()
    alphabet = sorted(set(old))
    return "".join(secrets.choice(alphabet) for _ in old)


# -- generated series ---------------------------------------------------------

def _pixel_buffer(side: int) -> bytes:
    """A CT-like 16-bit image: a disc of soft tissue in air, a bright rim."""
    import numpy as np

    y, x = np.ogrid[:side, :side]
    r = np.hypot(x - side / 2, y - side / 2) / (side / 2)
    img = np.where(r < 0.85, 1024 + 40, 24).astype(np.uint16)   # HU +40 / -1000
    img[(r >= 0.78) & (r < 0.85)] = 1024 + 700                     # bone-ish rim
    img += (np.arange(side * side, dtype=np.uint16).reshape(side, side) % 7)
    return img.astype("<u2").tobytes()


def _ct_template(rows: int, cols: int, study_uid: str, series_uid: str,
                 tags: Mapping[str, object]) -> Dataset:
    now = datetime.datetime(2024, 3, 14, 9, 26, 53)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOMROUTER_T"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "DICOM-ROUTER TEST"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST W/O CONTRAST"
    ds.SeriesDescription = "AXIAL 1.0 B30f"
    ds.ManufacturerModelName = "Synthetic"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def ct_series(dest_dir: str | os.PathLike, n: int, size_kib: int = 512,
              study_uid: str | None = None, series_uid: str | None = None,
              tags: Mapping[str, object] | None = None,
              prefix: str = "CT") -> list[Path]:
    """Write an ``n``-instance CT series (Explicit VR LE) into ``dest_dir``.

    Each instance has its own SOP Instance UID, InstanceNumber and slice
    position; all share one pixel buffer (fast: ~1 ms per instance).

    Args:
        dest_dir: created if missing.
        n: number of instances.
        size_kib: pixel data size; 512 gives 512x512x16 bit (~512 KiB files).
        study_uid, series_uid: given UIDs, or new ones.
        tags: header attributes to set or override, by keyword
            (e.g. ``{"PatientID": "RES001", "Modality": "MR"}``).
        prefix: file name prefix (``PREFIX00001.dcm``).

    Returns:
        The files, in instance order.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    side = max(8, int((size_kib * 1024 / 2) ** 0.5) // 2 * 2)
    ds = _ct_template(side, side, study_uid or generate_uid(),
                      series_uid or generate_uid(), dict(tags or {}))
    ds.PixelData = _pixel_buffer(side)
    ds["PixelData"].VR = "OW"
    out = []
    for i in range(1, n + 1):
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = i
        z = -100.0 + i
        ds.ImagePositionPatient = [-179.2, -179.2, z]
        ds.SliceLocation = z
        path = dest / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def small_series(dest_dir: str | os.PathLike, n: int, **kwargs) -> list[Path]:
    """An ``n``-instance CT series of ~9 KiB files (64x64 pixels); see ct_series."""
    kwargs.setdefault("prefix", "SM")
    return ct_series(dest_dir, n, size_kib=8, **kwargs)


# -- byte comparison ----------------------------------------------------------

def _meta_end(raw: bytes) -> tuple[int, str | None]:
    """Offset where the dataset starts after preamble and file meta, and the TS."""
    pos = 132 if raw[128:132] == b"DICM" else 0
    ts = None
    # The file meta group (0002,xxxx) is always Explicit VR Little Endian
    # (PS3.10 7.1); walk it element by element instead of trusting
    # (0002,0000), which writers do not always get right.
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4:pos + 6]
        if vr not in SHORT_VRS:  # the long header form (router/kernel/vr.py)
            length = struct.unpack_from("<I", raw, pos + 8)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", raw, pos + 6)[0]
            header = 8
        if elem == 0x0010:
            ts = raw[pos + header:pos + header + length].rstrip(b"\0 ").decode("ascii")
        pos += header + length
    return pos, ts


def dataset_bytes_after_meta(path_or_bytes: str | os.PathLike | bytes,
                             inflate: bool = True) -> bytes:
    """The encoded dataset that follows the file meta group.

    This is what travelled in the C-STORE: a sender reads it from its file,
    an SCP writes what it received after a meta group of its own (which
    differs: implementation UID, source AE...).  Comparing these bytes
    proves an instance arrived unchanged.

    Args:
        path_or_bytes: a DICOM file, or its content.
        inflate: for Deflated Explicit VR Little Endian, return the inflated
            dataset; two deflaters (pydicom, DCMTK) make different streams
            of the same dataset.

    Returns:
        The dataset bytes.
    """
    raw = (path_or_bytes if isinstance(path_or_bytes, bytes | bytearray)
           else Path(path_or_bytes).read_bytes())
    start, ts = _meta_end(raw)
    body = bytes(raw[start:])
    if inflate and ts == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return body


def byte_mismatches(sent: Iterable[str | os.PathLike],
                    received: Mapping[str, str | os.PathLike | bytes]) -> list[str]:
    """Which sent files did not arrive byte-identical (dataset after the meta).

    Args:
        sent: the files that were sent.
        received: SOP Instance UID -> received file or its bytes (e.g.
            ``StoreSCP.received()``, or Orthanc's ``instance_file``
            contents by UID).

    Returns:
        One line per missing or differing instance; empty when all match.
    """
    problems = []
    for path in sent:
        uid = sop_instance_uid(path)
        if uid not in received:
            problems.append(f"{Path(path).name}: {uid} not received")
        elif dataset_bytes_after_meta(received[uid]) != dataset_bytes_after_meta(path):
            problems.append(f"{Path(path).name}: {uid} differs after the file meta")
    return problems
