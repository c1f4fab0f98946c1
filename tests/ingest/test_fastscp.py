"""The fast ingest SCP against real peers: DCMTK storescu/echoscu, pynetdicom, raw sockets, Redis."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from router.ingest.server import IngestServer
from router.kernel import filemeta, keys
from router.kernel.status import Status
from tests import data
from tests.peers import LOOPBACK, echoscu, store_as_it_is, storescu
from tests.rawpeer import (
    associate as _associate,
)
from tests.rawpeer import (
    read_pdu as _read_pdu,
)
from tests.rawpeer import (
    request_association as _request_association,
)
from tests.rawpeer import (
    response as _response,
)
from tests.rawpeer import (
    status as _status,
)
from tests.rawpeer import (
    store_pdus as _store_pdus,
)

ROUTER_AE = "DICOM_ROUTER"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def start_scp(start_ingest):
    """``start_scp(**RouterSettings fields)``: an ingest SCP in this process, without storage commitment."""
    return start_ingest


def _files(scp: IngestServer, state: str) -> list[Path]:
    return sorted((scp.spool.root / state).iterdir())


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- the tests --------------------------------------------------------------------


@pytest.mark.e2e
def test_storescu_instances_land_durable_byte_identical_with_association_facts_and_queued(
    start_scp, real_files, ct_series, redis_conn
):
    """storescu sends real files of 11 transfer syntaxes and a CT series on one
    association; each lands in incoming/ unchanged, its meta names the
    association, and its id waits in the route backlog."""
    scp = start_scp()
    files = list(real_files) + ct_series(20, size_kib=512)
    result = storescu(LOOPBACK, scp.port, files, called_ae=ROUTER_AE, calling_ae="MODALITY")
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("Received Store Response (Success)") == len(files), result.stdout[-3000:]
    assert result.stdout.count("Association Accepted") == 1
    assert len({data.transfer_syntax(f) for f in files}) >= 11

    received = _files(scp, "incoming")
    assert len(received) == len(files)
    by_uid = {data.sop_instance_uid(p): p for p in received}
    assert data.byte_mismatches(files, by_uid) == []
    for path in received:
        origin = filemeta.origin_of(pydicom.filereader.read_file_meta_info(path))
        assert (origin.calling_ae_title, origin.called_ae_title, origin.source_ip) == ("MODALITY", ROUTER_AE, LOOPBACK)
        assert origin.source_port > 0
    # Queued right after each answer (the instance was durable before it).
    expected = {p.name.removesuffix(".dcm") for p in received}
    deadline = time.monotonic() + 10
    while (queued := {i.decode() for i in redis_conn.lrange(keys.pending(keys.ROUTE), 0, -1)}) != expected:
        assert time.monotonic() < deadline, f"{len(queued)} of {len(expected)} queued"
        time.sleep(0.05)
    assert _files(scp, "tmp") == []


@pytest.mark.e2e
def test_echoscu_gets_success(start_scp):
    """C-ECHO over Verification is answered Success."""
    scp = start_scp()
    result = echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE)
    assert result.returncode == 0, result.stdout
    assert "Received Echo Response (Success)" in result.stdout


@pytest.mark.e2e
def test_calling_ae_not_allowed_is_rejected(start_scp):
    """A calling AE title outside router.accept.calling_ae_titles gets A-ASSOCIATE-RJ."""
    scp = start_scp(accept={"calling_ae_titles": ["MODALITY"]})
    refused = echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE, calling_ae="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout, refused.stdout
    assert "Calling AE Title Not Recognized" in refused.stdout, refused.stdout
    assert echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE, calling_ae="MODALITY").returncode == 0


@pytest.mark.e2e
def test_network_not_allowed_is_rejected(start_scp, ct_series):
    """A peer address outside router.accept.networks gets A-ASSOCIATE-RJ and stores nothing."""
    scp = start_scp(accept={"networks": ["10.0.0.0/8"]})
    refused = storescu(LOOPBACK, scp.port, ct_series(1, size_kib=16), called_ae=ROUTER_AE)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout, refused.stdout
    assert _files(scp, "incoming") == []


@pytest.mark.e2e
def test_truncated_dataset_gets_cannot_understand_and_is_quarantined(start_scp):
    """A truncated dataset (sent by pynetdicom as it is) is answered 0xC000 and
    kept in quarantine with its reason, never in incoming/."""
    scp = start_scp()
    truncated = Path(pydicom.data.get_testdata_file("MR_truncated.dcm"))
    assert store_as_it_is(LOOPBACK, scp.port, truncated, ROUTER_AE, "BROKEN") == Status.CANNOT_UNDERSTAND
    reasons = [reason for _, reason in scp.spool.quarantine_reasons()]
    assert len(reasons) == 1 and "runs past the end" in reasons[0]
    assert _files(scp, "incoming") == [] and _files(scp, "tmp") == []


@pytest.mark.e2e
@pytest.mark.parametrize("ending", ["a-abort", "dropped connection"])
def test_association_ending_mid_instance_leaves_no_file(start_scp, ct_series, ending):
    """An association aborted, or a connection dropped, halfway through a dataset
    leaves nothing in tmp/ or incoming/."""
    scp = start_scp()
    pdus = _store_pdus(ct_series(1, size_kib=512)[0])
    sock = _associate(scp.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)])
    sock.sendall(b"".join(pdus[: len(pdus) // 2]))
    _wait(lambda: len(_files(scp, "tmp")) == 1)  # the instance is being written
    if ending == "a-abort":
        sock.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    sock.close()
    _wait(lambda: _files(scp, "tmp") == [])
    assert _files(scp, "incoming") == []


@pytest.mark.e2e
def test_unsupported_command_is_refused_and_the_association_goes_on(start_scp, ct_series):
    """A DIMSE request the SCP does not perform (N-ACTION on a storage context) is answered 0x0211 on
    its message id; a C-STORE on the same association then succeeds."""
    scp = start_scp()
    sock = _associate(scp.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)])
    body = struct.pack("<HHIH", 0, 0x0100, 2, 0x0130) + struct.pack("<HHIH", 0, 0x0110, 2, 7)
    body += struct.pack("<HHIH", 0, 0x0800, 2, 0x0101)
    command = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    sock.sendall(struct.pack(">BBIIBB", 0x04, 0, len(command) + 6, len(command) + 2, 1, 0x03) + command)
    refused = _response(sock)
    assert int.from_bytes(refused[0x0100], "little") == 0x8130
    assert int.from_bytes(refused[0x0120], "little") == 7
    assert _status(refused) == Status.UNRECOGNIZED_OPERATION
    sock.sendall(b"".join(_store_pdus(ct_series(1, size_kib=64)[0], message_id=8)))
    stored = _response(sock)
    assert _status(stored) == Status.SUCCESS and int.from_bytes(stored[0x0120], "little") == 8
    sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    assert _read_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    sock.close()
    assert len(_files(scp, "incoming")) == 1


@pytest.mark.e2e
def test_spool_without_room_answers_out_of_resources_and_keeps_nothing(start_scp, ct_series):
    """Below min_free_bytes every C-STORE is answered 0xA700 and no file is left."""
    scp = start_scp(min_free_bytes=1 << 60)
    result = storescu(LOOPBACK, scp.port, ct_series(3, size_kib=64), called_ae=ROUTER_AE)
    assert result.stdout.count("Refused: OutOfResources") == 3, result.stdout[-3000:]
    assert _files(scp, "incoming") == [] and _files(scp, "tmp") == []


# -- what the command announces is what the dataset is ---------------------------


def _announcing(path: Path, target: Path, **meta: str) -> Path:
    """A copy of ``path`` whose file meta (hence the C-STORE-RQ built from it) says ``meta``."""
    ds = pydicom.dcmread(path)
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    ds.save_as(target, enforce_file_format=False)
    return target


@pytest.mark.e2e
@pytest.mark.parametrize("announced", ["another instance", "another SOP class"])
def test_a_dataset_that_is_not_the_announced_instance_is_refused_with_0xA900(
    start_scp, ct_series, tmp_path, announced
):
    """A C-STORE whose command names another SOP Instance UID, or another SOP
    class, than the dataset carries is answered 0xA900 and nothing is spooled;
    the same modality's honest instance is then accepted."""
    scp = start_scp()
    honest = ct_series(1, size_kib=16)[0]
    lie = ({"MediaStorageSOPInstanceUID": "1.2.826.0.1.3680043.2.1125.99.1"} if announced == "another instance"
           else {"MediaStorageSOPClassUID": "1.2.840.10008.5.1.4.1.1.4"})
    assert store_as_it_is(LOOPBACK, scp.port, _announcing(honest, tmp_path / "lie.dcm", **lie), ROUTER_AE) == \
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert _files(scp, "incoming") == [] and _files(scp, "tmp") == [] and scp.spool.quarantine_reasons() == []
    assert store_as_it_is(LOOPBACK, scp.port, honest, ROUTER_AE) == Status.SUCCESS
    assert len(_files(scp, "incoming")) == 1


