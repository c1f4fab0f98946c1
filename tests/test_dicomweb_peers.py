"""The DICOMweb peers themselves, no router involved: Orthanc's STOW-RS behind
HTTP Basic, the OAuth2 token server, and the bearer-token proxy with its modes,
all driven over the wire with ``requests`` and real files from pydicom."""

from __future__ import annotations

import email.parser
import email.policy
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from router.kernel.status import Status
from tests import data
from tests.dicomweb_servers import mint_token, token_claims, verify_token
from tests.stow_rs import (
    DICOM_JSON,
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    REFERENCED_SOP_CLASS_UID,
    REFERENCED_SOP_INSTANCE_UID,
    REFERENCED_SOP_SEQUENCE,
    parse_related,
    sequence_uids,
    stow_body,
)

pytestmark = pytest.mark.e2e

# Explicit VR LE CT and MR, JPEG 2000 and RLE Lossless: compressed parts must cross intact.
SOURCES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """Fresh copies of SOURCES: each test's instances have UIDs of their own."""
    return data.fresh_copies([get_testdata_file(name) for name in SOURCES], tmp_path / "files")


@pytest.fixture
def chain(orthanc_web, token_server, auth_proxy):
    """Build token server, OrthancWeb and proxy: ``chain(ttl=300, **AuthProxy kwargs)``."""

    def make(ttl: int = 300, **proxy_kwargs) -> SimpleNamespace:
        orthanc = orthanc_web()
        tokens = token_server(ttl=ttl)
        proxy = auth_proxy(orthanc, tokens, **proxy_kwargs)
        return SimpleNamespace(orthanc=orthanc, tokens=tokens, proxy=proxy)

    return make


def stow(base_url: str, files, headers: dict | None = None, client=requests, **kwargs) -> requests.Response:
    """POST ``files`` as one STOW-RS request to ``base_url``/studies (``client``: a
    ``requests.Session`` to send them on one kept-alive connection)."""
    body, content_type = stow_body(files)
    return client.post(f"{base_url}/studies", data=body, timeout=60,
                       headers={"Content-Type": content_type, "Accept": DICOM_JSON, **(headers or {})},
                       **kwargs)


def token(tokens, **form) -> str:
    """A fresh access token from the token server (client_secret_basic)."""
    answer = requests.post(tokens.url, data={"grant_type": "client_credentials", **form},
                           auth=(tokens.client_id, tokens.client_secret), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def bearer(access_token: str) -> dict:
    return {"Authorization": f"Bearer {access_token}"}


def uids_of(files) -> list[str]:
    return [data.sop_instance_uid(f) for f in files]


def failures(answer: dict) -> dict[str, tuple[str, int]]:
    """SOP Instance UID -> (SOP Class UID, Failure Reason) of a FailedSOPSequence."""
    items = answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    return {item[REFERENCED_SOP_INSTANCE_UID]["Value"][0]:
            (item[REFERENCED_SOP_CLASS_UID]["Value"][0], item[FAILURE_REASON]["Value"][0])
            for item in items}


def test_multipart_parser_agrees_with_the_email_package_on_real_files(files):
    """Our multipart/related parser finds the bytes of each real file, as the stdlib email parser does."""
    body, content_type = stow_body(files, transfer_syntax_param=True)
    unquoted = content_type.replace('boundary="', "boundary=").rstrip('"')
    with_preamble = b"a preamble to ignore\r\n" + body
    for ct, raw in ((content_type, body), (unquoted, body), (content_type, with_preamble)):
        ours = parse_related(raw, ct)
        theirs = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ct}\r\n\r\n".encode() + raw)
        assert [p.content for p in ours] == [f.read_bytes() for f in files]
        assert [p.content for p in ours] == [p.get_payload(decode=True) for p in theirs.iter_parts()]
        assert [p.header("content-type") for p in ours] == [
            f"application/dicom; transfer-syntax={data.transfer_syntax(f)}" for f in files]


