"""The ingest SCP's TCP server: one thread per connection, each an
:class:`router.ingest.fastscp.AcceptedAssociation`, with the limits a hostile or
broken peer cannot exhaust (connections per peer, associations in all); with
``router.tls`` a second port whose connections do the TLS handshake first."""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from pydicom import Dataset
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from router.ingest import acceptance
from router.ingest.fastscp import AcceptedAssociation, ServicesAnswered, artim_deadline, plain_ip
from router.ingest.redis_gate import queue_for_routing
from router.ingest.store import StoreHandler
from router.kernel import tls
from router.kernel.commitment.from_modalities import ModalityCommitments
from router.kernel.commitment.service import CommitmentService, commitment_context
from router.kernel.dispatch import Dispatcher
from router.kernel.filemeta import Origin
from router.kernel.handoff import Received, RedisGate, Route
from router.kernel.settings import RouterSettings
from router.kernel.spool import Spool
from router.kernel.syntaxes import VERIFICATION_SYNTAXES

log = logging.getLogger(__name__)


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        opened = time.monotonic()
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
            identities = None
            if self.server.tls is not None:
                # The handshake counts against the per-peer cap (taken above) and
                # the association's deadline (ARTIM, from the connection's opening).
                wrapped = self._handshake(sock, peer_ip, opened)
                if wrapped is None:
                    return
                scp.rewrapped(sock, wrapped)
                sock, identities = wrapped, tls.identities(wrapped)
            AcceptedAssociation(scp, sock, self.client_address, opened, identities).run()
        finally:
            scp.disconnect(peer_ip, sock)
            if sock is not self.request:
                sock.close()

    def _handshake(self, sock: socket.socket, peer_ip: str, opened: float) -> ssl.SSLSocket | None:
        """The TLS handshake (PS3.15 §B.1), or None when it failed (said in the log)."""
        scp = self.server.scp
        try:
            context = self.server.tls.context()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS connection from %s closed: router.tls does not load: %s", peer_ip, exc)
            return None
        try:
            return tls.accept(sock, context, artim_deadline(scp.settings, opened))
        except (ssl.SSLError, OSError) as exc:  # TimeoutError included
            log.warning("TLS handshake from %s failed: %s", peer_ip, getattr(exc, "reason", None) or exc)
            return None


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple, family: socket.AddressFamily, scp: IngestServer,
                 tls_files: tls.Reloading | None = None) -> None:
        self.address_family = family
        self.scp = scp
        self.tls = tls_files
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] in ("::", ""):
            # Dual stack: IPv4 peers arrive as ::ffff:a.b.c.d.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: object, client_address: object) -> None:
        log.exception("association from %s failed", client_address)


class Routing(Protocol):
    """Routing in the ingest process (``router.route_at_ingest``; ``workers/routing_at_ingest.py``)."""

    gate: RedisGate

    def choose(self, header: Dataset | Callable[[], Dataset], origin: Origin,
               identifiers: tuple[str, ...]) -> Route | None:
        """Before the answer: where the instance goes untouched, or None (``incoming/``).
        ``header`` may be a function that builds it, called only if a rule looks at it."""
        ...

    def start(self) -> object: ...

    def route(self, batch: list[Received]) -> None:
        """Record and announce ``batch`` now, on the caller's thread."""
        ...

    def offer(self, received: Received) -> bool:
        """Take ``received`` to route it; False when it cannot (full, stopped): then it is
        queued for the routing worker."""
        ...

    def stop(self) -> None:
        """Route what was offered, then stop."""
        ...