def _raw_store(sock: socket.socket, context_id: int, command: dict[int, bytes], dataset: bytes) -> dict[int, bytes]:
    """Send a C-STORE-RQ built element by element (what pynetdicom will not build) and read the answer."""
    from router.kernel import pdu
    from router.kernel.dimse import encode_command

    sock.sendall(pdu.p_data(context_id, encode_command(sorted(command.items())), pdu.COMMAND, 16384 - 6))
    sock.sendall(struct.pack(">BBIIBB", 0x04, 0, len(dataset) + 6, len(dataset) + 2, context_id, 0x02) + dataset)
    return _response(sock)


def _store_command(sop_class: str | None, sop_instance: str | bytes | None) -> dict[int, bytes]:
    command = {0x0100: struct.pack("<H", 0x0001), 0x0110: struct.pack("<H", 5), 0x0700: b"\0\0", 0x0800: b"\0\0"}
    if sop_class is not None:
        command[0x0002] = sop_class.encode()
    if sop_instance is not None:
        command[0x1000] = sop_instance if isinstance(sop_instance, bytes) else sop_instance.encode()
    return command


@pytest.mark.e2e
@pytest.mark.parametrize("uid", [None, "", "../../../../tmp/x", "1.2\\3", "1.2." + "3" * 70, b"1.2\x003",
                                 b"1.2.3\x1b", "1.2.\u00e93".encode()])