def test_orthanc_web_stores_stow_rs_with_basic_auth(orthanc_web, files):
    """STOW-RS of four real files with Basic auth: 200, each referenced, each stored and found by QIDO-RS."""
    orthanc = orthanc_web()
    answer = stow(orthanc.dicomweb_url, files, auth=orthanc.credentials)
    assert answer.status_code == 200, answer.text
    assert sorted(sequence_uids(answer.json(), REFERENCED_SOP_SEQUENCE)) == sorted(uids_of(files))
    assert failures(answer.json()) == {}
    assert set(orthanc.sop_instance_uids()) == set(uids_of(files))
    qido = requests.get(f"{orthanc.dicomweb_url}/instances", auth=orthanc.credentials,
                        headers={"Accept": DICOM_JSON}, timeout=10)
    assert qido.status_code == 200
    assert {item["00080018"]["Value"][0] for item in qido.json()} == set(uids_of(files))


def test_orthanc_web_refuses_a_wrong_password(orthanc_web, files):
    """A wrong password is 401 and stores nothing; no credentials are 401 too."""
    orthanc = orthanc_web()
    assert stow(orthanc.dicomweb_url, files, auth=(orthanc.username, "wrong")).status_code == 401
    assert stow(orthanc.dicomweb_url, files).status_code == 401
    assert orthanc.instance_count() == 0


def test_orthanc_web_restarts_on_its_ports_with_its_instances(orthanc_web, files):
    """stop() then start(): the same ports, the stored instances still there, STOW-RS still works."""
    orthanc = orthanc_web()
    assert stow(orthanc.dicomweb_url, files[:2], auth=orthanc.credentials).status_code == 200
    ports = (orthanc.dicom_port, orthanc.http_port)
    orthanc.stop()
    orthanc.start()
    assert (orthanc.dicom_port, orthanc.http_port) == ports
    assert set(orthanc.sop_instance_uids()) == set(uids_of(files[:2]))
    assert stow(orthanc.dicomweb_url, files[2:], auth=orthanc.credentials).status_code == 200
    assert set(orthanc.sop_instance_uids()) == set(uids_of(files))


def test_token_server_grants_tokens_to_basic_and_post_clients(token_server):
    """client_secret_basic and client_secret_post each get a Bearer token lasting ttl; both counted."""
    tokens = token_server(ttl=3)
    by_basic = requests.post(tokens.url, data={"grant_type": "client_credentials", "scope": "stow"},
                             auth=(tokens.client_id, tokens.client_secret), timeout=10)
    by_post = requests.post(tokens.url, data={"grant_type": "client_credentials",
                                              "client_id": tokens.client_id,
                                              "client_secret": tokens.client_secret}, timeout=10)
    for answer in (by_basic, by_post):
        assert answer.status_code == 200, answer.text
        assert answer.headers["Cache-Control"] == "no-store"
        body = answer.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] == 3
        claims = verify_token(tokens.signing_key, body["access_token"])
        assert claims["sub"] == tokens.client_id
    assert by_basic.json()["scope"] == "stow"
    assert tokens.token_requests() == 2
    assert [r["client_auth"] for r in tokens.token_log()] == ["client_secret_basic", "client_secret_post"]


def test_token_server_refuses_a_wrong_secret(token_server):
    """A wrong secret or client is 401 invalid_client, another grant 400; all counted."""
    tokens = token_server()
    wrong_basic = requests.post(tokens.url, data={"grant_type": "client_credentials"},
                                auth=(tokens.client_id, "wrong"), timeout=10)
    wrong_post = requests.post(tokens.url, data={"grant_type": "client_credentials",
                                                 "client_id": "stranger",
                                                 "client_secret": tokens.client_secret}, timeout=10)
    for answer in (wrong_basic, wrong_post):
        assert answer.status_code == 401
        assert answer.json() == {"error": "invalid_client"}
        assert "access_token" not in answer.text
    password_grant = requests.post(tokens.url, data={"grant_type": "password"},
                                   auth=(tokens.client_id, tokens.client_secret), timeout=10)
    assert password_grant.status_code == 400
    assert password_grant.json() == {"error": "unsupported_grant_type"}
    assert tokens.token_requests() == 3
    assert [r["status"] for r in tokens.token_log()] == [401, 401, 400]


