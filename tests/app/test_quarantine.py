"""The quarantine's re-route and purge, and operators' actions recorded with who did them: through
the CLI (click's runner) and the JSON API (FastAPI's TestClient), on a real Redis and a real spool.

No DICOM peer is involved: what is checked is what lands in the spool, the
route backlog, the journeys and the log (a real storescu and storescp take
part in tests/test_quarantine_e2e.py)."""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient

from router.cli import cli
from router.dashboard.app import create_app
from router.kernel import history, keys
from router.kernel.health import LAST_OK
from router.kernel.settings import load_config
from router.kernel.spool import Spool
from router.kernel.status import Status
from tests import data

TOKEN = "s3cret-token-for-tests"
CSRF = {"X-Requested-With": "test"}
NOTHING_MATCHES = [{"name": "MR only", "when": {"Modality": "MR"}, "forward": ["pacs"]}]
EVERYTHING = [{"name": "all", "forward": ["pacs"]}]
ME = f"{getpass.getuser()}@{socket.gethostname()}"


def _config(tmp_path: Path, redis_url: str, rules: list[dict], host: str = "127.0.0.1") -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"spool_dir": str(tmp_path / "spool"), "redis_url": redis_url},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "rules": rules,
        "unrouted": "keep",
        "dashboard": {"host": host, "port": 8484},
    }))
    return path


def _client(config_path: Path, token: str | None = None) -> TestClient:
    return TestClient(create_app(load_config(config_path), token=token), base_url="http://127.0.0.1:8484")


def _quarantined(spool: Spool, files: list[Path], reason: str = "unrouted: no rule matched") -> list[str]:
    """Real instances kept in quarantine, as routing leaves them under ``unrouted: keep``."""
    ids = []
    for path in files:
        spool_id = spool.receive(path.read_bytes())
        spool.quarantine(spool_id, reason)
        ids.append(spool_id)
    return ids


def _undecodable(spool: Spool) -> str:
    """A truncated dataset kept as the ingest keeps one (answered 0xC000, never an instance)."""
    tmp, fd = spool.open_temp()
    os.write(fd, Path(pydicom.data.get_testdata_file("MR_truncated.dcm")).read_bytes())
    return spool.quarantine_temp(tmp, fd, "undecodable dataset from BROKEN@127.0.0.1: runs past the end")


def _routing_backlog(redis_conn) -> list[str]:
    return [i.decode() for i in redis_conn.lrange(keys.pending(keys.ROUTE), 0, -1)]


def _steps(redis_conn, spool_id: str) -> list[tuple[str, str, str]]:
    return [(s.step, s.destination, s.detail) for s in history.journey(redis_conn, spool_id)]


def test_reroute_keeps_what_no_rule_wants_then_routes_it_once_a_rule_does(tmp_path, redis_url, redis_conn, caplog):
    """`quarantine re-route` under rules that still match nothing leaves the instance in quarantine with
    its reason and says why; once a rule sends it somewhere, it goes back to incoming/ and the route
    backlog, recorded with who asked in the log and in its journey."""
    files = data.small_series(tmp_path / "series", 2)
    spool = Spool(tmp_path / "spool")
    ids = _quarantined(spool, files)
    runner = CliRunner()
    listing = runner.invoke(cli, ["quarantine", "-c", str(_config(tmp_path, redis_url, NOTHING_MATCHES)), "--json"])
    assert [(q["spool_id"], q["sop_instance_uid"], q["reason"]) for q in json.loads(listing.output)] == [
        (spool_id, data.sop_instance_uid(path), "unrouted: no rule matched") for spool_id, path in zip(ids, files)]

    kept = runner.invoke(cli, ["quarantine", "-c", str(tmp_path / "router.yaml"), "re-route"])
    assert kept.exit_code == 0, kept.output
    assert f"{ids[0]}: stays in quarantine: no rule matches it (unrouted: keep)" in kept.output
    assert "0 quarantined instance(s) back to routing" in kept.output
    assert spool.quarantine_reasons() == [(spool_id, "unrouted: no rule matched") for spool_id in ids]

    config = _config(tmp_path, redis_url, EVERYTHING)
    with caplog.at_level(logging.INFO, logger="router.operations"):
        moved = runner.invoke(cli, ["quarantine", "-c", str(config), "re-route", "--id", ids[1], "--json"])
    assert json.loads(moved.output) == {"requeued": 1, "kept": [], "redis_problem": None}, moved.output
    assert spool.quarantine_reasons() == [(ids[0], "unrouted: no rule matched")]
    assert spool.incoming_path(ids[1]).read_bytes() == files[1].read_bytes()
    assert _routing_backlog(redis_conn) == [ids[1]]
    assert _steps(redis_conn, ids[1]) == [(history.Kind.REROUTED, "", f"by {ME}")]
    assert (f"operator {ME}: re-routed quarantined instance {ids[1]} (SOP Instance UID "
            f"{data.sop_instance_uid(files[1])})") in caplog.text