def test_a_store_whose_affected_sop_instance_uid_cannot_be_handled_gets_0xC000(start_scp, ct_series, uid):
    """A C-STORE-RQ without an Affected SOP Instance UID, or with one the router
    cannot handle safely (a path, too long, NUL or another control character,
    beyond ASCII), can never be delivered: it is answered 0xC000, not Success,
    and nothing is written anywhere."""
    scp = start_scp()
    path = ct_series(1, size_kib=8)[0]
    sock = _associate(scp.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)])
    answer = _raw_store(sock, 1, _store_command(CT_IMAGE_STORAGE, uid), data.dataset_bytes_after_meta(path))
    assert _status(answer) == Status.CANNOT_UNDERSTAND
    sock.close()
    assert _files(scp, "incoming") == [] and _files(scp, "tmp") == []
    assert not Path("/tmp/x.dcm").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("uid", ["dccc9599" * 8, "1..2.3", "1.2.840.0123.04", "2.25.x-1"])
def test_a_uid_every_archive_takes_is_accepted_with_a_warning_naming_it(start_scp, ct_series, tmp_path, uid,
                                                                        caplog):
    """A SOP Instance UID outside PS3.5 §9.1 but safe to handle (64 hex characters
    as in pydicom-data's bad_sequence.dcm, an empty component, leading zeros, a
    letter) is stored by storescp and Orthanc alike: storescu gets Success, the
    instance is spooled under that UID, and the log names it (leading zeros,
    which every peer takes silently, excepted)."""
    scp = start_scp()
    ds = pydicom.dcmread(ct_series(1, size_kib=8)[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=False)
    result = storescu(LOOPBACK, scp.port, [odd], called_ae=ROUTER_AE, calling_ae="MODALITY")
    assert "Received Store Response (Success)" in result.stdout, result.stdout[-3000:]
    [spooled] = _files(scp, "incoming")
    assert pydicom.dcmread(spooled, stop_before_pixels=True).SOPInstanceUID == uid
    warned = [r.getMessage() for r in caplog.records
              if r.name.startswith("router") and r.levelname == "WARNING" and uid in r.getMessage()]
    assert warned if "0123" not in uid else not warned


@pytest.mark.e2e
def test_a_command_for_another_sop_class_than_its_context_gets_0xA900(start_scp, ct_series):
    """A CT instance announced on the context agreed for MR Image Storage is
    refused with 0xA900 (PS3.8 §7.1.1.13: a context carries its abstract syntax)."""
    scp = start_scp()
    path = ct_series(1, size_kib=8)[0]
    uid = data.sop_instance_uid(path)
    sock = _associate(scp.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE), ("1.2.840.10008.5.1.4.1.1.4", EXPLICIT_VR_LE)])
    answer = _raw_store(sock, 3, _store_command(CT_IMAGE_STORAGE, uid), data.dataset_bytes_after_meta(path))
    assert _status(answer) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    answer = _raw_store(sock, 1, _store_command(CT_IMAGE_STORAGE, uid), data.dataset_bytes_after_meta(path))
    assert _status(answer) == Status.SUCCESS
    sock.close()
    assert len(_files(scp, "incoming")) == 1


