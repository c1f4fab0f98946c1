"""The fast ingest SCP's TCP server: one thread per connection, each an
:class:`router.ingest.fastscp.AcceptedAssociation`, with the limits a hostile or
broken peer cannot exhaust (connections per peer, associations in all)."""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections import Counter

from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from router.ingest import acceptance
from router.ingest.commitment import CommitmentService, commitment_context
from router.ingest.commitment_scp import ModalityCommitments
from router.ingest.fastscp import AcceptedAssociation, plain_ip
from router.ingest.redis_gate import RedisGate
from router.ingest.store import StoreHandler
from router.kernel.dispatch import Dispatcher
from router.kernel.settings import RouterSettings
from router.kernel.spool import Spool
from router.kernel.syntaxes import VERIFICATION_SYNTAXES

log = logging.getLogger(__name__)


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        # Without TCP_NODELAY every C-STORE-RSP waits for a delayed ACK:
        # ~45 ms per instance against DCMTK (docs/measurements.md).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        scp = self.server.scp
        peer_ip = plain_ip(str(self.client_address[0]))
        if not scp.connect(peer_ip, sock):
            log.warning("connection from %s closed at once: %d connections from it already", peer_ip,
                        scp.settings.max_associations_per_peer)
            return
        try:
            AcceptedAssociation(scp, sock, self.client_address).run()
        finally:
            scp.disconnect(peer_ip, sock)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple, family: socket.AddressFamily, scp: IngestServer) -> None:
        self.address_family = family
        self.scp = scp
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] in ("::", ""):
            # Dual stack: IPv4 peers arrive as ::ffff:a.b.c.d.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: object, client_address: object) -> None:
        log.exception("association from %s failed", client_address)


class IngestServer:
    """The fast ingest SCP, built from settings and bound to a spool and a dispatcher.

    Same shape as :class:`router.ingest.pynetdicom_scp.IngestServer`, so the CLI can pick either.
    """

    def __init__(self, settings: RouterSettings, spool: Spool, dispatcher: Dispatcher,
                 commitments: CommitmentService | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.dispatcher = dispatcher
        self.gate = RedisGate()
        self.stores = StoreHandler(spool, settings.ae_title)
        self.commitments = commitments or CommitmentService(
            spool, dispatcher, [], ModalityCommitments(settings, spool, dispatcher.redis, {}))
        self.supported = [
            _context(Verification, VERIFICATION_SYNTAXES),
            commitment_context(),
            *acceptance.storage_contexts(),
        ]
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.connections: Counter[str] = Counter()  # peer IP -> open connections
        self.associations: Counter[str] = Counter()  # peer IP -> accepted associations
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def open_associations(self) -> int:
        with self.lock:
            return sum(self.associations.values())

    # -- limits a hostile or broken peer cannot exhaust --

    def connect(self, peer_ip: str, sock: socket.socket) -> bool:
        """Count a new connection; False when its peer already has its share open.

        Before the A-ASSOCIATE-RQ there is nothing to answer, so a peer over
        ``max_associations_per_peer`` connections is simply closed; others
        keep their room (``ARTIM_TIMEOUT`` bounds how long any waits).
        """
        with self.lock:
            if self.connections[peer_ip] >= self.settings.max_associations_per_peer:
                return False
            self.connections[peer_ip] += 1
            self.sockets.add(sock)
            return True

    def disconnect(self, peer_ip: str, sock: socket.socket) -> None:
        with self.lock:
            self.connections[peer_ip] -= 1
            if not self.connections[peer_ip]:
                del self.connections[peer_ip]
            self.sockets.discard(sock)

    def admit(self, peer_ip: str) -> bool:
        """Take an association slot for ``peer_ip``: False (answer "local limit
        exceeded", a transient A-ASSOCIATE-RJ) when the router or that peer is full."""
        with self.lock:
            if (sum(self.associations.values()) >= self.settings.max_associations
                    or self.associations[peer_ip] >= self.settings.max_associations_per_peer):
                return False
            self.associations[peer_ip] += 1
            return True

    def leave(self, peer_ip: str) -> None:
        """Give back the association slot ``admit`` took."""
        with self.lock:
            self.associations[peer_ip] -= 1
            if not self.associations[peer_ip]:
                del self.associations[peer_ip]

    def start(self) -> None:
        """Bind and serve in a background thread."""
        host, port = self.settings.host, self.settings.port
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server = _TCPServer(address, family, self)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ingest-scp", daemon=True)
        self._thread.start()
        self.commitments.start()
        log.info("ingest SCP %s (fast engine) listening on %s:%s", self.settings.ae_title, host, self.port)

    def stop(self) -> None:
        """Stop listening and abort the associations still open (their partial files go)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self.lock:
            open_sockets = list(self.sockets)
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its own thread
        # Last: a report waiting for its answer on one of those associations wakes now.
        self.commitments.stop()


def _context(abstract_syntax: str, transfer_syntaxes: list[str]) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = transfer_syntaxes
    return context
