"""The structural dataset check on real files (pure parsing: no peer needed)."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from router.ingest.validate import check_dataset
from router.kernel.errors import MalformedDataset

WHOLE = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "rtplan.dcm",  # nested sequences
    "SC_rgb_jpeg.dcm",  # implicit VR under an explicit syntax: tolerated like pydicom does
]
BROKEN = ["MR_truncated.dcm", "rtplan_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"]


def _body(name: str) -> tuple[bytes, str]:
    path = get_testdata_file(name)
    meta, offset = split_dataset(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(), str(meta.TransferSyntaxUID)


@pytest.mark.parametrize("name", WHOLE)
def test_whole_real_files_pass(name):
    """Real datasets of every kind of encoding walk without error."""
    body, ts = _body(name)
    check_dataset(body, ts)


@pytest.mark.parametrize("name", BROKEN)
def test_truncated_real_files_fail(name):
    """pydicom's own truncated test files are refused."""
    body, ts = _body(name)
    with pytest.raises(MalformedDataset):
        check_dataset(body, ts)


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm"])
def test_a_cut_passes_only_between_top_level_elements(name):
    """Cutting a dataset inside any element (or sequence item) is detected.

    A cut exactly between two top-level elements is a shorter, valid dataset
    (nothing in it says more was meant to follow), so those cuts must pass
    and must be exactly the offsets where a top-level element starts.
    """
    body, ts = _body(name)
    starts = _element_starts(body, ts)
    step = max(1, len(body) // 300)
    passed = []
    for cut in list(range(1, len(body) - 1, step)) + sorted(starts):
        try:
            check_dataset(body[:cut], ts)
        except MalformedDataset:
            continue
        passed.append(cut)
    assert passed, "cuts at element boundaries must pass"
    assert set(passed) <= starts


def _element_starts(body: bytes, ts: str) -> set[int]:
    """Offsets where pydicom's element generator starts each top-level element."""
    fp = BytesIO(body)
    gen = pydicom.filereader.data_element_generator(fp, ts == "1.2.840.10008.1.2", True)
    starts = set()
    while True:
        position = fp.tell()
        try:
            next(gen)
        except StopIteration:
            break
        if position:
            starts.add(position)
    return starts


def test_garbage_and_empty_fail():
    """Bytes that are no dataset at all are refused."""
    for data in (b"", b"\x00", b"hello world, not dicom", b"\xff" * 64):
        with pytest.raises(MalformedDataset):
            check_dataset(data, "1.2.840.10008.1.2.1")


def _encoded(ds: pydicom.Dataset, little: bool = True) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def _with_64_bit_values() -> pydicom.Dataset:
    """A dataset carrying SV, UV and OV elements, as deid-data's ctbrain1.dcm does."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.add_new(0x00191001, "SV", [-1, 2**40])
    ds.add_new(0x00191002, "UV", [2**63])
    ds.add_new(0x00191003, "OV", b"\x01" * 16)
    ds.PatientName = "Anon"
    return ds


@pytest.mark.parametrize("little", [True, False], ids=["little endian", "big endian"])
def test_sv_uv_and_ov_elements_are_read_with_their_long_header(little):
    """SV, UV and OV have the 12-byte header of PS3.5 Table 7.1-1; the walk
    reads them so and finds the dataset's SOP Class and Instance UIDs."""
    syntax = "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"
    facts = check_dataset(_encoded(_with_64_bit_values(), little), syntax)
    assert (facts.sop_class_uid, facts.sop_instance_uid) == ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")


def test_real_files_with_64_bit_vrs_pass():
    """deid-data's ctbrain1.dcm and ctbrain2.dcm (SV, UV, OV elements) walk whole."""
    from pathlib import Path

    import deid_data

    humans = Path(deid_data.__file__).parent / "data" / "humans"
    for name in ("ctbrain1.dcm", "ctbrain2.dcm"):
        meta, offset = split_dataset(humans / name)
        facts = check_dataset((humans / name).read_bytes()[offset:], str(meta.TransferSyntaxUID))
        assert facts.sop_instance_uid == str(meta.MediaStorageSOPInstanceUID)


def test_a_wrong_length_is_blamed_on_the_element_that_carries_it():
    """When a header does not parse, the error names the element before it,
    whose length sent the walk astray, not a tag 8 bytes past it."""
    raw = bytearray(_encoded(_with_64_bit_values()))
    sv = raw.index(b"\x19\x00\x01\x10SV")
    raw[sv + 8 : sv + 12] = (8).to_bytes(4, "little")  # 16 bytes of values, 8 announced
    with pytest.raises(MalformedDataset) as caught:
        check_dataset(bytes(raw), "1.2.840.10008.1.2.1")
    assert f"after SV element (0019,1001) at byte {sv} with a length of 8" in str(caught.value)


def test_the_header_the_walk_builds_is_pydicoms_for_every_real_file():
    """Routing at the ingest decides on the header the walk builds (no second parse): for
    every real file the packages ship (pydicom's, pydicom-data's, deid-data's), each element
    before Pixel Data has the VR and value pydicom's own reader gives, and the identifiers
    the history is found by are those the routing worker reads."""
    from tests import data
    from workers.routing import identifiers

    checked = 0
    for path in data.real_files(include_external=True):
        body, ts = data.dataset_bytes_after_meta(path), data.transfer_syntax(path)
        try:
            facts = check_dataset(body, ts, header=True)
        except MalformedDataset:
            continue  # refused at ingest: never routed there
        expected = pydicom.dcmread(path, stop_before_pixels=True)
        assert {e.tag: (e.VR, e.value) for e in facts.header} == {e.tag: (e.VR, e.value) for e in expected}, path
        assert facts.identifiers == tuple(i for i in identifiers(expected) if i and i.isascii()), path
        checked += 1
    assert checked >= 100


@pytest.mark.parametrize("lazy", [False, True], ids=["header built", "header built when read"])
@pytest.mark.parametrize("head", [64 * 1024, 4096, 256])
def test_walking_the_first_bytes_gives_the_whole_walks_answer_or_asks_for_the_whole(head, lazy):
    """The ingest walks a dataset's first bytes as they arrived (``length``: its whole
    length) before it reads the file: for every real file the packages ship, and for
    each of them cut short, that walk gives the same facts, header and refusal as the
    walk of the whole dataset, or raises NeedsWhole, never another answer. A header
    built only when read (``lazy``: the ingest's, for rules that may not look at it)
    is the same header, and a walk that would need more bytes to build it says so at
    once, not when a rule reads it."""
    from router.ingest.validate import NeedsWhole
    from tests import data

    def outcome(body, ts, length=None, lazy=False):
        try:
            facts = check_dataset(body, ts, header=True, length=length, lazy=lazy)
        except MalformedDataset as exc:
            return "refused", str(exc)
        assert (facts.header is None) == lazy and (facts.read_header is not None) == lazy
        header = {e.tag: (e.VR, e.value) for e in (facts.read_header() if lazy else facts.header)}
        return facts.sop_class_uid, facts.sop_instance_uid, facts.identifiers, header

    from_head = needed_whole = 0
    for path in data.real_files(include_external=True):
        meta, offset = split_dataset(path)
        whole, ts = path.read_bytes()[offset:], str(meta.TransferSyntaxUID)  # as on the wire (deflated stays so)
        for body in (whole, whole[: len(whole) * 2 // 3]):
            try:
                got = outcome(body[:head], ts, length=len(body), lazy=lazy)
            except NeedsWhole:
                needed_whole += 1
                continue
            assert got == outcome(body, ts), (path, len(body))
            from_head += 1
    assert from_head + needed_whole >= 200
    if head == 64 * 1024:
        assert from_head >= 100 and needed_whole >= 10
