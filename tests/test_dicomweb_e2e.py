"""DICOMweb destinations end to end: the router sends by STOW-RS (``dicomweb:``) to
Orthanc with its DICOMweb plugin behind HTTP Basic, or behind an authenticating
proxy that wants OAuth2 bearer tokens from a token endpoint (tests/dicomweb_peers.py);
DCMTK's storescu is the modality, the router runs as real processes with a real
Redis (README, "DICOMweb destinations")."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest

from router.kernel.status import Status
from tests import data
from tests.peers import LOOPBACK, storescu, storescu_groups, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

PASSWORD_ENV = "TEST_STOW_PASSWORD"
SECRET_ENV = "TEST_OAUTH_SECRET"
PATIENT = {"max_attempts": 100, "backoff_seconds": [0.5, 1.0], "jitter": 0.1}  # held, never a dead letter
QUICK = {"max_attempts": 3, "backoff_seconds": [0.3, 0.6], "jitter": 0.1}


def _web(url: str, retry: dict = PATIENT, **dicomweb) -> dict:
    return {"dicomweb": {"url": url, **dicomweb}, "retry": retry, "instance_retry": QUICK,
            "echo_interval_seconds": 0}


def _basic(orthanc) -> dict:
    return _web(orthanc.dicomweb_url, username=orthanc.credentials[0], password_env=PASSWORD_ENV)


def _send(router: RouterProcess, files) -> set[str]:
    """storescu sends ``files``; the SOP Instance UIDs the router answered Success for (all of them)."""
    result = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="MODALITY")
    assert result.returncode == 0, result.stdout[-2000:]
    return {data.sop_instance_uid(f) for f in files}


def _cli(router: RouterProcess, command: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "router", command, "-c", str(router.config_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _queues(router: RouterProcess) -> dict:
    return json.loads(_cli(router, "queues", "--json").stdout)


def _row(router: RouterProcess, name: str = "web") -> dict:
    return next(d for d in _queues(router)["destinations"] if d["name"] == name)


def _spool(router: RouterProcess, state: str) -> list:
    folder = router.spool / state
    return sorted(folder.rglob("*.dcm")) if folder.exists() else []


def test_real_files_of_every_syntax_arrive_with_the_same_uids_and_dataset(tmp_path, redis_url, real_files,
                                                                          orthanc_web, monkeypatch):
    """Every real file of the test packages that storescu sends as it is goes by STOW-RS,
    HTTP Basic, to Orthanc and is there with its SOP Instance UID, its transfer syntax
    and the same data set; the spool empties."""
    orthanc = orthanc_web()
    monkeypatch.setenv(PASSWORD_ENV, orthanc.credentials[1])
    config = router_config(tmp_path, {"web": _basic(orthanc)}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        outcomes, _ = storescu_groups(LOOPBACK, router.port, real_files, called_ae=ROUTER_AE, calling_ae="MODALITY")
        sent = {data.sop_instance_uid(p): p for p, o in outcomes.items() if o.stored}
        assert len(sent) >= 50, f"only {len(sent)} of {len(real_files)} real files were taken by the router"
        wait_until(lambda: set(sent) <= set(orthanc.sop_instance_uids()), 180,
                   f"the {len(sent)} instances at Orthanc")
        wait_until(lambda: not _spool(router, "out"), 60, "the spool to empty")
        assert not _spool(router, "dead")
    by_uid = orthanc.sop_instance_uids()
    syntaxes = set()
    for uid, path in sent.items():
        got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(by_uid[uid])))
        want = pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID, path.name
        assert got == want, f"{path.name}: the data set changed on the way"
        syntaxes.add(str(want.file_meta.TransferSyntaxUID))
    assert len(syntaxes) >= 8, f"only {len(syntaxes)} transfer syntaxes among the files sent"


def test_a_generated_series_is_transcoded_when_the_destination_asks_for_it(tmp_path, redis_url, ct_series,
                                                                          orthanc_web, monkeypatch):
    """``transfer_syntaxes: [jpeg-ls-lossless]``: each instance goes as a whole file in JPEG-LS
    lossless, same UIDs, the same pixels once decoded; requests of 4 instances at most."""
    orthanc = orthanc_web()
    monkeypatch.setenv(PASSWORD_ENV, orthanc.credentials[1])
    files = ct_series(10, size_kib=64)
    web = _basic(orthanc)
    web["transfer_syntaxes"] = ["jpeg-ls-lossless"]
    web["dicomweb"]["max_instances"] = 4
    config = router_config(tmp_path, {"web": web}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        uids = _send(router, files)
        wait_until(lambda: uids <= set(orthanc.sop_instance_uids()), 120, "the series at Orthanc")
    by_uid = orthanc.sop_instance_uids()
    for path in files:
        want = pydicom.dcmread(path)
        got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(by_uid[want.SOPInstanceUID])))
        assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
        assert (got.StudyInstanceUID, got.SeriesInstanceUID) == (want.StudyInstanceUID, want.SeriesInstanceUID)
        assert (got.pixel_array == want.pixel_array).all()


def test_orthanc_stopped_for_a_while_loses_nothing(tmp_path, redis_url, ct_series, orthanc_web, monkeypatch):
    """Orthanc stops while instances arrive: the destination is held (the dashboard's row
    says why), nothing is a dead letter, and once Orthanc is back everything arrives."""
    orthanc = orthanc_web()
    monkeypatch.setenv(PASSWORD_ENV, orthanc.credentials[1])
    before, during = ct_series(10, size_kib=32), ct_series(15, size_kib=32)
    config = router_config(tmp_path, {"web": _basic(orthanc)}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        first = _send(router, before)
        wait_until(lambda: first <= set(orthanc.sop_instance_uids()), 60, "the first series at Orthanc")
        orthanc.stop()
        second = _send(router, during)
        row = wait_until(lambda: (r := _row(router))["state"] == "held" and r, 60, "the destination held")
        assert row["last_error"] and "web" in row["last_error"], row
        assert len(_spool(router, "out/web")) == len(during) and not _spool(router, "dead")
        orthanc.start()
        wait_until(lambda: first | second <= set(orthanc.sop_instance_uids()), 120, "everything at Orthanc")
        wait_until(lambda: not _spool(router, "out"), 60, "the spool to empty")
        assert not _spool(router, "dead")


def test_a_wrong_password_delivers_nothing_and_says_401(tmp_path, redis_url, ct_series, orthanc_web, monkeypatch):
    """Orthanc refuses the credentials: nothing is delivered, nothing is a dead letter, the
    destination is held saying 401, and the instances wait in the spool."""
    orthanc = orthanc_web()
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    files = ct_series(5, size_kib=16)
    config = router_config(tmp_path, {"web": _basic(orthanc)}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        _send(router, files)
        row = wait_until(lambda: (r := _row(router))["state"] == "held" and r, 60, "the destination held")
        assert "401" in row["last_error"], row
        assert orthanc.instance_count() == 0
        assert len(_spool(router, "out/web")) == len(files) and not _spool(router, "dead")
        wait_until(lambda: "401 Unauthorized" in router.log_text(), 30, "the log saying 401")  # written after the hold


def test_oauth2_tokens_are_fetched_once_reused_and_renewed(tmp_path, redis_url, ct_series, orthanc_web,
                                                          token_server, auth_proxy, monkeypatch):
    """Through a proxy that wants bearer tokens from a token endpoint (client credentials):
    every request (two instances each at most) on one token, fetched once; a 4 s token is renewed before it expires (the
    periodic health check keeps using it, every second), never used expired; a token the
    proxy no longer takes (proxy and endpoint restarted with a new key) is renewed once on
    its 401 and the instances still arrive."""
    orthanc = orthanc_web()
    tokens = token_server(ttl=4)
    proxy = auth_proxy(orthanc, tokens)
    monkeypatch.setenv(SECRET_ENV, "router-secret")
    oauth = {"token_url": tokens.url, "client_id": "router", "client_secret_env": SECRET_ENV, "scope": "stow"}
    web = _web(proxy.dicomweb_url, oauth2=oauth, max_instances=2)
    web["echo_interval_seconds"] = 1
    config = router_config(tmp_path, {"web": web}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        uids = _send(router, ct_series(10, size_kib=16))
        wait_until(lambda: uids <= set(orthanc.sop_instance_uids()), 60, "the first series at Orthanc")
        stows = [r for r in proxy.stow_requests() if r["status"] == 200]
        # As many requests as the instances' arrival makes batches, two instances each at most.
        assert sum(r["parts"] for r in stows) == 10 and max(r["parts"] for r in stows) == 2, stows
        assert len({r["token_id"] for r in stows}) == 1, stows
        assert tokens.token_requests() == 1
        wait_until(lambda: tokens.token_requests() >= 3, 60, "the token renewed twice by the health checks")
        assert not [r for r in proxy.requests() if r["auth"] != "ok"], "a request without a valid token"
        assert {(t["scope"], t["status"]) for t in tokens.token_log()} == {("stow", 200)}

        # The proxy and the endpoint come back with a new key: the router's token is refused.
        proxy.stop()
        tokens.stop()
        tokens.signing_key = proxy.signing_key = "0f" * 32
        tokens.start()
        proxy.start()
        fetched = tokens.token_requests()
        more = _send(router, ct_series(4, size_kib=16))
        wait_until(lambda: more <= set(orthanc.sop_instance_uids()), 60, "the next series at Orthanc")
        refused = [r for r in proxy.requests() if r["status"] == 401]
        assert refused and all(r["auth"] == "bad signature" for r in refused), refused
        assert tokens.token_requests() > fetched
    assert not _spool(router, "dead") and not _spool(router, "out")


def test_a_partial_success_retries_exactly_the_failed_instances(tmp_path, redis_url, ct_series, orthanc_web,
                                                               token_server, auth_proxy, monkeypatch):
    """The proxy answers 202 with two instances in FailedSOPSequence, 0xA700, once: exactly
    those two are sent again and arrive; a third failed with 0xC000 (cannot understand) is a
    dead letter at once, saying so, never sent again; the others are sent once."""
    orthanc = orthanc_web()
    tokens = token_server()
    files = ct_series(8, size_kib=16)
    uids = [data.sop_instance_uid(f) for f in files]
    proxy = auth_proxy(orthanc, tokens, fail_uids=uids[2:4], failure_reason=Status.OUT_OF_RESOURCES, fail_times=1)
    proxy.fail([uids[5]], reason=Status.CANNOT_UNDERSTAND, times=None)
    monkeypatch.setenv(SECRET_ENV, "router-secret")
    oauth = {"token_url": tokens.url, "client_id": "router", "client_secret_env": SECRET_ENV}
    config = router_config(tmp_path, {"web": _web(proxy.dicomweb_url, oauth2=oauth)}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        _send(router, files)
        wanted = set(uids) - {uids[5]}
        wait_until(lambda: wanted <= set(orthanc.sop_instance_uids()), 60, "all but the refused one at Orthanc")
        wait_until(lambda: _spool(router, "dead/web"), 60, "the refused one a dead letter")
        wait_until(lambda: not _spool(router, "out"), 60, "the spool to empty")
        stows = proxy.stow_requests()
        assert {u for r in stows for u in r.get("failed", [])} == {uids[2], uids[3], uids[5]}, stows
        assert {r["status"] for r in stows if r.get("failed")} <= {202, 409}, stows
        times_sent = {uid: sum(uid in r["sop_instance_uids"] for r in stows) for uid in uids}
        assert {u: n for u, n in times_sent.items() if n != 1} == {uids[2]: 2, uids[3]: 2}, times_sent
        (letter,) = _spool(router, "dead/web")
        reason = json.loads(letter.with_suffix(".json").read_text())
        assert "0xC000" in reason["reason"] and reason["sop_instance_uid"] == uids[5], reason
        assert uids[5] not in orthanc.sop_instance_uids()
        # The journey says it; once the service takes it, `retry` delivers it.
        steps = [(s["step"], s["destination"]) for s in json.loads(
            _cli(router, "journey", uids[5], "--json").stdout)[0]["journey"]]
        assert steps[-1] == ("dead", "web"), steps
        proxy.fail([uids[5]], times=0)
        assert "1" in _cli(router, "retry", "web").stdout
        wait_until(lambda: uids[5] in orthanc.sop_instance_uids(), 60, "the dead letter delivered after retry")
        wait_until(lambda: not _spool(router, "dead") and not _spool(router, "out"), 60, "the spool to empty")
        steps = [s["step"] for s in json.loads(_cli(router, "journey", uids[5], "--json").stdout)[0]["journey"]]
        assert steps[-2:] == ["retried", "sent"], steps
        row = _row(router)
        assert row["delivered"] == len(uids) and row["failed_sends"], row


def test_a_de_identified_copy_goes_by_stow_rs_and_the_pacs_gets_the_original(
        tmp_path, redis_url, ct_series, orthanc_web, storescp_factory, monkeypatch):
    """A rule de-identifies what it sends to the DICOMweb destination: Orthanc holds copies
    without the patient's name or ID, the PACS (storescp) the bytes as sent."""
    orthanc = orthanc_web()
    monkeypatch.setenv(PASSWORD_ENV, orthanc.credentials[1])
    monkeypatch.setenv("DICOM_ROUTER_SECRET", "an-example-secret-of-32-characters!")
    pacs = storescp_factory(ae_title="PACS")
    files = ct_series(4, size_kib=16)
    rules = [{"name": "pacs", "forward": ["pacs"]},
             {"name": "research", "morph": [{"anonymize": {"profile": "basic", "options": ["retain-uids"]}}],
              "forward": ["web"]}]
    config = router_config(tmp_path, {"web": _basic(orthanc), "pacs": destination(pacs.port, "PACS")},
                           rules=rules, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        uids = _send(router, files)
        wait_until(lambda: uids <= set(orthanc.sop_instance_uids()), 60, "the copies at Orthanc")
        assert {data.sop_instance_uid(f) for f in pacs.wait_for_files(len(files))} == uids
    by_uid = orthanc.sop_instance_uids()
    for path in files:
        original = pydicom.dcmread(path)
        copy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(by_uid[original.SOPInstanceUID])))
        assert str(original.PatientName) and str(copy.PatientName) != str(original.PatientName)
        assert copy.get("PatientID", "") != original.PatientID
        assert (copy.pixel_array == original.pixel_array).all()