class IngestServer:
    """The ingest SCP, built from settings and bound to a spool and a dispatcher.

    Args:
        routing: routes what was received in this process; None: every
            instance is queued for the routing worker.
    """

    def __init__(self, settings: RouterSettings, spool: Spool, dispatcher: Dispatcher,
                 commitments: CommitmentService | None = None, routing: Routing | None = None,
                 services: ServicesAnswered | None = None) -> None:
        self.settings = settings
        self.services = services
        self.spool = spool
        self.dispatcher = dispatcher
        self.routing = routing
        self.gate = RedisGate()
        self.stores = StoreHandler(spool, settings.ae_title, routing.choose if routing is not None else None)
        if routing is not None:
            routing.gate = self.gate
        self.commitments = commitments or CommitmentService(
            spool, dispatcher, [], ModalityCommitments(settings, spool, dispatcher.redis, {}))
        self.supported = [
            _context(Verification, VERIFICATION_SYNTAXES),
            commitment_context(),
            *acceptance.storage_contexts(),
            *(services.contexts() if services is not None else ()),
        ]
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.connections: Counter[str] = Counter()  # peer IP -> open connections
        self.associations: Counter[str] = Counter()  # peer IP -> accepted associations
        self.associations_changed = threading.Event()
        """Set when an association is admitted or leaves: the gauge is published then, not a tick later."""
        self._servers: list[_TCPServer] = []

    @property
    def port(self) -> int:
        assert self._servers
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port (``router.tls``), or None without one."""
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

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

    def rewrapped(self, sock: socket.socket, wrapped: socket.socket) -> None:
        """``sock`` is now ``wrapped`` (TLS): ``stop`` shuts that one down."""
        with self.lock:
            self.sockets.discard(sock)
            self.sockets.add(wrapped)

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
        self.associations_changed.set()
        return True

    def leave(self, peer_ip: str) -> None:
        """Give back the association slot ``admit`` took."""
        with self.lock:
            self.associations[peer_ip] -= 1
            if not self.associations[peer_ip]:
                del self.associations[peer_ip]
        self.associations_changed.set()

    def hand_over(self, received: Received) -> None:
        """An instance was answered Success: route it here, or queue it for the routing worker."""
        if self.routing is not None:
            if self.routing.offer(received):
                return
            if received.route is not None:  # in out/ already: announce it now, not a reconcile later
                self.routing.route([received])
                return
        queue_for_routing(self.dispatcher, self.gate, received)

    def start(self) -> None:
        """Bind and serve in background threads: the plain port, and the TLS one with ``router.tls``.

        Raises:
            OSError: a port cannot be bound; ssl.SSLError (an OSError too): the
                TLS certificate, key or CA file does not load.
        """
        settings = self.settings
        self._serve(settings.port, None)
        if settings.tls is not None:
            try:
                files = tls.Reloading(tls.server_context, settings.tls, "router.tls")
            except OSError:
                self.stop()
                raise
            self._serve(settings.tls.port, files)
        self.commitments.start()
        if self.routing is not None:
            self.routing.start()
        if self.services is not None:
            self.services.start()
        log.info("ingest SCP %s listening on %s:%s", settings.ae_title, settings.host, self.port)
        if self.tls_port is not None:
            log.info("ingest SCP %s listening on %s:%s with DICOM TLS", settings.ae_title, settings.host,
                     self.tls_port)

    def _serve(self, port: int, tls_files: tls.Reloading | None) -> None:
        family, _, _, _, address = socket.getaddrinfo(self.settings.host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        try:
            server = _TCPServer(address, family, self, tls_files)
        except OSError:
            self.stop()
            raise
        self._servers.append(server)
        name = "ingest-scp-tls" if tls_files is not None else "ingest-scp"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()

    def stop(self) -> None:
        """Stop listening and abort the associations still open (their partial files go)."""
        if not self._servers:
            return
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        with self.lock:
            open_sockets = list(self.sockets)
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its own thread
        # Last: a report waiting for its answer on one of those associations wakes now.
        self.commitments.stop()
        if self.routing is not None:
            self.routing.stop()
        if self.services is not None:
            self.services.stop()


def _context(abstract_syntax: str, transfer_syntaxes: list[str]) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = transfer_syntaxes
    return context
