"""A raw DICOM peer over a plain socket, for what DCMTK will not do: half an
instance, odd commands, lies in a command set, a PDU at a time.

A hand-made peer is right only where it plays a broken or hostile one; the
well-behaved modality and archive in the tests are DCMTK and Orthanc.
"""

from __future__ import annotations

import io
import socket
import struct
from pathlib import Path

import pydicom

from tests import data
from tests.peers import LOOPBACK

ROUTER_AE = "DICOM_ROUTER"



def associate(port: int, contexts: list[tuple[str, str]], calling_ae: str = "RAW") -> socket.socket:
    """Open an association over a plain socket; contexts get ids 1, 3, 5..."""
    sock, (pdu_type, _) = request_association(port, contexts, calling_ae)
    assert pdu_type == 0x02, f"A-ASSOCIATE-AC expected, got PDU type {pdu_type}"
    return sock


def request_association(port: int, contexts: list[tuple[str, str | list[str]]],
                         calling_ae: str = "RAW") -> tuple[socket.socket, tuple[int, bytes]]:
    """Send an A-ASSOCIATE-RQ over a plain socket: the socket and the answer PDU (type, body)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
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
    return sock, read_pdu(sock)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exactly(sock, 6)
    return header[0], recv_exactly(sock, struct.unpack(">I", header[2:])[0])


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = b""
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        assert chunk, "connection closed"
        chunks += chunk
    return chunks


def store_pdus(path: Path, message_id: int = 1, context_id: int = 1) -> list[bytes]:
    """The C-STORE-RQ of a file (its meta names the instance), as pynetdicom encodes it, in 16 KiB P-DATA-TF PDUs."""
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
    return [P_DATA_TF(p_data).encode() for p_data in message.encode_msg(context_id, 16384)]


def response(sock: socket.socket) -> dict[int, bytes]:
    """The elements of the next DIMSE response command set (one PDV, as the SCP sends it)."""
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x04
    length, _, control = struct.unpack(">IBB", body[:6])
    assert control == 0x03
    command, elements, pos = body[6 : 4 + length], {}, 0
    while pos < len(command):
        _, element, size = struct.unpack_from("<HHI", command, pos)
        elements[element] = command[pos + 8 : pos + 8 + size]
        pos += 8 + size
    return elements


def status(elements: dict[int, bytes]) -> int:
    return int.from_bytes(elements[0x0900], "little")