@pytest.mark.parametrize(("status", "retry_after"), [(503, None), (429, 3)], ids=["503", "429-retry-after"])
def test_a_busy_service_holds_the_destination_and_then_gets_everything(tmp_path, redis_url, ct_series, orthanc_web,
                                                                       token_server, auth_proxy, monkeypatch,
                                                                       status, retry_after):
    """The proxy answers 503 (or 429 with Retry-After: 3) to the first two STOW requests: the
    destination is held (no attempt charged to any instance, for at least Retry-After), then
    everything arrives."""
    orthanc = orthanc_web()
    tokens = token_server()
    proxy = auth_proxy(orthanc, tokens, status=status, retry_after=retry_after, status_times=2)
    monkeypatch.setenv(SECRET_ENV, "router-secret")
    oauth = {"token_url": tokens.url, "client_id": "router", "client_secret_env": SECRET_ENV}
    web = _web(proxy.dicomweb_url, oauth2=oauth)
    web["retry"] = {"max_attempts": 2, "backoff_seconds": [0.2], "jitter": 0}  # held, never charged
    config = router_config(tmp_path, {"web": web}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        uids = _send(router, ct_series(6, size_kib=16))
        wait_until(lambda: uids <= set(orthanc.sop_instance_uids()), 90, "everything at Orthanc")
        stows = proxy.stow_requests()
        assert [r["status"] for r in stows[:2]] == [status, status], stows
        if retry_after:
            assert stows[2]["time"] - stows[1]["time"] >= retry_after - 0.1, "Retry-After not honoured"
        wait_until(lambda: not _spool(router, "out"), 60, "the spool to empty")
        assert not _spool(router, "dead"), "a held destination's instances were charged attempts"
