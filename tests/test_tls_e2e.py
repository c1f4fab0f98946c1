"""DICOM TLS (PS3.15 Annex B, docs/guarantees.md §8) against real peers: DCMTK's
storescu and storescp with ``+tls`` (BCP 195 profile) and Orthanc with
``DicomTlsEnabled``, as modalities and as destinations of ``dicom-router run``.

Every certificate comes from a PKI the test makes (``tests/pki.py``); a
second CA makes the certificates nobody should trust.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from tests import data
from tests.peers import LOOPBACK, free_port, peer_env, storescu, wait_until
from tests.pki import Authority
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

SUCCESS = "Received Store Response (Success)"


@pytest.fixture
def pki(tmp_path: Path):
    """The site's CA and what it signed, and a foreign CA with a certificate of its own."""
    site = Authority(tmp_path / "pki", "site-ca")
    foreign = Authority(tmp_path / "pki-foreign", "foreign-ca")
    return {
        "ca": site.cert,
        "router": site.issue("router"),
        "pacs": site.issue("pacs"),
        "ct1": site.issue("ct1", ("ct1.example.org",)),
        "mr1": site.issue("mr1", ("mr1.example.org",)),
        "foreign_ca": foreign.cert,
        "intruder": foreign.issue("intruder", ("ct1.example.org", "127.0.0.1", "localhost")),
    }


def _dcmtk_tls(issued, ca: Path) -> list[str]:
    """DCMTK's options for TLS with ``issued`` as its certificate, trusting ``ca``, BCP 195."""
    return ["+tls", str(issued.key), str(issued.cert), "-pw", "+cf", str(ca), "+px"]


def _router_tls(pki, port: int, **extra) -> dict:
    return {"port": port, "cert_file": str(pki["router"].cert), "key_file": str(pki["router"].key),
            "ca_file": str(pki["ca"]), "require_client_cert": True, **extra}


def _start(tmp_path: Path, config: dict) -> RouterProcess:
    router = RouterProcess(tmp_path, config, log_level="INFO").start()
    wait_until(lambda: "with DICOM TLS" in router.log_text(), 30, "the router listening with DICOM TLS")
    return router


def _queues(router: RouterProcess) -> dict:
    shown = subprocess.run([sys.executable, "-m", "router", "queues", "-c", str(router.config_path), "--json"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_instances_travel_over_tls_both_ways_with_mutual_authentication(tmp_path, redis_url, pki,
                                                                        storescp_factory, ct_series):
    """storescu (a client certificate of the site's CA) sends to the router's TLS port;
    the router forwards over TLS, with its own certificate, to a storescp that requires
    one: every instance arrives, byte for byte."""
    pacs = storescp_factory(ae_title="PACS", extra_args=_dcmtk_tls(pki["pacs"], pki["ca"]))
    tls_port = free_port()
    dest = destination(pacs.port, "PACS", tls={"ca_file": str(pki["ca"]), "cert_file": str(pki["router"].cert),
                                               "key_file": str(pki["router"].key)})
    config = router_config(tmp_path, {"pacs": dest}, redis_url=redis_url, tls=_router_tls(pki, tls_port))
    files = ct_series(5, size_kib=64)
    router = _start(tmp_path, config)
    try:
        sent = storescu(LOOPBACK, tls_port, files, called_ae=ROUTER_AE, calling_ae="CT_1",
                        extra_args=_dcmtk_tls(pki["ct1"], pki["ca"]))
        assert sent.stdout.count(SUCCESS) == 5, sent.stdout[-3000:]
        received = pacs.wait_for_files(5, timeout=60)
    finally:
        router.stop()
    by_uid = {data.sop_instance_uid(path): path for path in received}
    for path in files:
        uid = data.sop_instance_uid(path)
        assert data.dataset_bytes_after_meta(by_uid[uid]) == data.dataset_bytes_after_meta(path), uid


def test_plaintext_and_a_certificate_of_another_ca_never_reach_dimse(tmp_path, redis_url, pki, storescp_factory,
                                                                      ct_series):
    """A plaintext association to the TLS port, and a TLS client whose certificate the
    router's CA did not sign, fail the handshake: no association, nothing spooled; the
    plain port still serves."""
    pacs = storescp_factory(ae_title="PACS")
    tls_port = free_port()
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url,
                           tls=_router_tls(pki, tls_port))
    files = ct_series(2, size_kib=16)
    router = _start(tmp_path, config)
    try:
        plain = storescu(LOOPBACK, tls_port, files, called_ae=ROUTER_AE, calling_ae="CT_1", timeout=120)
        foreign = storescu(LOOPBACK, tls_port, files, called_ae=ROUTER_AE, calling_ae="CT_1", timeout=120,
                           extra_args=_dcmtk_tls(pki["intruder"], pki["ca"]))
        assert "Association Accepted" not in plain.stdout and SUCCESS not in plain.stdout, plain.stdout
        assert "Association Accepted" not in foreign.stdout and SUCCESS not in foreign.stdout, foreign.stdout
        wait_until(lambda: router.log_text().count("TLS handshake from 127.0.0.1 failed") >= 2, 30,
                   "both failed handshakes in the router's log")
        assert "association from" not in router.log_text()
        assert not list((router.spool / "incoming").glob("*")) and not list((router.spool / "out").rglob("*.dcm"))
        ok = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="CT_1")
        assert ok.stdout.count(SUCCESS) == 2, ok.stdout[-2000:]
        pacs.wait_for_files(2, timeout=60)
    finally:
        router.stop()


