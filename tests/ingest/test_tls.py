"""DICOM TLS at the edges a real modality does not show: a handshake that never
ends, certificates renewed or near expiry, and TLS settings that could not work,
refused before anything starts. The peers over the wire are DCMTK and Orthanc
in tests/test_tls_e2e.py; here a raw socket plays the caller that stalls.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.kernel import tls
from router.kernel.settings import Config, IngestTLSSettings
from router.kernel.spool import Spool
from router.metrics import exposition
from tests.peers import LOOPBACK, echoscu, free_port, wait_until
from tests.pki import Authority

ROUTER_AE = "DICOM_ROUTER"


@pytest.fixture
def site(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "pki", "site-ca")


def _ingest_tls(site: Authority, require_client_cert: bool = True, port: int = 0, **issue) -> dict:
    router = site.issue("router", **issue)
    return {"port": port, "cert_file": router.cert, "key_file": router.key, "ca_file": site.cert,
            "require_client_cert": require_client_cert}


@pytest.mark.e2e
def test_a_caller_that_never_finishes_its_handshake_is_cut_off_at_the_association_deadline(start_ingest, site,
                                                                                            tmp_path):
    """A connection to the TLS port that sends nothing (or a trickle) holds its slot
    only until the association deadline (network_timeout 2 s), handshake included;
    then a real TLS client associates at once, and so does a plain one meanwhile."""
    scp = start_ingest(tls=_ingest_tls(site, require_client_cert=False), network_timeout=2,
                       max_associations_per_peer=1)
    stalled = socket.create_connection((LOOPBACK, scp.tls_port))
    stalled.sendall(b"\x16\x03")  # the first bytes of a ClientHello, and no more
    started = time.monotonic()
    stalled.settimeout(30)
    assert stalled.recv(1) == b""  # closed by the router
    assert time.monotonic() - started < 20
    stalled.close()
    client = ssl.create_default_context(cafile=site.cert)
    wait_until(lambda: _tls_echo_works(client, scp.tls_port), 20, "the slot given back")


def _tls_echo_works(context: ssl.SSLContext, port: int) -> bool:
    """A C-ECHO over TLS by pynetdicom (a real DICOM TLS client): Success or not."""
    from pynetdicom import AE

    ae = AE("ECHO_TLS")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, port, ae_title=ROUTER_AE, tls_args=(context, "localhost"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.mark.e2e
def test_a_plain_port_and_a_tls_port_serve_side_by_side(start_ingest, site):
    """With router.tls the plain port keeps serving (echoscu) and the TLS port takes TLS."""
    scp = start_ingest(tls=_ingest_tls(site, require_client_cert=False))
    assert scp.tls_port not in (None, scp.port)
    assert echoscu(LOOPBACK, scp.port, called_ae=ROUTER_AE).returncode == 0
    assert _tls_echo_works(ssl.create_default_context(cafile=site.cert), scp.tls_port)


def test_a_renewed_certificate_is_read_without_a_restart_and_one_near_expiry_is_a_warning(site, tmp_path, caplog):
    """Reloading builds the context again when the files change; a certificate that
    expires within 30 days says so at WARNING, with its date. (Pure file logic: no peer.)"""
    short = site.issue("router", days=10)
    settings = IngestTLSSettings(cert_file=short.cert, key_file=short.key, ca_file=site.cert)
    with caplog.at_level(logging.WARNING, logger="router.kernel.tls"):
        files = tls.Reloading(tls.server_context, settings, "router.tls")
    assert any("expires" in r.getMessage() and str(short.cert) in r.getMessage() for r in caplog.records)
    first = files.context()
    assert files.context() is first  # unchanged files: the same context
    renewed = site.issue("renewed", days=365)
    time.sleep(0.01)  # a distinct mtime on file systems with coarse timestamps
    shutil.copyfile(renewed.cert, short.cert)
    shutil.copyfile(renewed.key, short.key)
    os.utime(short.cert)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="router.kernel.tls"):
        second = files.context()
    assert second is not first
    assert any("re-read" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


def test_the_expiry_of_each_own_certificate_is_a_metric(site, tmp_path, redis_conn):
    """dicom_router_tls_certificate_expiry_timestamp_seconds{certificate} says when
    router.tls's and a destination's client certificate expire."""
    router = site.issue("router", days=42)
    client = site.issue("client", days=7)
    config = Config(
        router={"tls": {"cert_file": router.cert, "key_file": router.key, "ca_file": site.cert}},
        destinations={"pacs": {"ae_title": "PACS", "host": LOOPBACK, "port": 104,
                               "tls": {"ca_file": site.cert, "cert_file": client.cert, "key_file": client.key}}},
    )
    samples = {tuple(s.labels.items()): s.value
               for family in text_string_to_metric_families(exposition(config, redis_conn, Spool(tmp_path)).decode())
               for s in family.samples if s.name == "dicom_router_tls_certificate_expiry_timestamp_seconds"}
    now = time.time()
    assert 41 * 86400 < samples[(("certificate", "router.tls"),)] - now < 43 * 86400
    assert 6 * 86400 < samples[(("certificate", "destinations.pacs.tls"),)] - now < 8 * 86400


CONFIG = """\
router:
  ae_title: DICOM_ROUTER
  spool_dir: ./spool
  redis_url: redis://127.0.0.1:1/0
  tls:
    port: {port}
    cert_file: {cert}
    key_file: {key}
{extra}destinations:
  pacs: {{ae_title: PACS, host: 127.0.0.1, port: 104, tls: {{ca_file: {ca}}}}}
rules:
  - name: all
    when: {{}}
    forward: [pacs]
"""


@pytest.mark.parametrize("case", ["no ca_file for require_client_cert", "missing key", "key of another certificate",
                                  "destination ca_file missing"])
def test_tls_settings_that_cannot_work_are_refused_by_check_with_file_and_line(site, tmp_path, case):
    """check names the file, the line and why: require_client_cert without a CA to
    verify callers by, a key file that is not there or not the certificate's, a
    destination's CA file that is not there. (The command line alone: nothing starts.)"""
    router = site.issue("router")
    other = site.issue("other")
    fields = {"port": free_port(), "cert": router.cert, "key": router.key, "ca": site.cert,
              "extra": f"    ca_file: {site.cert}\n"}
    if case == "no ca_file for require_client_cert":
        fields["extra"] = ""
    elif case == "missing key":
        fields["key"] = tmp_path / "nowhere.key"
    elif case == "key of another certificate":
        fields["key"] = other.key
    else:
        fields["ca"] = tmp_path / "nowhere-ca.crt"
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.format(**fields))
    shown = subprocess.run([sys.executable, "-m", "router", "check", "-c", str(config)], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    said = shown.stdout + shown.stderr
    line = {"no ca_file for require_client_cert": 6, "missing key": 8, "key of another certificate": 5,
            "destination ca_file missing": 11}[case]
    assert f"{config}:{line}:" in said, said
    assert {"no ca_file for require_client_cert": "require_client_cert needs ca_file",
            "missing key": "cannot read", "key of another certificate": "do not make a TLS context",
            "destination ca_file missing": "nowhere-ca.crt"}[case] in said, said
