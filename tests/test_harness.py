"""The test harness itself, proven against the real peers (no router involved)."""

from __future__ import annotations

import collections
import os

import pydicom
import pytest

from tests import data, peers

pytestmark = pytest.mark.e2e

# Transfer syntaxes real_files() must cover: what the ingest accepts (docs/ingest.md).
EXPECTED_SYNTAXES = {
    "1.2.840.10008.1.2",       # implicit VR LE
    "1.2.840.10008.1.2.1",     # explicit VR LE
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR LE
    "1.2.840.10008.1.2.2",     # explicit VR BE
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE lossless
}


def test_real_files_span_the_common_transfer_syntaxes(real_files):
    """real_files() covers uncompressed, deflate, JPEG, JPEG-LS, JPEG 2000 and RLE."""
    syntaxes = collections.Counter(data.transfer_syntax(f) for f in real_files)
    assert EXPECTED_SYNTAXES <= set(syntaxes), syntaxes
    assert len(real_files) >= 50


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_fresh_copies_get_distinct_uids_and_keep_pixel_bytes(tmp):
    """fresh_copies() gives every copy a new SOP Instance UID and leaves pixel data bytes alone."""
    originals = data.real_files()
    copies = data.fresh_copies(originals, tmp)
    uids = [data.sop_instance_uid(c) for c in copies]
    assert len(set(uids)) == len(copies)
    assert not set(uids) & {data.sop_instance_uid(o) for o in originals}
    for original, copy in zip(originals, copies):
        before, after = pydicom.dcmread(original), pydicom.dcmread(copy)
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        assert after["PixelData"].value == before["PixelData"].value, copy.name
        assert after.SOPInstanceUID == after.file_meta.MediaStorageSOPInstanceUID


def test_ct_series_is_a_realistic_ct_series(ct_series):
    """ct_series() writes distinct CT instances of one series, ~512 KiB each."""
    files = ct_series(5, study_uid="1.2.3.4", tags={"PatientID": "RES001"})
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.SOPClassUID for ds in datasets} == {pydicom.uid.CTImageStorage}
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.4"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4, 5]
    assert {ds.PatientID for ds in datasets} == {"RES001"}
    assert datasets[0].pixel_array.shape == (512, 512)
    assert 512 * 1024 <= files[0].stat().st_size < 520 * 1024


def test_small_series_instances_are_about_9_kib(small_series):
    """small_series() writes ~9 KiB instances."""
    files = small_series(3)
    assert all(8 * 1024 < f.stat().st_size < 10 * 1024 for f in files)


def test_storescu_carries_all_real_files_to_storescp_on_one_association(
        storescp_factory, real_files):
    """storescu -> storescp +xa: every real file arrives on one association, dataset bytes identical."""
    scp = storescp_factory(ae_title="DEST1")
    result = peers.storescu("127.0.0.1", scp.port, real_files, called_ae="DEST1")
    assert result.returncode == 0, result.stdout
    scp.wait_for_files(len(real_files))
    received = scp.received()
    assert scp.association_count() == 1
    assert len(received) == len(real_files)
    assert data.byte_mismatches(real_files, received) == []
    for sent in real_files:
        got = received[data.sop_instance_uid(sent)]
        assert data.transfer_syntax(got) == data.transfer_syntax(sent), sent.name


def test_storescu_carries_all_real_files_to_orthanc(orthanc_factory, real_files):
    """storescu -> Orthanc: /instances counts every real file and each stored file matches after the meta."""
    orthanc = orthanc_factory()
    result = peers.storescu("127.0.0.1", orthanc.dicom_port, real_files,
                            called_ae=orthanc.ae_title)
    assert result.returncode == 0, result.stdout
    orthanc.wait_for_instances(len(real_files))
    assert len(orthanc.instances()) == len(real_files)
    stored = orthanc.sop_instance_uids()
    files = {uid: orthanc.instance_file(instance_id) for uid, instance_id in stored.items()}
    assert data.byte_mismatches(real_files, files) == []
    for sent in real_files:
        instance_id = stored[data.sop_instance_uid(sent)]
        assert (orthanc.instance_metadata(instance_id, "TransferSyntax")
                == data.transfer_syntax(sent)), sent.name


