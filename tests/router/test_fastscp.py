"""The fast ingest SCP against real peers: DCMTK storescu/echoscu, pynetdicom, raw sockets, Redis."""

from __future__ import annotations

import io
import socket
import struct
import time
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import redis

from router import filemeta
from router.fastscp import FastIngestServer
from router.settings import RouterSettings
from router.spool import Spool
from router.status import Status
from tests import data
from tests.peers import LOOPBACK, echoscu, storescu
from workers import keys
from workers.dispatch import Dispatcher

ROUTER_AE = "DICOM_ROUTER"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def start_scp(tmp_path: Path, redis_url: str):
    """Start fast SCPs in this process: ``start_scp(**RouterSettings fields)``; all stopped after."""
    started: list[FastIngestServer] = []
    clients: list[redis.Redis] = []

    def make(**overrides) -> FastIngestServer:
        fields = {"ae_title": ROUTER_AE, "host": LOOPBACK, "port": 0, "spool_dir": tmp_path / "spool",
                  "min_free_bytes": 0, "network_timeout": 10}
        fields.update(overrides)
        settings = RouterSettings(**fields)
        client = redis.Redis.from_url(redis_url)
        clients.append(client)
        scp = FastIngestServer(settings, Spool(settings.spool_dir, settings.min_free_bytes), Dispatcher(client))
        scp.start()
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()
    for client in clients:
        client.close()


def _files(scp: FastIngestServer, state: str) -> list[Path]:
    return sorted((scp.spool.root / state).iterdir())


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- a raw DICOM peer, for what DCMTK will not do (half an instance, odd commands) --


def _associate(port: int, contexts: list[tuple[str, str]], calling_ae: str = "RAW") -> socket.socket:
    """Open an association over a plain socket; contexts get ids 1, 3, 5..."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = ROUTER_AE
    for i, (abstract, transfer) in enumerate(contexts):
        cx = build_context(abstract, transfer)
        cx.context_id = 2 * i + 1
        primitive.presentation_context_definition_list.append(cx)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.0"
    primitive.user_information = [maximum, uid]
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(A_ASSOCIATE_RQ(primitive).encode())
    pdu_type, _ = _read_pdu(sock)
    assert pdu_type == 0x02, f"A-ASSOCIATE-AC expected, got PDU type {pdu_type}"
    return sock


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv_exactly(sock, 6)
    return header[0], _recv_exactly(sock, struct.unpack(">I", header[2:])[0])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = b""
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        assert chunk, "connection closed"
        chunks += chunk
    return chunks


def _store_pdus(path: Path, message_id: int = 1) -> list[bytes]:
    """The C-STORE-RQ of a file, as pynetdicom encodes it, in 16 KiB P-DATA-TF PDUs."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    meta = pydicom.filereader.read_file_meta_info(path)
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    primitive.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(data.dataset_bytes_after_meta(path))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return [P_DATA_TF(p_data).encode() for p_data in message.encode_msg(1, 16384)]


def _response(sock: socket.socket) -> dict[int, bytes]:
    """The elements of the next DIMSE response command set (one PDV, as the SCP sends it)."""
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x04
    length, _, control = struct.unpack(">IBB", body[:6])
    assert control == 0x03
    command, elements, pos = body[6 : 4 + length], {}, 0
    while pos < len(command):
        _, element, size = struct.unpack_from("<HHI", command, pos)
        elements[element] = command[pos + 8 : pos + 8 + size]
        pos += 8 + size
    return elements


def _status(elements: dict[int, bytes]) -> int:
    return int.from_bytes(elements[0x0900], "little")


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
    from pynetdicom import AE, _config

    scp = start_scp()
    truncated = Path(pydicom.data.get_testdata_file("MR_truncated.dcm"))
    meta = pydicom.filereader.read_file_meta_info(truncated)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="BROKEN")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate(LOOPBACK, scp.port, ae_title=ROUTER_AE)
        assert assoc.is_established
        status = assoc.send_c_store(truncated)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == Status.CANNOT_UNDERSTAND
    reasons = [reason for _, reason in scp.spool.quarantined()]
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
    """A DIMSE request the SCP does not perform (N-ACTION) is answered 0x0211 on
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
    assert _status(refused) == 0x0211
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
