"""Fixtures for the rules tests: configs written to disk, datasets built in memory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from rules.facts import AssociationFacts

DESTINATIONS = """\
destinations:
  pacs_main: {ae_title: PACS, host: pacs.example.org, port: 104}
  archive: {ae_title: ARCHIVE, host: 10.0.0.5, port: 104}
  research: {ae_title: RESEARCH, host: 10.1.2.3, port: 11112}
"""


@pytest.fixture
def write_config(tmp_path: Path):
    """Write YAML (dedented) to ``tmp_path/name``; ``destinations`` are prepended unless told not to."""

    def write(text: str, name: str = "router.yaml", with_destinations: bool = True) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = textwrap.dedent(text).lstrip("\n")
        path.write_text((DESTINATIONS if with_destinations else "") + body, encoding="utf-8")
        return path

    return write


def make_ct(**attrs: object) -> Dataset:
    """A small CT header with file meta; keyword arguments override or add attributes."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Doe^John"
    ds.PatientID = "PID001"
    ds.StudyDescription = "CT CHEST W/O"
    ds.StudyDate = "20240131"
    ds.StudyTime = "081500"
    ds.SeriesNumber = 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture
def ct() -> Dataset:
    return make_ct()


@pytest.fixture
def facts() -> AssociationFacts:
    return AssociationFacts("CT_SCANNER_1", "DICOM_ROUTER", "10.0.0.17")


@pytest.fixture(name="make_ct")
def make_ct_fixture():
    """The :func:`make_ct` builder, for tests that need several datasets."""
    return make_ct
