"""De-identification on real files: the PS3.15 Annex E Basic Profile and its options.

Files come from the pydicom wheel's bundled test data and the deid-data
package: real scanner headers with private groups, sequences and studies of
several instances.
"""

from __future__ import annotations

import collections
import io
from pathlib import Path

import deid_data
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from rules.annex_e import BASIC_EDITION, profile_table
from rules.context import MorphContext
from rules.models import Rule
from rules.morph import apply, element_text, walk
from rules.pseudonyms import is_registered_uid

CTX = MorphContext(b"research-site-secret-0123456789")
DEID_DATA = Path(deid_data.__file__).parent / "data"
REAL_FILES = [
    get_testdata_file("CT_small.dcm"),
    get_testdata_file("MR_small.dcm"),
    get_testdata_file("SC_rgb.dcm"),
    get_testdata_file("rtplan.dcm"),
    str(DEID_DATA / "humans" / "ctbrain1.dcm"),
    str(DEID_DATA / "ultrasounds" / "RGB_IMAGE.dcm"),
    str(DEID_DATA / "dicom-cookies" / "image1.dcm"),
]


def anonymize(ds, **spec):
    morph = Rule.model_validate({"name": "t", "forward": [], "morph": [{"anonymize": spec}]}).morph
    return apply(ds, morph, CTX)


def listed_tags() -> set[int]:
    """Tags Table E.1-1 lists with an action that changes the value (not K)."""
    return {tag for tag, row in profile_table().exact.items() if row.basic != "K"}


def test_table_is_the_standards_with_its_edition():
    """The action table is PS3.15 Table E.1-1 from the installed packages, edition named, option columns present."""
    table = profile_table()
    assert table.edition == BASIC_EDITION == "DICOM PS3.15 2026c"
    assert len(table.exact) > 600 and len(table.masks) == 3
    rows = [*table.exact.values(), *(row for *_, row in table.masks), table.private]
    assert {r.basic for r in rows} <= {"X", "Z", "D", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
    assert {a for r in rows for a in r.options.values()} <= {"K", "C", "X"}
    assert table.row(0x00100010).basic == "Z"  # Patient's Name
    study_uid = table.row(0x0020000D)
    assert study_uid.basic == "U" and study_uid.options["retain-uids"] == "K"
    study_date = table.row(0x00080020)
    assert study_date.basic == "Z" and study_date.options["retain-longitudinal-modified-dates"] == "C"
    assert table.row(0x00180020) is None  # Scanning Sequence: not in the table, kept
    assert table.row(0x00101010).options["retain-patient-characteristics"] == "K"  # Patient's Age
    assert table.row(0x60023000).tag == "(60xx,3000)" and table.row(0x60023000).options == {"clean-graphics": "C"}
    assert table.row(0x00291010) is table.private and table.private.options == {"retain-safe-private": "C"}


def test_attributes_newer_than_the_option_data_get_the_derived_options():
    """An attribute the 2020 option extraction lacks: U keeps under retain-uids, a DA/DT/TM under the date options."""
    table = profile_table()
    instance_creation_date = table.row(0x00080012)  # added to Table E.1-1 after 2020
    assert instance_creation_date.basic == "X/D"
    assert instance_creation_date.options == {
        "retain-longitudinal-full-dates": "K",
        "retain-longitudinal-modified-dates": "C",
    }
    assert table.row(0x00080017).options == {"retain-uids": "K"}  # Acquisition UID


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: Path(p).name)
def test_basic_profile_leaves_no_listed_attribute_with_its_value(path):
    """After anonymize: basic, no attribute Table E.1-1 lists (D/Z/X/U) keeps its original value, anywhere."""
    ds = pydicom.dcmread(path)
    listed = listed_tags()
    original = collections.defaultdict(set)
    for _, elem in walk(ds):
        if int(elem.tag) in listed and elem.VR != "SQ" and element_text(elem):
            original[int(elem.tag)].add(element_text(elem))
    out = anonymize(ds)
    for _, elem in walk(out):
        tag = int(elem.tag)
        assert not elem.tag.is_private, f"private {elem.tag} survived"
        if tag in original and elem.VR != "SQ":
            text = element_text(elem)
            if elem.VR == "UI" and is_registered_uid(text):
                continue
            assert not text or text not in original[tag], f"{elem.tag} {elem.keyword} kept {text!r}"
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: Path(p).name)
def test_pixel_data_is_untouched_and_the_file_is_valid(path):
    """The pixel bytes are identical and the result saves and reads back with consistent meta."""
    ds = pydicom.dcmread(path)
    out = anonymize(ds)
    if "PixelData" in ds:
        assert out.PixelData == ds.PixelData
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID != ds.SOPInstanceUID
    if "PixelData" in ds:
        assert back.PixelData == ds.PixelData


