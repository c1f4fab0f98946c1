"""De-identification end to end: one study, two destinations, real peers.

DCMTK's storescu sends a two-series CT study to the router (``dicom-router
run``); the rules send every instance untouched to a storescp (the PACS) and
through ``anonymize: {profile: basic}`` to an Orthanc (research). Orthanc's
REST API shows what research received.
"""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from rules.pseudonyms import remap_uid
from tests import data
from tests.peers import LOOPBACK, storescu
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

SECRET = "e2e-research-secret-0123456789abcdef"
SECRET_ENV = "DICOM_ROUTER_E2E_DEID_SECRET"
IDENTIFYING = {
    "PatientName": "Test^Patient",
    "PatientID": "PID0001",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC0001",
    "ReferringPhysicianName": "Referrer^Rita",
    "InstitutionName": "Test Hospital",
    "StationName": "CT01",
    "StudyDate": "20240314",
}


def _study(ct_series) -> list:
    """Two series of one study sharing a frame of reference; series 2 references an image of series 1."""
    study_uid, frame_uid = generate_uid(), generate_uid()
    first = ct_series(3, size_kib=16, study_uid=study_uid, tags={"FrameOfReferenceUID": frame_uid})
    ref = Dataset()
    ref.ReferencedSOPClassUID = pydicom.dcmread(first[0], stop_before_pixels=True).SOPClassUID
    ref.ReferencedSOPInstanceUID = data.sop_instance_uid(first[0])
    second = ct_series(
        3, size_kib=16, study_uid=study_uid, prefix="LOC",
        tags={"FrameOfReferenceUID": frame_uid, "ReferencedImageSequence": Sequence([ref]), "SeriesNumber": 3},
    )
    return first + second


def test_a_study_reaches_research_as_one_deidentified_study_and_the_pacs_unchanged(
    tmp_path, monkeypatch, redis_url, storescp_factory, orthanc_factory, ct_series
):
    """Basic Profile copy in Orthanc: one study, identifiers gone, UIDs remapped consistently, pixels kept; storescp copy byte-identical."""
    files = _study(ct_series)
    originals = {data.sop_instance_uid(p): pydicom.dcmread(p) for p in files}
    pacs = storescp_factory(ae_title="PACS")
    research = orthanc_factory(ae_title="RESEARCH")
    monkeypatch.setenv(SECRET_ENV, SECRET)  # inherited by the router's processes
    config = router_config(
        tmp_path,
        {"pacs": destination(pacs.port, "PACS"), "research": destination(research.dicom_port, "RESEARCH")},
        rules=[
            {"name": "archive as received", "forward": ["pacs"]},
            {"name": "research copy", "morph": [{"anonymize": {"profile": "basic"}}], "forward": ["research"]},
        ],
        redis_url=redis_url,
    )
    config["deid"] = {"secret_env": SECRET_ENV}
    with RouterProcess(tmp_path, config) as router:
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="MODALITY")
        assert sent.returncode == 0, sent.stdout[-3000:]

        # The PACS copy: every dataset exactly as sent.
        pacs.wait_for_files(len(files), timeout=60)
        received = pacs.received()
        assert received.keys() == originals.keys()
        for path in files:
            uid = data.sop_instance_uid(path)
            assert data.dataset_bytes_after_meta(received[uid]) == data.dataset_bytes_after_meta(path), uid

        # The research copy, as Orthanc filed it.
        ids = research.wait_for_instances(len(files), timeout=60)
        assert len(ids) == len(files)
        studies = research.rest("/studies")
        assert len(studies) == 1, studies
        assert len(research.rest(f"/studies/{studies[0]}/instances")) == len(files)
        assert len(research.rest(f"/studies/{studies[0]}")["Series"]) == 2

    key = SECRET.encode()
    by_new_sop = {}
    for instance_id in ids:
        tags = research.instance_tags(instance_id)
        for keyword, value in IDENTIFYING.items():
            assert tags.get(keyword) in (None, "") or value not in tags[keyword], (keyword, tags.get(keyword))
        assert tags["PatientIdentityRemoved"] == "YES"
        stored = pydicom.dcmread(io.BytesIO(research.instance_file(instance_id)))
        by_new_sop[stored.SOPInstanceUID] = stored
    assert set(by_new_sop) == {remap_uid(key, uid) for uid in originals}
    for old_sop, before in originals.items():
        after = by_new_sop[remap_uid(key, old_sop)]
        assert after.StudyInstanceUID == remap_uid(key, before.StudyInstanceUID) != before.StudyInstanceUID
        assert after.SeriesInstanceUID == remap_uid(key, before.SeriesInstanceUID) != before.SeriesInstanceUID
        assert after.FrameOfReferenceUID == remap_uid(key, before.FrameOfReferenceUID)
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.SOPClassUID == before.SOPClassUID
        assert after.PixelData == before.PixelData
        if "ReferencedImageSequence" in before:
            # The reference still resolves, to the remapped instance that research holds.
            target = after.ReferencedImageSequence[0].ReferencedSOPInstanceUID
            assert target == remap_uid(key, before.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
            assert target in by_new_sop
    assert len({o.PatientID for o in by_new_sop.values()}) == 1  # one pseudonymous patient
    assert len({o.SeriesInstanceUID for o in by_new_sop.values()}) == 2