def test_a_destination_whose_certificate_does_not_verify_is_held_and_gets_nothing(tmp_path, redis_url, pki,
                                                                                   storescp_factory, ct_series):
    """A TLS destination presenting a certificate of a CA the router does not trust is
    held with that reason (queues says it); nothing reaches it, in the clear or
    otherwise, and every instance waits in the spool."""
    pacs = storescp_factory(ae_title="PACS", extra_args=_dcmtk_tls(pki["intruder"], pki["foreign_ca"]) + ["-ic"])
    dest = destination(pacs.port, "PACS", tls={"ca_file": str(pki["ca"])},
                       retry={"max_attempts": 100, "backoff_seconds": [1.0], "jitter": 0.1})
    config = router_config(tmp_path, {"pacs": dest}, redis_url=redis_url)
    files = ct_series(3, size_kib=16)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="CT_1")
        assert sent.stdout.count(SUCCESS) == 3, sent.stdout[-2000:]
        wait_until(lambda: "does not verify" in router.log_text(), 60, "the refused certificate in the log")
        row = wait_until(lambda: next((d for d in _queues(router)["destinations"]
                                       if d["name"] == "pacs" and "does not verify" in json.dumps(d)), None),
                         60, "queues naming the certificate as the reason")
        assert row is not None
        assert len(list((router.spool / "out" / "pacs").glob("*.dcm"))) == 3
    assert pacs.files() == []
    assert "Association Received" not in pacs.log_text()


def test_an_ae_title_bound_to_a_certificate_is_refused_without_that_certificate(tmp_path, redis_url, pki,
                                                                                 storescp_factory, ct_series):
    """``accept.calling_ae_titles`` names CT_1 with the identity ct1.example.org: CT_1 with
    that certificate is accepted; CT_1 on the plain port, or with a certificate for
    another identity from the same CA, gets A-ASSOCIATE-RJ; a title without an
    identity is accepted on either port."""
    pacs = storescp_factory(ae_title="PACS")
    tls_port = free_port()
    accept = {"calling_ae_titles": [{"ae_title": "CT_1", "tls_identity": "ct1.example.org"}, "US_2"]}
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url,
                           tls=_router_tls(pki, tls_port), accept=accept)
    files = ct_series(1, size_kib=16)
    router = _start(tmp_path, config)
    try:
        right = storescu(LOOPBACK, tls_port, files, called_ae=ROUTER_AE, calling_ae="CT_1",
                         extra_args=_dcmtk_tls(pki["ct1"], pki["ca"]))
        plain = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="CT_1")
        other = storescu(LOOPBACK, tls_port, files, called_ae=ROUTER_AE, calling_ae="CT_1",
                         extra_args=_dcmtk_tls(pki["mr1"], pki["ca"]))
        unbound = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="US_2")
    finally:
        router.stop()
    assert SUCCESS in right.stdout, right.stdout[-2000:]
    assert SUCCESS in unbound.stdout, unbound.stdout[-2000:]
    for refused in (plain, other):
        assert "Association Rejected" in refused.stdout and SUCCESS not in refused.stdout, refused.stdout
    log = router.log_text()
    assert "must present a TLS certificate for ct1.example.org, it presented no TLS certificate" in log
    assert "it presented a certificate for ['mr1', 'mr1.example.org']" in log


def _orthanc_tls(pki, issued) -> dict:
    return {"DicomTlsEnabled": True, "DicomTlsCertificate": str(issued.cert),
            "DicomTlsPrivateKey": str(issued.key), "DicomTlsTrustedCertificates": str(pki["ca"]),
            "DicomTlsRemoteCertificateRequired": True}


