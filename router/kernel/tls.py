"""DICOM TLS (PS3.15 Annex B): the contexts TLS associations are made in, built once.

The ingest accepts TLS on a port of its own (``router.tls``); the requestor
(``router/kernel/requestor.py``) connects with TLS to a destination or a
modality whose settings say ``tls``. The same rules serve both: TLS 1.2 or
later, and for TLS 1.2 only the BCP 195 cipher suites (PS3.15 §B.9, the
"BCP 195 TLS Secure Transport Connection Profile"; TLS 1.3's own suites all
qualify). The handshake comes before any DICOM PDU (PS3.15 §B.1), so a caller
that fails it never reaches DIMSE.

Certificates and keys are re-read when their files change, so a renewed
certificate takes effect without a restart; one that expires within
:data:`EXPIRY_WARNING_DAYS` is a warning in the log, and its expiry a metric.
"""

from __future__ import annotations

import datetime
import logging
import os
import select
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509

from router.kernel.settings import Config, IngestTLSSettings, PeerTLSSettings

log = logging.getLogger(__name__)

BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
"""RFC 7525 §4.2 (BCP 195): authenticated encryption with forward secrecy, for TLS 1.2."""
EXPIRY_WARNING_DAYS = 30


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(settings: IngestTLSSettings) -> ssl.SSLContext:
    """The ingest's TLS context.

    Raises:
        OSError, ssl.SSLError: a file is missing or unreadable, or the key is not the certificate's.
    """
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=settings.ca_file)
    if settings.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif settings.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(settings: PeerTLSSettings) -> ssl.SSLContext:
    """The context to connect to a peer with: its certificate must verify (and name
    the host, unless ``check_hostname`` is off), or nothing is sent.

    Raises:
        OSError, ssl.SSLError: a file is missing or unreadable, or the key is not the certificate's.
    """
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=settings.ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = settings.check_hostname
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def certificate_expiry(path: Path) -> float:
    """When the (first) certificate in a PEM file expires, in epoch seconds.

    Raises:
        OSError, ValueError: unreadable, or not a PEM certificate.
    """
    certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return certificate.not_valid_after_utc.timestamp()


def own_certificates(config: Config) -> dict[str, Path]:
    """The router's own certificates, by what they serve: ``router.tls``, and the
    client certificates it presents to destinations and modalities."""
    found = {}
    if config.router.tls is not None:
        found["router.tls"] = config.router.tls.cert_file
    for kind, peers in (("destinations", config.destinations), ("modalities", config.modalities)):
        for name, peer in peers.items():
            if peer.tls is not None and peer.tls.cert_file is not None:
                found[f"{kind}.{name}.tls"] = peer.tls.cert_file
    return found


def _stamp(paths: list[Path | None]) -> tuple:
    stamps = []
    for path in paths:
        if path is not None:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class Reloading:
    """A TLS context rebuilt when its files change (a renewed certificate needs no restart).

    Args:
        build: makes the context from the settings (:func:`server_context` or :func:`client_context`).
        settings: its files.
        label: what it serves, for the log (``router.tls``, ``destination pacs``).
    """

    def __init__(self, build, settings: IngestTLSSettings | PeerTLSSettings, label: str) -> None:  # noqa: ANN001
        self._build = build
        self.settings = settings
        self.label = label
        self._files = [settings.cert_file, settings.key_file, settings.ca_file]
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._context: ssl.SSLContext | None = None
        self.context()

    def context(self) -> ssl.SSLContext:
        """The context for the files as they are now.

        Raises:
            OSError, ssl.SSLError: the files as they are now do not make a context
                (the previous one is not used: a broken renewal must show).
        """
        stamp = _stamp(self._files)
        with self._lock:
            if stamp != self._stamp or self._context is None:
                self._context = self._build(self.settings)
                if self._stamp is not None:
                    log.info("%s: certificate files changed, re-read", self.label)
                self._stamp = stamp
                self._warn_if_expiring()
            return self._context

    def _warn_if_expiring(self) -> None:
        path = self.settings.cert_file
        if path is None:
            return
        try:
            left = certificate_expiry(path) - time.time()
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read the expiry of %s: %s", self.label, path, exc)
            return
        if left < EXPIRY_WARNING_DAYS * 86400:
            when = datetime.datetime.fromtimestamp(time.time() + left, datetime.timezone.utc)
            log.warning("%s: certificate %s %s %s", self.label, path, "expired" if left < 0 else "expires",
                        when.strftime("%Y-%m-%d %H:%M UTC"))


def accept(sock: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """The server side of the handshake on an accepted connection, done by ``deadline``
    (``time.monotonic()``): a whole-handshake deadline, not a per-read timeout, so a
    peer trickling its ClientHello cannot hold a connection slot.

    Raises:
        TimeoutError: not done by the deadline.
        ssl.SSLError, OSError: the handshake failed (no or an untrusted certificate,
            plaintext, no common protocol or cipher).
    """
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                waiting = ([tls], [])
            except ssl.SSLWantWriteError:
                waiting = ([], [tls])
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(select.select(*waiting, [], remaining)):
                raise TimeoutError("TLS handshake not done in time")
    except BaseException:
        tls.close()
        raise
    tls.setblocking(True)
    return tls


def identities(tls: ssl.SSLSocket) -> frozenset[str]:
    """What a verified peer certificate says its holder is: its subject's common
    names and every subjectAltName value (DNS, IP Address, email, URI)."""
    certificate = tls.getpeercert() or {}
    names = {value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for _, value in certificate.get("subjectAltName", ()))
    return frozenset(names)


_peer_files: dict[PeerTLSSettings, Reloading] = {}
_peer_lock = threading.Lock()


def for_peer(settings: PeerTLSSettings, label: str) -> ssl.SSLContext:
    """The context to connect to a destination or modality with, built once per
    settings and re-read when its files change.

    Raises:
        OSError, ssl.SSLError: the files do not make a context.
    """
    with _peer_lock:
        files = _peer_files.get(settings)
        if files is None:
            files = _peer_files[settings] = Reloading(client_context, settings, label)
    return files.context()