def test_proxy_forwards_stow_rs_with_a_valid_token(chain, files):
    """Through the proxy with a token: 200, stored in Orthanc, QIDO-RS answered, the request logged."""
    peers = chain()
    access = token(peers.tokens)
    answer = stow(peers.proxy.dicomweb_url, files, headers=bearer(access))
    assert answer.status_code == 200, answer.text
    assert sorted(sequence_uids(answer.json(), REFERENCED_SOP_SEQUENCE)) == sorted(uids_of(files))
    # Orthanc's Retrieve URLs name the proxy: the client's Host went along.
    assert answer.json()["00081190"]["Value"][0].startswith(peers.proxy.dicomweb_url)
    assert set(peers.orthanc.sop_instance_uids()) == set(uids_of(files))
    qido = requests.get(f"{peers.proxy.dicomweb_url}/instances", timeout=10,
                        headers={"Accept": DICOM_JSON, **bearer(access)})
    assert qido.status_code == 200 and len(qido.json()) == len(files)
    stow_record, qido_record = peers.proxy.requests()
    assert stow_record["parts"] == len(files) and stow_record["sop_instance_uids"] == uids_of(files)
    assert stow_record["status"] == 200 and stow_record["auth"] == "ok"
    assert stow_record["token_id"] == token_claims(access)["jti"]
    assert (qido_record["method"], qido_record["status"]) == ("GET", 200)


def test_proxy_takes_a_chunked_stow_body_to_a_study_url(chain, files):
    """A chunked body (no Content-Length) POSTed to /studies/{uid} is read whole and forwarded."""
    peers = chain()
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    body, content_type = stow_body(files[:1])
    pieces = (body[i:i + 4096] for i in range(0, len(body), 4096))
    answer = requests.post(f"{peers.proxy.dicomweb_url}/studies/{study}", data=pieces, timeout=60,
                           headers={"Content-Type": content_type, **bearer(token(peers.tokens))})
    assert answer.status_code == 200, answer.text
    assert set(peers.orthanc.sop_instance_uids()) == set(uids_of(files[:1]))
    assert peers.proxy.requests()[0]["path"] == f"/dicom-web/studies/{study}"


def test_proxy_refuses_missing_forged_and_expired_tokens(chain, files):
    """No token, a forged or altered token, or an expired one: 401 with a Bearer challenge, nothing stored."""
    peers = chain(ttl=2)
    access = token(peers.tokens)
    assert stow(peers.proxy.dicomweb_url, files[:1], headers=bearer(access)).status_code == 200

    missing = stow(peers.proxy.dicomweb_url, files[1:])
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    forged = mint_token("00" * 32, peers.tokens.client_id, ttl=300)
    signature = access.partition(".")[2]
    altered = f"{mint_token(peers.tokens.signing_key, 'x', 300).partition('.')[0]}.{signature}"
    for bad in (forged, altered, "not-a-token"):
        refused = stow(peers.proxy.dicomweb_url, files[1:], headers=bearer(bad))
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    time.sleep(max(0.0, token_claims(access)["exp"] - time.time()) + 0.1)
    expired = stow(peers.proxy.dicomweb_url, files[1:], headers=bearer(access))
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]

    assert set(peers.orthanc.sop_instance_uids()) == set(uids_of(files[:1]))
    assert [r["auth"] for r in peers.proxy.requests()] == [
        "ok", "missing", "bad signature", "bad signature", "malformed", "expired"]
    assert [r["status"] for r in peers.proxy.requests()] == [200, 401, 401, 401, 401, 401]


