"""DICOMweb destinations end to end: the router sends by STOW-RS (``dicomweb:``) to
Orthanc with its DICOMweb plugin, DCMTK's storescu is the modality, the router
runs as real processes with a real Redis (README, "DICOMweb destinations")."""

from __future__ import annotations

import pydicom
import pytest

from tests import data
from tests.peers import LOOPBACK, Orthanc, storescu_groups, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, router_config

pytestmark = pytest.mark.e2e


def _web_destination(url: str, **extra) -> dict:
    entry = {"dicomweb": {"url": url, **extra.pop("dicomweb", {})},
             "retry": {"max_attempts": 100, "backoff_seconds": [0.5, 1.0], "jitter": 0.1},
             "instance_retry": {"max_attempts": 3, "backoff_seconds": [0.3, 0.6], "jitter": 0.1}}
    entry.update(extra)
    return entry


def _dataset_without_meta(path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    return ds


def test_real_files_of_every_syntax_arrive_with_the_same_uids_and_dataset(tmp_path, redis_url, real_files):
    """Every real file of the test packages that storescu sends as it is goes by STOW-RS
    to Orthanc and is there with its SOP Instance UID and the same data set."""
    orthanc = Orthanc(tmp_path / "orthanc", plugins=True).start()
    try:
        url = f"http://{LOOPBACK}:{orthanc.http_port}/dicom-web"
        config = router_config(tmp_path, {"web": _web_destination(url)}, redis_url=redis_url)
        with RouterProcess(tmp_path, config) as router:
            outcomes, _ = storescu_groups(LOOPBACK, router.port, real_files, called_ae=ROUTER_AE,
                                          calling_ae="MODALITY")
            sent = {data.sop_instance_uid(p): p for p, o in outcomes.items() if o.stored}
            assert len(sent) >= 50, f"only {len(sent)} real files were taken by the router"
            wait_until(lambda: set(sent) <= set(orthanc.sop_instance_uids()), 180,
                       f"the {len(sent)} instances at Orthanc")
        by_uid = orthanc.sop_instance_uids()
        for uid, path in sent.items():
            got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(by_uid[uid])))
            want = pydicom.dcmread(path)
            assert got.SOPInstanceUID == want.SOPInstanceUID
            assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID, path.name
            assert got == want, f"{path.name}: the data set changed on the way"
    finally:
        orthanc.stop()
