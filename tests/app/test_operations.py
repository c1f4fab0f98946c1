"""Operations shared by the CLI and the API, below both.

No peer is involved: what is tested here reads spool files on disk (the API
and CLI over real Redis and peers are tests/app/test_dashboard_api.py and
tests/test_metrics_e2e.py)."""

from __future__ import annotations

import os

import pydicom

from router.operations import study_instance_uid
from tests import data


def test_a_files_study_is_read_again_only_when_the_file_changed(tmp_path):
    """The dead-letter list asks every few seconds: the answer is kept per file, and a
    file written anew (another size or time) is read anew; a file gone has none."""
    path = data.small_series(tmp_path / "series", 1)[0]
    first = study_instance_uid(path)
    assert first == str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    assert study_instance_uid(path) == first

    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    ds.save_as(path)
    facts = path.stat()
    os.utime(path, ns=(facts.st_atime_ns, facts.st_mtime_ns + 1_000_000))
    assert study_instance_uid(path) == "1.2.826.0.1.3680043.8.498.7"

    path.unlink()
    assert study_instance_uid(path) is None
    path.write_bytes(b"not DICOM")
    assert study_instance_uid(path) is None
