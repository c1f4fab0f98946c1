"""The hand-written file meta encoder against pydicom's reader (pure encoding: no peer needed)."""

from __future__ import annotations

from io import BytesIO

import pydicom
from pydicom.filereader import read_file_meta_info

from router.kernel import filemeta


def _origin() -> filemeta.Origin:
    return filemeta.Origin("CT_SCANNER_1", "DICOM_ROUTER", "10.1.2.3", 40123)


def test_encoded_meta_reads_back_with_pydicom(tmp_path):
    """pydicom reads every element the encoder wrote, with the values given."""
    data = filemeta.encode("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", _origin(), "ROUTER")
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.SourceApplicationEntityTitle == "ROUTER"
    assert meta.FileMetaInformationGroupLength == len(data) - 128 - 4 - 12
    assert filemeta.origin_of(meta) == _origin()


def test_spooled_instance_is_a_valid_part10_file():
    """Meta plus the peer's dataset bytes make a file pydicom reads whole."""
    source = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    body = BytesIO()
    source.save_as(body, enforce_file_format=True)
    raw = body.getvalue()
    offset = 132 + 12 + int.from_bytes(raw[140:144], "little")
    data = filemeta.encode(source.SOPClassUID, source.SOPInstanceUID, source.file_meta.TransferSyntaxUID, _origin(), "R")
    ds = pydicom.dcmread(BytesIO(data + raw[offset:]))
    assert ds.PatientName == source.PatientName
    assert ds.PixelData == source.PixelData


def test_ipv6_origin_round_trips(tmp_path):
    """An IPv6 peer address survives the dicom:// URI in (0002,0027)."""
    origin = filemeta.Origin("MR_3", "ROUTER", "::1", 5000)
    path = tmp_path / "x.dcm"
    path.write_bytes(filemeta.encode("1.2", "1.3", "1.2.840.10008.1.2", origin, "R"))
    assert filemeta.origin_of(read_file_meta_info(path)) == origin