def test_orthanc_sends_over_tls_and_receives_over_tls(tmp_path, redis_url, pki, orthanc_factory, small_series):
    """Orthanc as a TLS modality (``UseDicomTls`` toward the router's TLS port) and
    another Orthanc as a TLS destination requiring the router's certificate: every
    instance arrives, under its own SOP Instance UID."""
    tls_port = free_port()
    archive = orthanc_factory(ae_title="ARCHIVE", config=_orthanc_tls(pki, pki["pacs"]))
    modality = orthanc_factory(ae_title="ORTHANC_CT", config={
        **_orthanc_tls(pki, pki["ct1"]),
        "DicomModalities": {"router": {"AET": ROUTER_AE, "Host": LOOPBACK, "Port": tls_port, "UseDicomTls": True}},
    })
    dest = destination(archive.dicom_port, "ARCHIVE", tls={"ca_file": str(pki["ca"]),
                                                            "cert_file": str(pki["router"].cert),
                                                            "key_file": str(pki["router"].key)})
    config = router_config(tmp_path, {"archive": dest}, redis_url=redis_url, tls=_router_tls(pki, tls_port))
    files = small_series(4)
    ids = [modality.post("/instances", f.read_bytes())["ID"] for f in files]
    router = _start(tmp_path, config)
    try:
        modality.post("/modalities/router/store", {"Resources": ids, "Synchronous": True})
        archive.wait_for_instances(4, timeout=60)
    finally:
        router.stop()
    held = {archive.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in archive.rest("/instances")}
    assert held == {data.sop_instance_uid(f) for f in files}


def test_query_and_retrieve_over_tls_end_to_end(tmp_path, redis_url, pki, orthanc_factory, storescp_factory,
                                                 small_series):
    """Every hop on DICOM TLS with certificates both ways: findscu and a C-MOVE to the
    router's TLS port, the router asks Orthanc (a TLS source) and Orthanc sends the
    sub-operations back to the router's TLS port, the router sends them on to a
    storescp that requires its certificate (the Move Destination's ``tls``)."""
    tls_port = free_port()
    source = orthanc_factory(ae_title="ARCHIVE", config={
        **_orthanc_tls(pki, pki["pacs"]),
        "DicomModalities": {"router": {"AET": ROUTER_AE, "Host": LOOPBACK, "Port": tls_port, "UseDicomTls": True}},
    })
    viewer = storescp_factory(ae_title="VIEWER", extra_args=_dcmtk_tls(pki["pacs"], pki["ca"]))
    router_cert = {"ca_file": str(pki["ca"]), "cert_file": str(pki["router"].cert),
                   "key_file": str(pki["router"].key)}
    config = router_config(tmp_path, {"archive": destination(source.dicom_port, "ARCHIVE", tls=router_cert)},
                           rules=[], redis_url=redis_url, tls=_router_tls(pki, tls_port))
    config["query_retrieve"] = {"sources": ["archive"]}
    config["modalities"] = {"VIEWER": {"host": LOOPBACK, "port": viewer.port, "tls": router_cert}}
    files = small_series(3)
    for path in files:
        source.post("/instances", path.read_bytes())
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    caller_tls = _dcmtk_tls(pki["ct1"], pki["ca"])
    router = RouterProcess(tmp_path, config, command="ingest", log_level="INFO").start()  # Q/R lives there
    wait_until(lambda: "with DICOM TLS" in router.log_text(), 30, "the router listening with DICOM TLS")
    try:
        out = tmp_path / "found"
        out.mkdir()
        found = subprocess.run(["findscu", "-S", "-aec", ROUTER_AE, *caller_tls, "-X", "-od", str(out),
                                "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                                "-k", "SOPInstanceUID", LOOPBACK, str(tls_port)],
                               capture_output=True, text=True, env=peer_env(), timeout=120)
        assert found.returncode == 0, found.stderr[-2000:]
        assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.glob("rsp*")} == \
            {data.sop_instance_uid(f) for f in files}
        # DCMTK 3.6.7's movescu has no TLS: a pynetdicom caller with the same certificate.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        context.load_cert_chain(str(pki["ct1"].cert), str(pki["ct1"].key))
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(LOOPBACK, tls_port, ae_title=ROUTER_AE, tls_args=(context, "127.0.0.1"))
        assert assoc.is_established
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study
            final = list(assoc.send_c_move(query, "VIEWER", StudyRootQueryRetrieveInformationModelMove))[-1][0]
        finally:
            assoc.release()
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
        received = viewer.wait_for_files(3, timeout=60)
    finally:
        router.stop()
    assert {data.sop_instance_uid(p) for p in received} == {data.sop_instance_uid(f) for f in files}