def _context_results(ac_body: bytes) -> dict[int, tuple[int, str]]:
    from pynetdicom.pdu import A_ASSOCIATE_AC

    pdu = A_ASSOCIATE_AC()
    pdu.decode(b"\x02\x00" + len(ac_body).to_bytes(4, "big") + ac_body)
    return {int(cx.context_id): (int(cx.result), str(cx.transfer_syntax[0]) if cx.transfer_syntax else "")
            for cx in pdu.to_primitive().presentation_context_definition_results_list}


@pytest.mark.e2e
def test_every_transfer_syntax_dicom_defines_is_accepted_for_storage(start_scp):
    """HTJ2K, MPEG-4 and HEVC video, JPIP, retired JPEG processes are accepted
    for storage (the router only reads headers), Color Palette Storage gets its
    context, and a syntax DICOM does not define is declined (result 4) while
    a defined alternative the peer proposed after it is taken."""
    from router.kernel import syntaxes

    scp = start_scp()
    every = sorted(syntaxes.TRANSFER_SYNTAXES)
    proposals = [(CT_IMAGE_STORAGE, ts) for ts in every[:60]]
    proposals += [
        ("1.2.840.10008.5.1.4.39.1", EXPLICIT_VR_LE),  # Color Palette Storage
        ("1.2.840.10008.5.1.4.1.1.77.1.1.1", "1.2.840.10008.1.2.4.107"),  # Video Endoscopic, HEVC
        ("1.2.840.10008.5.1.4.1.1.2", ["1.2.3.4.5.6", EXPLICIT_VR_LE]),  # undefined first, then a defined one
    ]
    proposals.append(("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5.6"))  # nothing DICOM defines
    sock, (pdu_type, body) = _request_association(scp.port, proposals)
    sock.close()
    assert pdu_type == 0x02
    results = _context_results(body)
    for i, ts in enumerate(every[:60]):
        assert results[2 * i + 1] == (0, ts), ts
    assert results[121][0] == 0 and results[123] == (0, "1.2.840.10008.1.2.4.107")
    assert results[125] == (0, EXPLICIT_VR_LE)
    assert results[127][0] == 4


@pytest.mark.e2e
def test_an_association_request_without_presentation_contexts_is_rejected(start_scp):
    """A-ASSOCIATE-RQ with no presentation context at all: A-ASSOCIATE-RJ, not an empty AC."""
    scp = start_scp()
    sock, (pdu_type, body) = _request_association(scp.port, [])
    sock.close()
    assert pdu_type == 0x03
    assert body[1:4] == bytes([0x01, 0x01, 0x01])  # rejected-permanent, service user, no reason given


@pytest.mark.e2e
def test_the_router_presents_its_own_implementation_class_uid(start_scp):
    """echoscu sees the router's Implementation Class UID and Version Name, not pynetdicom's."""
    from router.kernel.implementation import (
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
    )

    scp = start_scp()
    result = echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE, extra_args=["-d"])
    assert result.returncode == 0, result.stdout
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in result.stdout, result.stdout
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in result.stdout


# -- limits a hostile or broken peer cannot exhaust ------------------------------