def test_proxy_fails_chosen_instances_with_202(chain, files):
    """fail_uids: 202 naming exactly those, with class and reason, in FailedSOPSequence; the others stored."""
    uids = uids_of(files)
    peers = chain(fail_uids=[uids[0]], failure_reason=Status.OUT_OF_RESOURCES)
    peers.proxy.fail([uids[2]], reason=Status.CANNOT_UNDERSTAND)
    access = token(peers.tokens)

    answer = stow(peers.proxy.dicomweb_url, files, headers=bearer(access))
    assert answer.status_code == 202, answer.text
    assert answer.headers["Content-Type"] == DICOM_JSON
    classes = {data.sop_instance_uid(f): str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
               for f in files}
    assert failures(answer.json()) == {
        uids[0]: (classes[uids[0]], Status.OUT_OF_RESOURCES),
        uids[2]: (classes[uids[2]], Status.CANNOT_UNDERSTAND),
    }
    assert sorted(sequence_uids(answer.json(), REFERENCED_SOP_SEQUENCE)) == sorted([uids[1], uids[3]])
    assert set(peers.orthanc.sop_instance_uids()) == {uids[1], uids[3]}
    assert peers.proxy.modes()["fail_uids"] == {}
    assert peers.proxy.requests()[0]["failed"] == sorted([uids[0], uids[2]])

    again = stow(peers.proxy.dicomweb_url, [files[0], files[2]], headers=bearer(access))
    assert again.status_code == 200, again.text
    assert set(peers.orthanc.sop_instance_uids()) == set(uids)


def test_proxy_answers_409_when_every_instance_fails(chain, files):
    """Every instance failing: 409 with all in FailedSOPSequence, none referenced, Orthanc untouched."""
    uids = uids_of(files)
    peers = chain()
    peers.proxy.fail(uids, reason=Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, times=None)
    access = token(peers.tokens)
    for _ in range(2):
        answer = stow(peers.proxy.dicomweb_url, files, headers=bearer(access))
        assert answer.status_code == 409, answer.text
        assert set(failures(answer.json())) == set(uids)
        assert {reason for _, reason in failures(answer.json()).values()} == {
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS}
        assert sequence_uids(answer.json(), REFERENCED_SOP_SEQUENCE) == []
    assert peers.orthanc.instance_count() == 0
    peers.proxy.clear()
    assert stow(peers.proxy.dicomweb_url, files, headers=bearer(access)).status_code == 200


def test_proxy_answers_a_fixed_status_until_cleared(chain, files):
    """Status mode: 503 from the start, then 429 with Retry-After, then 500 once; nothing
    forwarded until cleared; all on one kept-alive connection."""
    peers = chain(status=503)
    access = token(peers.tokens)
    url = peers.proxy.dicomweb_url
    with requests.Session() as client:
        assert stow(url, files, headers=bearer(access), client=client).status_code == 503
        assert stow(url, files, client=client).status_code == 401  # the token is checked first
        peers.proxy.answer_stow_with(429, retry_after=7)
        throttled = stow(url, files, headers=bearer(access), client=client)
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
        assert peers.orthanc.instance_count() == 0

        peers.proxy.clear_status()
        assert stow(url, files[:2], headers=bearer(access), client=client).status_code == 200
        peers.proxy.answer_stow_with(500, times=1)
        assert stow(url, files[2:], headers=bearer(access), client=client).status_code == 500
        assert stow(url, files[2:], headers=bearer(access), client=client).status_code == 200
    assert set(peers.orthanc.sop_instance_uids()) == set(uids_of(files))
    assert [r["status"] for r in peers.proxy.stow_requests()] == [503, 401, 429, 200, 500, 200]
    assert all(r["parts"] in (2, 4) for r in peers.proxy.stow_requests() if r["status"] != 401)


def test_proxy_keeps_its_port_and_modes_across_a_restart(chain, files):
    """stop() then start(): the same port, the modes last set, tokens still honoured."""
    peers = chain()
    peers.proxy.answer_stow_with(503)
    port = peers.proxy.port
    peers.proxy.stop()
    peers.proxy.start()
    assert peers.proxy.port == port
    access = token(peers.tokens)
    assert stow(peers.proxy.dicomweb_url, files, headers=bearer(access)).status_code == 503
    peers.proxy.clear()
    assert stow(peers.proxy.dicomweb_url, files, headers=bearer(access)).status_code == 200
