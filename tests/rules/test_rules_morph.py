"""Morph operations: each operator, never mutating the input, deterministic pseudonyms."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from rules.context import MorphContext, SecretMissing
from rules.models import DeidSettings, Rule
from rules.morph import apply

SECRET = b"a-test-secret-of-enough-bytes"
CTX = MorphContext(SECRET)


def ops(*items):
    return Rule.model_validate({"name": "t", "forward": [], "morph": list(items)}).morph


def run(ds, *items, ctx=CTX):
    return apply(ds, ops(*items), ctx)


def test_set_fills_templates_and_creates_attributes(ct):
    """set writes literal and templated values, adding attributes that were absent."""
    out = run(ct, {"set": {"InstitutionName": "Site 1", "StudyDescription": "{Modality} {StudyDescription}"}})
    assert out.InstitutionName == "Site 1"
    assert out.StudyDescription == "CT CT CHEST W/O"


def test_set_hash_filter_gives_stable_pseudonyms(ct, make_ct):
    """{PatientID|hash} is the same for the same patient and different for another."""
    item = {"set": {"PatientName": "SUBJ^{PatientID|hash}"}}
    a, b = run(ct, item), run(make_ct(), item)
    c = run(make_ct(PatientID="OTHER"), item)
    assert str(a.PatientName) == str(b.PatientName) != str(c.PatientName)
    assert "PID001" not in str(a.PatientName)


def test_set_multi_valued_and_private_with_vr(ct):
    """Backslashes separate values; a private attribute by creator needs and gets its VR."""
    out = run(ct, {"set": {"ImageType": "DERIVED\\SECONDARY", '(0041,"MY SITE",01)': {"value": "7", "vr": "LO"}}})
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]
    assert out.private_block(0x0041, "MY SITE")[0x01].value == "7"


def test_delete_paths_masks_and_words(ct):
    """delete takes keywords, sequence paths, (gggg,xxxx) masks, curves, overlays and private."""
    ct.add_new(0x60000010, "US", 512)
    ct.add_new(0x50000005, "US", 1)
    ct.private_block(0x0029, "VENDOR", create=True).add_new(0x01, "LO", "x")
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ReferencedSOPClassUID = CTImageStorage
    ct.ReferencedImageSequence = Sequence([item])
    out = run(ct, {"delete": ["PatientName", "ReferencedImageSequence[*].ReferencedSOPClassUID"]})
    assert "PatientName" not in out
    assert "ReferencedSOPClassUID" not in out.ReferencedImageSequence[0]
    assert "ReferencedSOPInstanceUID" in out.ReferencedImageSequence[0]
    out = run(ct, {"delete": ["(0008,xxxx)"]})
    assert "Modality" not in out and "ReferencedImageSequence" not in out and "PatientID" in out
    out = run(ct, {"delete": ["overlays", "curves", "private"]})
    assert 0x60000010 not in out and 0x50000005 not in out
    assert not any(e.tag.is_private for e in out)


def test_remove_private_keeps_listed_creators(ct):
    """remove_private drops private blocks except those of creators kept on purpose."""
    ct.private_block(0x0019, "KEEP ME", create=True).add_new(0x01, "LO", "dose")
    ct.private_block(0x0021, "DROP ME", create=True).add_new(0x01, "LO", "phi")
    out = run(ct, {"remove_private": {"keep_creators": ["KEEP ME"]}})
    assert out.private_block(0x0019, "KEEP ME")[0x01].value == "dose"
    with pytest.raises(KeyError):
        out.private_block(0x0021, "DROP ME")
    assert not any(e.tag.is_private for e in run(ct, "remove_private"))


def test_copy_regex_prefix_suffix(ct):
    """copy, regex replace, prefix and suffix rewrite values and keep multiplicity."""
    out = run(
        ct,
        {"copy": {"from": "PatientID", "to": "OtherPatientIDs"}},
        {"regex": {"tag": "StudyDescription", "pattern": r"W/O", "replace": "without"}},
        {"prefix": {"ImageType": "X"}},
        {"suffix": {"AccessionNumber": "-R", "StudyDescription": "!"}},
    )
    assert out.OtherPatientIDs == "PID001"
    assert out.StudyDescription == "CT CHEST without!"
    assert list(out.ImageType) == ["XORIGINAL", "XPRIMARY", "XAXIAL"]
    assert "AccessionNumber" not in out  # absent attributes stay absent


def test_uid_remap_is_deterministic_consistent_and_keeps_standard_uids(ct, make_ct):
    """Same UID and secret give the same 2.25 UID in any run; SOP Class UIDs and file meta follow."""
    item = Dataset()
    item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    item.ReferencedSOPClassUID = CTImageStorage
    ct.ReferencedImageSequence = Sequence([item])
    a = run(ct, "uid_remap")
    b = run(copy.deepcopy(ct), "uid_remap", ctx=MorphContext(SECRET))
    other = run(ct, "uid_remap", ctx=MorphContext(b"another-secret-of-enough-bytes"))
    assert a.SOPInstanceUID == b.SOPInstanceUID != other.SOPInstanceUID
    assert a.SOPInstanceUID.startswith("2.25.") and len(a.SOPInstanceUID) <= 64
    assert a.SOPClassUID == CTImageStorage
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert a.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    sibling = make_ct(StudyInstanceUID=ct.StudyInstanceUID)
    assert run(sibling, "uid_remap").StudyInstanceUID == a.StudyInstanceUID


def test_date_shift_is_per_patient_and_keeps_intervals(ct, make_ct):
    """All dates of a patient move by the same days; another patient moves differently."""
    ct.SeriesDate = "20240201"
    ct.AcquisitionDateTime = "20240131101500.000000"
    out = run(ct, {"date_shift": {"max_days": 3650}})
    again = run(make_ct(StudyDate="20240131", SeriesDate="20240201"), {"date_shift": {"max_days": 3650}})
    assert out.StudyDate != "20240131"
    assert (out.StudyDate, out.SeriesDate) == (again.StudyDate, again.SeriesDate)
    assert out.AcquisitionDateTime == out.StudyDate + "101500.000000"
    import datetime as dt

    def day(text):
        return dt.datetime.strptime(text, "%Y%m%d")

    assert (day(out.SeriesDate) - day(out.StudyDate)).days == 1
    others = {run(make_ct(PatientID=f"P{i}"), "date_shift").StudyDate for i in range(8)}
    assert len(others) > 1


def test_secret_operations_fail_clearly_without_a_secret(ct):
    """uid_remap without a configured secret is a SecretMissing, not a silent default."""
    with pytest.raises(SecretMissing, match="DICOM_ROUTER_SECRET"):
        run(ct, "uid_remap", ctx=MorphContext())


def test_secret_comes_from_file_or_environment(tmp_path):
    """deid.secret_file wins over the environment; short secrets are refused."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"from-the-file-0123456789\n")
    ctx = MorphContext.from_settings(DeidSettings(secret_file=secret_file), environ={})
    assert ctx.secret == b"from-the-file-0123456789"
    env = {"DICOM_ROUTER_SECRET": "from-the-environment-0123"}
    assert MorphContext.from_settings(DeidSettings(), environ=env).secret == b"from-the-environment-0123"
    assert MorphContext.from_settings(DeidSettings(), environ={}).secret is None
    with pytest.raises(SecretMissing, match="at least"):
        MorphContext.from_settings(DeidSettings(), environ={"DICOM_ROUTER_SECRET": "short"})


