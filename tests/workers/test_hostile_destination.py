"""The sender against a destination that lies about PDU lengths.

No real archive announces a 4 GiB PDU; a hand-made peer plays the hostile
one here (a real association negotiated with the router's own acceptance
code, then a lying PDU header), which is the one place a fake is right.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from router.ingest import acceptance
from router.kernel.errors import DestinationUnavailable, TransientSendError
from router.kernel.settings import Destination
from tests.peers import LOOPBACK
from workers.sender import Sender

HUGE = b"\xff\xff\xff\xff"


class _LyingPeer:
    """Accepts one association, then answers with a PDU header claiming 4 GiB.

    Args:
        at: ``"associate"`` lies in the answer to the A-ASSOCIATE-RQ,
            ``"store"`` in the answer to the first C-STORE.
    """

    def __init__(self, at: str) -> None:
        self.at = at
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv_pdu(self, conn: socket.socket) -> bytes:
        header = conn.recv(6, socket.MSG_WAITALL)
        (length,) = struct.unpack(">I", header[2:])
        return conn.recv(length, socket.MSG_WAITALL)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            body = self._recv_pdu(conn)
            if self.at == "associate":
                conn.sendall(b"\x02\x00" + HUGE + b"\x00" * 64)
            else:
                accepted = acceptance.accept(acceptance.decode(body), [], 0)
                conn.sendall(accepted.pdu)
                self._recv_pdu(conn)  # the C-STORE-RQ's command
                conn.sendall(b"\x04\x00" + HUGE + b"\x00" * 64)
            time.sleep(2)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("at", ["associate", "store"])
def test_a_destination_announcing_a_4_gib_pdu_is_refused_without_allocating_it(ct_series, at):
    """A PDU header claiming 4 GiB ends the association with a clear error at
    once; the sender never allocates the claimed length."""
    import resource

    peer = _LyingPeer(at)
    sender = Sender("liar", Destination(ae_title="LIAR", host=LOOPBACK, port=peer.port, dimse_timeout=10), "ROUTER")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = DestinationUnavailable if at == "associate" else TransientSendError
    try:
        with pytest.raises(expected, match="bytes"):
            sender.send(ct_series(1, size_kib=8)[0])
    finally:
        sender.close()
        peer.close()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024