def test_an_undecodable_dataset_stays_in_quarantine_with_its_reason(tmp_path, redis_url, redis_conn):
    """Re-routing a dataset the ingest found truncated keeps it, reason and bytes as they were, and
    the answer says it is still no whole dataset; nothing is queued."""
    spool = Spool(tmp_path / "spool")
    spool_id = _undecodable(spool)
    before = spool.quarantine_dir.joinpath(f"{spool_id}.bin").read_bytes()
    client = _client(_config(tmp_path, redis_url, EVERYTHING))
    answer = client.post("/api/quarantine/re-route", json={"spool_ids": [spool_id]}, headers=CSRF)
    assert answer.status_code == 200, answer.text
    (kept_id, why), = answer.json()["kept"]
    assert (kept_id, answer.json()["requeued"]) == (spool_id, 0)
    assert why.startswith("still not a whole dataset") and "runs past the end" in why
    (item,) = spool.in_quarantine()
    assert item.reason.endswith("runs past the end") and item.path.read_bytes() == before
    assert _routing_backlog(redis_conn) == []


def test_the_api_purges_the_quarantine_naming_the_token_and_client_in_log_and_journey(tmp_path, redis_url,
                                                                                    redis_conn, caplog):
    """POST /api/quarantine/purge behind the token: refused without it, cross-site or with an empty
    selection (401, 403, 422), 404 for an id not in quarantine; done, it logs and journals
    "dashboard token from CLIENT", and its history no longer claims the instance is held."""
    spool = Spool(tmp_path / "spool")
    files = data.small_series(tmp_path / "series", 2)
    ids = _quarantined(spool, files)
    history.received(redis_conn, ids[0], data.sop_instance_uid(files[0]), "1.2.840.10008.5.1.4.1.1.2", "CT@127.0.0.1")
    client = _client(_config(tmp_path, redis_url, EVERYTHING, host="0.0.0.0"), token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    body = {"spool_ids": [ids[0]]}
    assert client.post("/api/quarantine/purge", json=body, headers=CSRF).status_code == 401
    assert client.post("/api/quarantine/purge", json=body, headers=bearer).status_code == 403
    assert client.post("/api/quarantine/purge", json={}, headers={**bearer, **CSRF}).status_code == 422
    unknown = client.post("/api/quarantine/purge", json={"spool_ids": ["0123-abcd"]}, headers={**bearer, **CSRF})
    assert unknown.status_code == 404 and "0123-abcd" in unknown.json()["detail"]
    assert len(spool.in_quarantine()) == 2

    with caplog.at_level(logging.INFO, logger="router.operations"):
        purged = client.post("/api/quarantine/purge", json=body, headers={**bearer, **CSRF})
    assert purged.json() == {"purged": 1}
    assert [item.spool_id for item in spool.in_quarantine()] == [ids[1]]
    assert not list(spool.quarantine_dir.glob(f"{ids[0]}.*"))
    who = "dashboard token from testclient"
    assert f"operator {who}: purged quarantined instance {ids[0]}" in caplog.text
    assert _steps(redis_conn, ids[0]) == [(history.Kind.RECEIVED, "", "from CT@127.0.0.1"),
                                          (history.Kind.PURGED, "", f"by {who}")]
    assert history.record(redis_conn, ids[0]).outcome == "dropped"  # commitment: not held, never committed

    everything = client.post("/api/quarantine/purge", json={"all": True}, headers={**bearer, **CSRF})
    assert everything.json() == {"purged": 1} and spool.in_quarantine() == []


def test_dead_letter_retry_and_purge_are_recorded_with_who_asked(tmp_path, redis_url, redis_conn, caplog):
    """`retry` and `purge` of dead letters log one INFO line per instance naming user@host, and add
    a step to each instance's journey, for the CLI as for the dashboard."""
    spool = Spool(tmp_path / "spool")
    config = _config(tmp_path, redis_url, EVERYTHING)
    files = data.small_series(tmp_path / "series", 2)
    ids = []
    for path in files:
        spool_id = spool.receive(path.read_bytes())
        spool.assign(spool_id, "pacs")
        spool.remove_routed(spool_id)
        spool.bury("pacs", spool_id, "refused", 3, data.sop_instance_uid(path), 0xA900)
        ids.append(spool_id)
    with caplog.at_level(logging.INFO, logger="router.operations"):
        retried = CliRunner().invoke(cli, ["retry", "-c", str(config), "--id", ids[0]])
        purged = CliRunner().invoke(cli, ["purge", "-c", str(config), "--id", ids[1], "--yes"])
        dashboard = _client(config).post("/api/dead-letters/retry", json={"spool_ids": [ids[1]]}, headers=CSRF)
    assert retried.exit_code == 0 and purged.exit_code == 0, retried.output + purged.output
    assert dashboard.json()["requeued"] == 0  # purged already
    assert (f"operator {ME}: retried dead letter {ids[0]} of pacs (SOP Instance UID "
            f"{data.sop_instance_uid(files[0])})") in caplog.text
    assert f"operator {ME}: purged dead letter {ids[1]} of pacs" in caplog.text
    assert _steps(redis_conn, ids[0]) == [(history.Kind.RETRIED, "pacs", f"by {ME}")]
    assert _steps(redis_conn, ids[1]) == [(history.Kind.PURGED, "pacs", f"by {ME}")]


def test_journey_heads_each_instance_with_its_sop_instance_uid_and_orders_steps_by_time(tmp_path, redis_url,
                                                                                      redis_conn):
    """Found by study, each instance's table is headed by its SOP Instance UID and spool id, its
    steps in time order even when they were stored out of it; a spool id finds its instance too."""
    config = _config(tmp_path, redis_url, EVERYTHING)
    study = "1.2.826.0.1.3680043.8.498.77"
    for spool_id, sop in (("0001-aa", "1.2.826.0.1.3680043.8.498.1"), ("0002-bb", "1.2.826.0.1.3680043.8.498.2")):
        history.index(redis_conn, {study: {spool_id: 100.0}})
        history.routed(redis_conn, spool_id, ["pacs"], "rules: all -> pacs")
        history.sent(redis_conn, spool_id, "pacs", Status.SUCCESS, 0.01, awaiting_commitment=False)
        history.received(redis_conn, spool_id, sop, "1.2.840.10008.5.1.4.1.1.2", "CT@127.0.0.1", at=100.0)
    by_study = CliRunner().invoke(cli, ["journey", "-c", str(config), study])
    assert by_study.exit_code == 0, by_study.output
    assert "1.2.826.0.1.3680043.8.498.1 (spool id 0001-aa)" in by_study.output
    assert "1.2.826.0.1.3680043.8.498.2 (spool id 0002-bb)" in by_study.output
    table = by_study.output.split("(spool id 0001-aa)")[1]
    assert table.index("received") < table.index("routed") < table.index("sent")
    by_id = json.loads(CliRunner().invoke(cli, ["journey", "-c", str(config), "0002-bb", "--json"]).output)
    assert [(i["spool_id"], i["sop_instance_uid"]) for i in by_id] == [("0002-bb", "1.2.826.0.1.3680043.8.498.2")]
    assert [s["step"] for s in by_id[0]["journey"]] == ["received", "routed", "sent"]


def test_queues_text_shows_each_destinations_last_success(tmp_path, redis_url, redis_conn):
    """`queues` prints the last acknowledged instance's time per destination, as `--json` has it."""
    config = _config(tmp_path, redis_url, EVERYTHING)
    redis_conn.hset(keys.health(keys.forward("pacs")), LAST_OK, 1_700_000_000.0)
    result = CliRunner().invoke(cli, ["queues", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "last success" in result.output
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000.0)) in result.output


def test_the_dashboard_logs_each_request_without_its_query_string(tmp_path, redis_url, caplog):
    """The dashboard's access log names client, method, path and status — never the query string,
    where a search may carry an accession number; reads at DEBUG, actions and refusals at INFO."""
    client = _client(_config(tmp_path, redis_url, EVERYTHING))
    with caplog.at_level(logging.DEBUG, logger="router.dashboard.access"):
        client.get("/api/instances", params={"q": "ACC12345"})
        client.post("/api/quarantine/purge", json={"all": True})
        client.post("/api/quarantine/purge", json={"all": True}, headers=CSRF)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "router.dashboard.access"]
    assert lines == [(logging.DEBUG, "testclient GET /api/instances 200"),
                     (logging.INFO, "testclient POST /api/quarantine/purge 403"),
                     (logging.INFO, "testclient POST /api/quarantine/purge 200")]
    assert "ACC12345" not in caplog.text


@pytest.mark.parametrize("action", ["re-route", "purge"])
def test_an_id_not_in_quarantine_is_a_clear_error_and_changes_nothing(tmp_path, redis_url, action):
    """`quarantine re-route|purge --id X` for an X not in quarantine exits 2 naming it; the rest stays."""
    spool = Spool(tmp_path / "spool")
    ids = _quarantined(spool, data.small_series(tmp_path / "series", 1))
    config = _config(tmp_path, redis_url, EVERYTHING)
    result = CliRunner().invoke(cli, ["quarantine", "-c", str(config), action, "--id", ids[0], "--id", "0-nope",
                                      "--yes"])
    assert result.exit_code == 2 and "not in quarantine: 0-nope" in result.output
    assert [item.spool_id for item in spool.in_quarantine()] == ids