def test_result_saves_as_a_valid_file(ct):
    """The morphed copy writes with enforce_file_format and reads back with matching meta."""
    out = run(ct, "uid_remap", {"set": {"InstitutionName": "X"}})
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID == out.SOPInstanceUID


OPERATIONS = st.sampled_from(
    [
        {"set": {"PatientName": "X^{PatientID|hash}"}},
        {"delete": ["StudyDescription", "private"]},
        "remove_private",
        {"copy": {"from": "PatientID", "to": "OtherPatientIDs"}},
        {"regex": {"tag": "PatientID", "pattern": "[0-9]", "replace": "#"}},
        {"prefix": {"ImageType": "P"}},
        {"suffix": {"StudyDescription": " S"}},
        "uid_remap",
        "date_shift",
        "anonymize",
        {"anonymize": {"options": ["retain-uids", "clean-descriptors"]}},
    ]
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(OPERATIONS, max_size=5))
def test_apply_never_mutates_its_input(ct, items):
    """Whatever operations run, the dataset handed in is unchanged, file meta included."""
    ct.private_block(0x0019, "VENDOR", create=True).add_new(0x01, "LO", "x")
    before = copy.deepcopy(ct)
    run(ct, *items)
    assert ct == before
    assert ct.file_meta == before.file_meta
