"""Video and HTJ2K instances through the router: routed on the header, never refused,
never transcoded.

No package here ships a real video or HTJ2K DICOM file, and nothing here can
encode one, so the instances are generated: a real header (Video Endoscopic
Image Storage, CT Image Storage) around an encapsulated stream of the right
syntax. The router never decodes it. DCMTK's storescu sends the videos as
they are; DCMTK 3.6.7 predates HTJ2K, so pynetdicom sends that one, from
the file, unchanged. Orthanc stores every syntax it is told to accept.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from router.kernel.status import Status
from tests import data
from tests.peers import LOOPBACK, store_as_it_is, storescu
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

VIDEO_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MPEG4 = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264 High Profile / Level 4.1
HEVC = "1.2.840.10008.1.2.4.107"  # HEVC/H.265 Main Profile / Level 5.1
MPEG2 = "1.2.840.10008.1.2.4.100"
HTJ2K = "1.2.840.10008.1.2.4.201"  # High-Throughput JPEG 2000 (Lossless Only)


def _instance(folder: Path, name: str, sop_class: str, syntax: str, frames: int, stream: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "VID001", "Video^Test", "ES" if sop_class != CT_IMAGE else "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 64, 64, 1, 8, 8, 7
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_video_and_htj2k_are_routed_as_they_are_and_never_transcoded(
    tmp_path, redis_url, orthanc_factory, storescp_factory
):
    """MPEG-2, MPEG-4 and HEVC video and an HTJ2K image are accepted by the
    ingest. The videos reach Orthanc byte for byte and are dead letters,
    never transcoded, at a storescp that takes implicit VR only. Orthanc
    1.10.1 takes no HTJ2K, and this stream is not one pydicom can decode: at
    both destinations it is a dead letter saying so, never a wrong image."""
    tmp_path.joinpath("in").mkdir()
    files = [
        _instance(tmp_path / "in", "mpeg4.dcm", VIDEO_ENDOSCOPIC, MPEG4, 30, b"\x00\x00\x00\x01\x67" * 400),
        _instance(tmp_path / "in", "hevc.dcm", VIDEO_ENDOSCOPIC, HEVC, 30, b"\x00\x00\x00\x01\x40" * 400),
        _instance(tmp_path / "in", "mpeg2.dcm", VIDEO_ENDOSCOPIC, MPEG2, 30, b"\x00\x00\x01\xb3" * 500),
        _instance(tmp_path / "in", "htj2k.dcm", CT_IMAGE, HTJ2K, 1, b"\xff\x4f\xff\x51" + b"\x00" * 300),
    ]
    orthanc = orthanc_factory()
    implicit = storescp_factory(ae_title="IMPLICIT", accept="implicit-only")
    config = router_config(tmp_path, {
        "orthanc": destination(orthanc.dicom_port, "ORTHANC"),
        "implicit": destination(implicit.port, "IMPLICIT"),
    }, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        sent = storescu(LOOPBACK, router.port, files[:3], called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 3, sent.stdout[-3000:]
        assert store_as_it_is(LOOPBACK, router.port, files[3], ROUTER_AE) == Status.SUCCESS
        ids = orthanc.wait_for_instances(3, timeout=60)
        stored = {}
        for instance_id in ids:
            raw = orthanc.instance_file(instance_id)
            stored[pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID] = raw
        for path in files[:3]:
            uid = data.sop_instance_uid(path)
            assert data.dataset_bytes_after_meta(stored[uid]) == data.dataset_bytes_after_meta(path), path.name
        implicit_dead = _dead_letters(tmp_path / "spool" / "dead" / "implicit", len(files))
        for path in files[:3]:
            assert "is never transcoded" in implicit_dead[data.sop_instance_uid(path)]
        htj2k = data.sop_instance_uid(files[3])
        assert "pydicom cannot decode the High-Throughput JPEG 2000" in implicit_dead[htj2k]
        assert "pydicom cannot decode" in _dead_letters(tmp_path / "spool" / "dead" / "orthanc", 1)[htj2k]
        assert implicit.files() == [] and orthanc.instance_count() == 3


def _dead_letters(folder: Path, count: int) -> dict[str, str]:
    """SOP Instance UID -> reason of the dead letters in ``folder``, once ``count`` are there."""
    deadline = time.monotonic() + 30
    while len(records := list(folder.glob("*.json"))) < count:
        assert time.monotonic() < deadline, f"{len(records)} of {count} dead letters in {folder}"
        time.sleep(0.1)
    return {(r := json.loads(p.read_text()))["sop_instance_uid"]: r["reason"] for p in records}