def test_storescp_fork_counts_one_association_per_sender(storescp_factory, small_series):
    """storescp --fork logs one association per storescu run, and files() lists only completed files."""
    scp = storescp_factory(fork=True)
    files = small_series(9)
    for batch in (files[:3], files[3:6], files[6:]):
        result = peers.storescu("127.0.0.1", scp.port, batch)
        assert result.returncode == 0, result.stdout
    assert len(scp.wait_for_files(9)) == 9
    assert scp.association_count() == 3
    assert scp.store_request_count() == 9


def test_implicit_only_storescp_refuses_explicit_syntax(storescp_factory, small_series):
    """storescp accept='implicit-only' refuses an explicit VR LE context, so nothing arrives."""
    scp = storescp_factory(accept="implicit-only")
    result = peers.storescu("127.0.0.1", scp.port, small_series(1))
    assert result.returncode != 0
    assert "no acceptable presentation contexts" in result.stdout.lower()
    assert scp.files() == []


def test_echoscu_reaches_storescp(storescp_factory):
    """echoscu gets a C-ECHO success from storescp; a refusing storescp fails it."""
    assert peers.echoscu("127.0.0.1", storescp_factory().port).returncode == 0
    refusing = storescp_factory(extra_args=["--refuse"])
    assert peers.echoscu("127.0.0.1", refusing.port).returncode != 0


def test_storescp_stop_leaves_no_process(storescp_factory):
    """StoreSCP.stop() ends the process it started and reaps it."""
    scp = storescp_factory(fork=True)
    pid = scp.pid
    scp.stop()
    assert not scp.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_redis_fixture_is_a_real_server(redis_conn):
    """redis_conn talks to a real Redis: PING answers and keys round-trip."""
    assert redis_conn.ping() is True
    redis_conn.set("harness:key", "value")
    assert redis_conn.get("harness:key") == b"value"


def test_redis_url_fixture_flushes_the_database(redis_server, request):
    """redis_url empties the database left behind by earlier tests."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.set("harness:left-behind", "1")
    url = request.getfixturevalue("redis_url")
    assert redis.Redis.from_url(url).dbsize() == 0
    client.close()


def test_persistent_redis_keeps_data_across_restart(redis_factory):
    """A persistent RedisServer stopped and started again comes back on its port with its keys."""
    import redis

    server = redis_factory(persistent=True)
    url = server.url
    redis.Redis.from_url(url).set("k", "v")
    server.stop()
    server.start()
    assert server.url == url
    assert redis.Redis.from_url(url).get("k") == b"v"


def test_storescp_restarts_on_the_same_port(storescp_factory, small_series):
    """A StoreSCP that was down comes back on its port: a destination configured earlier reaches it."""
    scp = storescp_factory()
    port = scp.port
    scp.stop()
    files = small_series(2)
    assert peers.storescu("127.0.0.1", port, files[:1]).returncode != 0
    scp.start()
    assert scp.port == port
    assert peers.storescu("127.0.0.1", port, files).returncode == 0
    assert len(scp.wait_for_files(2)) == 2


def test_free_port_is_bindable_on_loopback():
    """free_port() returns a loopback port nobody listens on."""
    port = peers.free_port()
    with pytest.raises(peers.PeerError):
        peers.wait_for_port("127.0.0.1", port, timeout=0.2)


def test_byte_comparison_ignores_the_meta_and_catches_a_changed_byte(tmp, small_series):
    """dataset_bytes_after_meta() ignores a different file meta; byte_mismatches() sees one changed byte."""
    sent = small_series(1)[0]
    ds = pydicom.dcmread(sent)
    ds.file_meta.ImplementationVersionName = "OTHER_WRITER"
    ds.file_meta.SourceApplicationEntityTitle = "SOMEWHERE"
    same = tmp / "same.dcm"
    ds.save_as(same, enforce_file_format=True)
    uid = data.sop_instance_uid(sent)
    assert data.byte_mismatches([sent], {uid: same}) == []
    changed = bytearray(sent.read_bytes())
    changed[-1] ^= 0xFF
    assert data.byte_mismatches([sent], {uid: bytes(changed)}) != []
    assert data.byte_mismatches([sent], {}) != []
