"""The dashboard's JSON API and access rules, on a real Redis and a real spool (FastAPI's TestClient:
the app in this process, HTTP through httpx, no socket)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pydicom
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from router.cli import cli
from router.dashboard.api import api
from router.dashboard.app import COOKIE, create_app
from router.kernel import history, keys, telemetry
from router.kernel.commitment.from_modalities import Request, Requests
from router.kernel.commitment.messages import Reference
from router.kernel.commitment.to_destinations import Transactions
from router.kernel.settings import RetrySettings, load_config
from router.kernel.spool import Spool
from router.kernel.status import Status
from tests import data
from workers.forwarding import hold

TOKEN = "s3cret-token-for-tests"
CSRF = {"X-Requested-With": "test"}


def _config(tmp_path: Path, redis_url: str, host: str = "127.0.0.1", **dashboard: object) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"spool_dir": str(tmp_path / "spool"), "redis_url": redis_url},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                         "research": {"ae_title": "RESEARCH", "host": "127.0.0.1", "port": 105}},
        "rules": [{"name": "all", "forward": ["pacs", "research"]}],
        "dashboard": {"host": host, "port": 8484, **dashboard},
    }))
    return path


def _client(config_path: Path, token: str | None = None, base_url: str = "http://127.0.0.1:8484") -> TestClient:
    return TestClient(create_app(load_config(config_path), token=token), base_url=base_url)


def _bury(spool: Spool, destination: str, files: list[Path], status: int = 0xA900) -> list[str]:
    """Real instances as dead letters of ``destination``, as the forwarding worker leaves them."""
    ids = []
    for path in files:
        spool_id = spool.receive(path.read_bytes())
        spool.assign(spool_id, destination)
        spool.remove_routed(spool_id)
        spool.bury(destination, spool_id, "refused", 3, data.sop_instance_uid(path), status)
        ids.append(spool_id)
    return ids


def test_loopback_bind_needs_no_token(tmp_path, redis_url):
    """Bound to 127.0.0.1 without a token, the page, the API and its OpenAPI document answer anyone on the host."""
    client = _client(_config(tmp_path, redis_url))
    assert client.get("/").status_code == 200
    assert client.get("/api/overview").json()["redis"]["reachable"] is True
    assert "/api/dead-letters/retry" in client.get("/api/openapi.json").json()["paths"]


def test_beyond_loopback_the_api_answers_401_without_the_token_and_200_with_it(tmp_path, redis_url):
    """Bound to 0.0.0.0: no token or a wrong one is 401 (pages redirect to the login form); the Bearer token is 200."""
    client = _client(_config(tmp_path, redis_url, host="0.0.0.0"), token=TOKEN)
    assert client.get("/api/destinations").status_code == 401
    assert client.get("/api/destinations", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/openapi.json").status_code == 401
    page = client.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    answer = client.get("/api/destinations", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and [d["name"] for d in answer.json()] == ["pacs", "research"]


def test_the_login_form_gives_the_browser_a_session_cookie(tmp_path, redis_url):
    """A wrong token is refused; the right one sets an HttpOnly SameSite=Strict cookie that opens page and API."""
    client = _client(_config(tmp_path, redis_url, host="0.0.0.0"), token=TOKEN)
    assert client.get("/login").status_code == 200
    assert client.post("/login", data={"token": "nope"}).status_code == 401
    signed = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert signed.status_code == 303
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(COOKIE) and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert TOKEN not in cookie
    assert client.get("/").status_code == 200
    assert client.get("/api/overview").status_code == 200


def test_the_token_comes_from_token_file_or_token_env(tmp_path, redis_url, monkeypatch):
    """Without an explicit token, the app reads dashboard.token_file, else $token_env."""
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    from_file = _client(_config(tmp_path, redis_url, host="0.0.0.0", token_file=str(secret)))
    assert from_file.get("/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert from_file.get("/api/overview").status_code == 401
    monkeypatch.setenv("ROUTER_TEST_TOKEN", "from-env")
    from_env = _client(_config(tmp_path, redis_url, host="0.0.0.0", token_env="ROUTER_TEST_TOKEN"))
    assert from_env.get("/api/overview", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_state_changing_calls_refuse_cross_site_requests(tmp_path, redis_url):
    """A POST without X-Requested-With, or with a foreign Origin, is 403 and changes nothing; the page's own is 200."""
    client = _client(_config(tmp_path, redis_url))
    spool = Spool(tmp_path / "spool")
    _bury(spool, "pacs", data.small_series(tmp_path / "series", 1))
    body = {"destination": "pacs"}
    assert client.post("/api/dead-letters/purge", json=body).status_code == 403
    foreign = client.post("/api/dead-letters/purge", json=body, headers={**CSRF, "Origin": "https://evil.example"})
    assert foreign.status_code == 403
    cross = client.post("/api/dead-letters/purge", json=body, headers={**CSRF, "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert len(list(spool.dead_letters())) == 1
    own = client.post("/api/dead-letters/purge", json=body, headers={**CSRF, "Origin": "http://127.0.0.1:8484"})
    assert own.status_code == 200 and own.json() == {"purged": 1}
    assert list(spool.dead_letters()) == []


def test_a_loopback_dashboard_refuses_a_foreign_host_header(tmp_path, redis_url):
    """A DNS name rebound to 127.0.0.1 (Host: evil.example) does not reach a tokenless loopback dashboard."""
    client = _client(_config(tmp_path, redis_url), base_url="http://evil.example:8484")
    assert client.get("/api/overview").status_code == 400
    assert _client(_config(tmp_path, redis_url), base_url="http://localhost:8484").get("/").status_code == 200


def test_dead_letters_are_listed_with_status_in_words_and_retried_by_study(tmp_path, redis_url, redis_conn):
    """Dead letters show their status in words and their study (from the file header); retrying one study
    moves only its instances back to out/ and queues them; the rest stay."""
    client = _client(_config(tmp_path, redis_url))
    spool = Spool(tmp_path / "spool")
    first = data.small_series(tmp_path / "a", 3)
    other = data.small_series(tmp_path / "b", 2)
    first_ids = _bury(spool, "pacs", first)
    other_ids = _bury(spool, "pacs", other)
    letters = client.get("/api/dead-letters", params={"destination": "pacs"}).json()
    assert [d["spool_id"] for d in letters] == first_ids + other_ids
    study = pydicom.dcmread(first[0], stop_before_pixels=True).StudyInstanceUID
    assert {d["study_instance_uid"] for d in letters[:3]} == {study}
    assert letters[0]["status_text"].startswith("0xA900") and letters[0]["attempts"] == 3
    assert client.get("/api/destinations").json()[0]["last_dead_status"].startswith("0xA900")

    retried = client.post("/api/dead-letters/retry", json={"study_instance_uid": study}, headers=CSRF).json()
    assert retried["requeued"] == 3 and retried["redis_problem"] is None
    assert spool.ids_in(spool.out_dir("pacs")) == first_ids
    queued = [i.decode() for i in redis_conn.lrange(keys.pending(keys.forward("pacs")), 0, -1)]
    assert queued == first_ids
    assert [d.spool_id for d in spool.dead_letters()] == other_ids
    row = client.get("/api/destinations").json()[0]
    assert row["on_disk"] == 3 and row["pending"] == 3 and row["oldest_age_seconds"] >= 0


def test_purge_one_or_all_of_a_destination_and_unknown_names(tmp_path, redis_url):
    """Purge one id, then a destination's; an unknown destination is 404, an empty selection 422."""
    client = _client(_config(tmp_path, redis_url))
    spool = Spool(tmp_path / "spool")
    ids = _bury(spool, "pacs", data.small_series(tmp_path / "a", 3))
    research = _bury(spool, "research", data.small_series(tmp_path / "b", 1))
    one = client.post("/api/dead-letters/purge", json={"spool_ids": [ids[0]]}, headers=CSRF)
    assert one.json() == {"purged": 1}
    assert client.post("/api/dead-letters/purge", json={"destination": "pacs"}, headers=CSRF).json() == {"purged": 2}
    assert [d.spool_id for d in spool.dead_letters()] == research
    assert client.post("/api/dead-letters/purge", json={"destination": "nowhere"}, headers=CSRF).status_code == 404
    assert client.post("/api/dead-letters/purge", json={}, headers=CSRF).status_code == 422
    assert client.get("/api/dead-letters", params={"destination": "nowhere"}).status_code == 404


def test_quarantine_and_rules_are_listed(tmp_path, redis_url):
    """The quarantine with its reasons, the rules with their hit counts."""
    client = _client(_config(tmp_path, redis_url))
    spool = Spool(tmp_path / "spool")
    spool_id = spool.receive(b"not dicom")
    spool.quarantine(spool_id, "unrouted: no rule matched")
    assert [(q["spool_id"], q["reason"]) for q in client.get("/api/quarantine").json()] == [
        (spool_id, "unrouted: no rule matched")]
    rules = client.get("/api/rules").json()
    assert [(r["name"], r["forward"], r["hits"]) for r in rules["rules"]] == [("all", ["pacs", "research"], 0)]


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


def test_any_input_gets_an_answer_never_a_server_error(tmp_path, redis_url):
    """Whatever an API caller sends as destination, search term, spool ids, study or limit: 200, 404 or 422,
    never a 500."""
    client = _client(_config(tmp_path, redis_url))
    allowed = {200, 404, 422}

    @settings(max_examples=100, deadline=None)
    @given(destination=_text, q=_text, ids=st.lists(_text, max_size=4), study=st.one_of(st.none(), _text),
           limit=st.integers(min_value=-5, max_value=5000))
    def answers(destination, q, ids, study, limit):
        listing = client.get("/api/dead-letters", params={"destination": destination, "limit": limit})
        assert listing.status_code in allowed
        assert client.get("/api/instances", params={"q": q}).status_code in allowed
        assert client.get(f"/api/instances/{quote(q, safe='')}/journey").status_code in allowed
        for action in ("retry", "purge"):
            answer = client.post(f"/api/dead-letters/{action}", headers=CSRF,
                                 json={"destination": destination, "spool_ids": ids, "study_instance_uid": study})
            assert answer.status_code in allowed, answer.text

    answers()


def test_check_refuses_a_dashboard_beyond_loopback_without_a_token(tmp_path, redis_url, monkeypatch):
    """`check` names the file and line of dashboard.host bound beyond loopback with no token; with one it passes."""
    monkeypatch.delenv("DICOM_ROUTER_TOKEN", raising=False)
    path = _config(tmp_path, redis_url, host="0.0.0.0")
    refused = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert refused.exit_code == 1
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "0.0.0.0" in text)
    assert f"{path}:{line}:" in refused.output and "beyond loopback" in refused.output
    missing = CliRunner().invoke(cli, ["check", "-c", str(_config(tmp_path, redis_url, host="0.0.0.0",
                                                                  token_file=str(tmp_path / "absent")))])
    assert missing.exit_code == 1 and "token_file" in missing.output
    monkeypatch.setenv("DICOM_ROUTER_TOKEN", TOKEN)
    path = _config(tmp_path, redis_url, host="0.0.0.0")
    assert CliRunner().invoke(cli, ["check", "-c", str(path)]).exit_code == 0


def test_queues_says_plainly_when_redis_is_down_and_shows_the_disk(tmp_path, redis_factory):
    """With Redis gone, `queues` still prints what is on disk and one clear line instead of hanging or failing."""
    server = redis_factory()
    url = server.url
    server.stop()
    path = _config(tmp_path, url)
    spool = Spool(tmp_path / "spool")
    spool.assign(spool.receive(b"x"), "pacs")
    _bury(spool, "research", data.small_series(tmp_path / "a", 1))
    result = CliRunner().invoke(cli, ["queues", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert f"Redis at {url} is not reachable" in result.output and "queue depths unknown" in result.output
    as_json = CliRunner().invoke(cli, ["queues", "-c", str(path), "--json"])
    view = yaml.safe_load(as_json.output)
    pacs = next(q for q in view["queues"] if q["queue"] == "pacs")
    assert view["redis"]["reachable"] is False and pacs["on_disk"] == 1 and pacs["pending"] is None
    assert view["dead_letters"] == 1


def test_retry_and_purge_print_json(tmp_path, redis_url):
    """`retry --json` and `purge --json --yes` say what they did as JSON."""
    path = _config(tmp_path, redis_url)
    spool = Spool(tmp_path / "spool")
    ids = _bury(spool, "pacs", data.small_series(tmp_path / "a", 2))
    retried = CliRunner().invoke(cli, ["retry", "-c", str(path), "pacs", "--id", ids[0], "--json"])
    assert yaml.safe_load(retried.output)["requeued"] == 1, retried.output
    purged = CliRunner().invoke(cli, ["purge", "-c", str(path), "pacs", "--yes", "--json"])
    assert yaml.safe_load(purged.output) == {"purged": 1}, purged.output


def test_metrics_are_served_on_the_dashboards_port_behind_the_same_token(tmp_path, redis_url):
    """/metrics needs the token beyond loopback and then serves the names of the README's "Metrics" table, parsed by
    prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    client = _client(_config(tmp_path, redis_url, host="0.0.0.0"), token=TOKEN)
    assert client.get("/metrics").status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200
    names = {family.name for family in text_string_to_metric_families(scraped.text)}
    assert {"dicom_router_instances_received", "dicom_router_queue_depth", "dicom_router_spool_bytes"} <= names


def test_the_api_docs_page_and_every_file_it_loads_are_served_by_the_app_itself(tmp_path, redis_url):
    """/api/docs references only the dashboard's own paths (no CDN), and each of them, the OpenAPI
    document included, is served; behind the token the page sends a browser to the login form."""
    client = _client(_config(tmp_path, redis_url))
    page = client.get("/api/docs")
    assert page.status_code == 200
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert "/api/openapi.json" in referenced and len(referenced) == 4, referenced
    for url in referenced:
        assert url.startswith("/") and not url.startswith("//"), url
        served = client.get(url)
        assert served.status_code == 200 and served.content, url

    guarded = _client(_config(tmp_path, redis_url, host="0.0.0.0"), token=TOKEN)
    redirected = guarded.get("/api/docs", follow_redirects=False)
    assert redirected.status_code == 303 and redirected.headers["location"] == "/login"
    assert guarded.get("/api/docs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def _free_form(schema: object, components: dict, where: str) -> list[str]:
    """Where in ``schema`` any JSON value, or an object with undeclared contents, is allowed."""
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _free_form(components[name], {k: v for k, v in components.items() if k != name}, f"{where}>{name}")
    kinds = {key for key in schema if key not in ("title", "description", "default", "examples")}
    if not kinds or schema.get("additionalProperties") is True:
        return [where]
    if schema.get("type") == "object" and "properties" not in schema and "additionalProperties" not in schema:
        return [where]
    found = []
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for n, part in enumerate(schema.get(key, [])):
            found += _free_form(part, components, f"{where}.{key}[{n}]")
    for key in ("items", "additionalProperties"):
        found += _free_form(schema.get(key), components, f"{where}.{key}")
    for name, part in schema.get("properties", {}).items():
        found += _free_form(part, components, f"{where}.{name}")
    return found


def test_every_success_answer_in_the_openapi_document_has_a_concrete_schema(tmp_path, redis_url):
    """No 2xx answer of /api/openapi.json is a free-form object or any value, down to every field:
    a client generated from the document knows every field it gets."""
    document = _client(_config(tmp_path, redis_url)).get("/api/openapi.json").json()
    components = document["components"]["schemas"]
    free = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            successes = {code: answer for code, answer in operation["responses"].items() if code.startswith("2")}
            assert successes, where
            for code, answer in successes.items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                free += [f"{where} {code}"] if schema is None else _free_form(schema, components, f"{where} {code}")
    assert free == [], free


def _models() -> dict[tuple[str, str], object]:
    """(method, path) -> the response model of each /api/ route."""
    return {(method, route.path): route.response_model for route in api.routes for method in route.methods}


def test_real_answers_validate_against_the_models_the_document_describes(tmp_path, redis_url, redis_conn):
    """With a dead letter, a quarantined file, a commitment transaction, a held destination, counted
    sends and journeys, every /api/ route's answer validates against its model (fields undeclared refused)."""
    path = _config(tmp_path, redis_url)
    config = yaml.safe_load(path.read_text())
    config["destinations"]["pacs"]["storage_commitment"] = True
    path.write_text(yaml.safe_dump(config))
    client = TestClient(create_app(load_config(path)), base_url="http://127.0.0.1:8484")
    spool = Spool(tmp_path / "spool")
    files = data.small_series(tmp_path / "a", 3)
    dead_id = _bury(spool, "research", files[:1])[0]
    quarantined = spool.receive(b"not dicom")
    spool.quarantine(quarantined, "unrouted: no rule matched")
    Transactions(spool).open("pacs", [(dead_id, Reference("1.2.840.10008.5.1.4.1.1.2", "1.2.3"))], timeout=60)
    uid = data.sop_instance_uid(files[1])
    Requests(spool).save(Request("1.2.826.0.1.3680043.8.498.9", "CT_ONE", "127.0.0.1",
                                 (Reference("1.2.840.10008.5.1.4.1.1.2", uid),), received=100.0, deadline=160.0,
                                 attempts=1, next_attempt=170.0, problem="CT_ONE is not under modalities:"))
    history.received(redis_conn, "0001", uid, "1.2.840.10008.5.1.4.1.1.2", "CT_ONE@127.0.0.1")
    telemetry.count_received(redis_conn, "CT_ONE")
    history.sent(redis_conn, "0001", "pacs", Status.SUCCESS, 0.01, awaiting_commitment=True)
    telemetry.count_forwarded(redis_conn, "pacs", 0.01)
    history.failed(redis_conn, "0001", "research", None, "cannot connect")
    telemetry.count_failed(redis_conn, "research", telemetry.FailureClass.UNREACHABLE)
    telemetry.rule_hits(redis_conn, ["all"])
    telemetry.reload_result(redis_conn, 2, False, "rules.yaml:3: unknown key")
    hold(redis_conn, keys.forward("research"), RetrySettings(), "research: cannot connect")

    models = _models()
    answers = {
        ("GET", "/api/overview"): client.get("/api/overview"),
        ("GET", "/api/destinations"): client.get("/api/destinations"),
        ("POST", "/api/destinations/{name}/echo"): client.post("/api/destinations/pacs/echo", headers=CSRF),
        ("GET", "/api/dead-letters"): client.get("/api/dead-letters"),
        ("GET", "/api/quarantine"): client.get("/api/quarantine"),
        ("GET", "/api/instances"): client.get("/api/instances", params={"q": uid}),
        ("GET", "/api/instances/{spool_id}/journey"): client.get("/api/instances/0001/journey"),
        ("GET", "/api/recent"): client.get("/api/recent"),
        ("GET", "/api/rules"): client.get("/api/rules"),
        ("POST", "/api/dead-letters/retry"): client.post("/api/dead-letters/retry", json={"spool_ids": [dead_id]},
                                                         headers=CSRF),
        ("POST", "/api/dead-letters/purge"): client.post("/api/dead-letters/purge", json={"destination": "research"},
                                                         headers=CSRF),
        ("GET", "/api/commitment-reports"): client.get("/api/commitment-reports"),
        ("POST", "/api/quarantine/re-route"): client.post("/api/quarantine/re-route", json={"all": True},
                                                          headers=CSRF),
        ("POST", "/api/quarantine/purge"): client.post("/api/quarantine/purge", json={"all": True}, headers=CSRF),
    }
    assert set(answers) == set(models), "a new /api/ route: add a real answer of it here"
    for route, answer in answers.items():
        assert answer.status_code == 200, (route, answer.text)
        TypeAdapter(models[route]).validate_python(answer.json())
    overview = answers[("GET", "/api/overview")].json()
    assert overview["totals"] == {"received": 1, "forwarded": 1, "failed": 1} and overview["error_rate"] == 0.5
    assert overview["unavailable"] == ["research"]
    pacs, research = answers[("GET", "/api/destinations")].json()
    assert pacs["delivered"] == 1 and pacs["commitment"]["open_transactions"] == 1
    assert research["failed_sends"] == {"unreachable": 1} and research["state"] == "held"