def _studies() -> list[list[str]]:
    by_study = collections.defaultdict(list)
    for f in get_testdata_files("dicomdirtests/*/*/*") + get_testdata_files("dicomdirtests/*/*/*/*"):
        try:
            by_study[pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID].append(f)
        except (pydicom.errors.InvalidDicomError, AttributeError, IsADirectoryError):
            continue
    return sorted(by_study.values(), key=len, reverse=True)


STUDIES = {"pydicom MR study": _studies()[0], "pydicom CT study": _studies()[1]}


@pytest.mark.parametrize("name", STUDIES)
def test_a_study_stays_one_study_with_consistent_uids_and_references(name):
    """Every instance anonymized separately still forms one study: series, frames of reference and references agree."""
    files = STUDIES[name]
    assert len(files) >= 2
    originals = [pydicom.dcmread(f) for f in files]
    outputs = [anonymize(ds) for ds in originals]
    assert len({o.StudyInstanceUID for o in outputs}) == 1
    assert outputs[0].StudyInstanceUID != originals[0].StudyInstanceUID
    series = {}
    for before, after in zip(originals, outputs):
        assert series.setdefault(before.SeriesInstanceUID, after.SeriesInstanceUID) == after.SeriesInstanceUID
    assert len(set(series.values())) == len(series)
    assert len({o.SOPInstanceUID for o in outputs}) == len(outputs)
    assert len({o.PatientID for o in outputs}) == len({o.PatientID for o in originals})

    def uids(datasets):
        return {element_text(e) for ds in datasets for _, e in walk(ds) if e.VR == "UI" and e.value}

    before_uids, after_uids = uids(originals), uids(outputs)
    assert not {u for u in before_uids & after_uids if not is_registered_uid(u)}
    # a reference that pointed inside the set still does, to the remapped instance
    old_sops = {o.SOPInstanceUID for o in originals}
    new_sops = {o.SOPInstanceUID for o in outputs}

    def internal_refs(datasets, sops):
        return sorted(
            element_text(e) in sops for ds in datasets for _, e in walk(ds) if e.keyword == "ReferencedSOPInstanceUID"
        )

    assert internal_refs(originals, old_sops) == internal_refs(outputs, new_sops)


def test_options_keep_what_they_promise(make_ct):
    """Each option keeps its category; without it the Basic Profile removes it."""
    ds = make_ct(PatientSex="F", PatientAge="045Y", StationName="CT01", InstitutionName="General Hospital")
    basic = anonymize(ds)
    assert not basic.StudyDate and not basic.PatientSex and "PatientAge" not in basic
    assert basic.StudyInstanceUID != ds.StudyInstanceUID and basic.StationName != "CT01"
    out = anonymize(ds, options=["retain-uids", "retain-longitudinal-dates", "retain-patient-characteristics",
                                 "retain-device-identity", "retain-institution-identity"])
    assert out.StudyInstanceUID == ds.StudyInstanceUID and out.SOPInstanceUID == ds.SOPInstanceUID
    assert out.StudyDate == "20240131" and out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert (out.PatientSex, out.PatientAge) == ("F", "045Y")
    assert out.StationName == "CT01" and out.InstitutionName == "General Hospital"
    assert str(out.PatientName) == "" and out.PatientID != "PID001"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113110", "113106", "113108", "113109", "113112"]


def test_modified_dates_shift_a_patient_consistently(make_ct):
    """retain-longitudinal-modified-dates shifts dates by one per-patient offset, times kept."""
    a = anonymize(make_ct(StudyDate="20240131"), options=["retain-longitudinal-modified-dates"])
    b = anonymize(make_ct(StudyDate="20240301"), options=["retain-longitudinal-modified-dates"])
    assert a.StudyDate not in ("", "20240131") and a.StudyTime == "081500"
    import datetime as dt

    def day(text):
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))

    assert (day(b.StudyDate) - day(a.StudyDate)).days == (dt.date(2024, 3, 1) - dt.date(2024, 1, 31)).days
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_clean_descriptors_keeps_text_without_the_identifiers(make_ct):
    """Clean Descriptors keeps a description but removes the patient's name and ID from it."""
    ds = make_ct(StudyDescription="CT chest for Doe PID001 follow-up")
    assert "StudyDescription" not in anonymize(ds)
    out = anonymize(ds, options=["clean-descriptors"])
    assert out.StudyDescription == "CT chest for follow-up"


def test_keep_list_overrides_the_profile(make_ct):
    """keep: names attributes the site has decided to leave as they are."""
    out = anonymize(make_ct(PatientSex="M"), keep=["PatientSex", "StudyDescription"])
    assert out.PatientSex == "M" and out.StudyDescription == "CT CHEST W/O"