@pytest.mark.e2e
def test_a_peer_trickling_its_association_request_is_cut_off_at_the_deadline(start_scp):
    """A connection that sends its A-ASSOCIATE-RQ a byte at a time is closed
    once the request deadline passes, however steadily it trickles."""
    scp = start_scp(network_timeout=2)
    sock = socket.create_connection((LOOPBACK, scp.port), timeout=10)
    started = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError, AssertionError)):
        for byte in b"\x01\x00\x00\x00\x10\x00" + b"\x00" * 64:
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
            sock.setblocking(False)
            try:
                assert sock.recv(64) != b"", "closed"
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    assert time.monotonic() - started < 6
    sock.close()


@pytest.mark.e2e
def test_an_association_that_goes_silent_is_aborted_after_network_timeout(start_scp):
    """Once associated, the socket's timeout is the kernel's (``reader.kernel_timeout``,
    no poll per read): a pynetdicom peer that sends one C-ECHO, then nothing, hears
    an A-ABORT once network_timeout passes; the next peer is served. pynetdicom, not
    echoscu: DCMTK's tools release at once and cannot hold an association silent."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    scp = start_scp(network_timeout=2)
    ae = AE("QUIET")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(LOOPBACK, scp.port, ae_title=ROUTER_AE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    started = time.monotonic()
    deadline = started + 30
    while not assoc.is_aborted:
        assert time.monotonic() < deadline, "still associated 30 s after it went silent"
        time.sleep(0.05)
    assert time.monotonic() - started >= 1.5  # the timeout, not something sooner
    again = ae.associate(LOOPBACK, scp.port, ae_title=ROUTER_AE)
    assert again.is_established and again.send_c_echo().Status == Status.SUCCESS
    again.release()


@pytest.mark.e2e
def test_one_peer_cannot_take_every_connection(start_scp):
    """Idle connections from one address beyond max_associations_per_peer are
    closed at once; a modality from another address still gets in."""
    from pynetdicom import AE

    scp = start_scp(max_associations_per_peer=3, network_timeout=20)
    idle = [socket.create_connection((LOOPBACK, scp.port), timeout=10) for _ in range(3)]
    _wait(lambda: sum(scp.connections.values()) == 3)
    extra = socket.create_connection((LOOPBACK, scp.port), timeout=10)
    assert extra.recv(16) == b""  # closed without a word: there was no request to answer
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, scp.port, ae_title=ROUTER_AE, bind_address=("127.0.0.2", 0))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()
    for sock in [*idle, extra]:
        sock.close()


@pytest.mark.e2e
def test_the_association_limit_answers_a_transient_local_limit_exceeded(start_scp):
    """With max_associations associations open, the next request gets a transient
    A-ASSOCIATE-RJ "local limit exceeded" (the modality retries later); once one
    is released, a new one is accepted."""
    scp = start_scp(max_associations=2)
    held = [_associate(scp.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)]) for _ in range(2)]
    refused = echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE)
    assert refused.returncode != 0
    assert "Rejected Transient" in refused.stdout and "Local Limit Exceeded" in refused.stdout, refused.stdout
    held[0].sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    assert _read_pdu(held[0])[0] == 0x06
    held[0].close()
    _wait(lambda: sum(scp.associations.values()) == 1)
    assert echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE).returncode == 0
    held[1].close()


@pytest.mark.e2e
def test_the_association_summary_counts_refused_instances_and_the_refusal_says_why(start_scp, ct_series, caplog):
    """One association, one honest store and one whose dataset is another
    instance: the refusal is logged with both UIDs, and the association's
    summary line counts one accepted and one refused."""
    import logging

    scp = start_scp()
    path = ct_series(1, size_kib=8)[0]
    uid = data.sop_instance_uid(path)
    with caplog.at_level(logging.INFO, logger="router.ingest"):
        sock = _associate(scp.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)])
        lie = _raw_store(sock, 1, _store_command(CT_IMAGE_STORAGE, "1.2.3.4.5"), data.dataset_bytes_after_meta(path))
        assert _status(lie) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        honest = _raw_store(sock, 1, _store_command(CT_IMAGE_STORAGE, uid), data.dataset_bytes_after_meta(path))
        assert _status(honest) == Status.SUCCESS
        sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        assert _read_pdu(sock)[0] == 0x06
        sock.close()
        _wait(lambda: "refused in" in caplog.text)
    assert f"C-STORE 1.2.3.4.5 from RAW@127.0.0.1 refused (0xA900): dataset SOP Instance UID {uid} differs" in caplog.text
    assert "1 instance(s) accepted, 1 refused in" in caplog.text
