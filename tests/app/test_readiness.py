"""Liveness and readiness (PRODUCT.md §7): ``dicom-router health [--ready]`` by its exit
status, and the dashboard's ``/healthz`` and ``/readyz``, against a real Redis, a real
spool and a real ingest port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from router.dashboard.app import create_app
from router.kernel.settings import load_config
from tests.peers import LOOPBACK, free_port


def _config(tmp_path: Path, redis_url: str, port: int, **router: object) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"host": LOOPBACK, "port": port, "spool_dir": str(tmp_path / "spool"), "redis_url": redis_url,
                   "min_free_bytes": 0, **router},
        "destinations": {"pacs": {"ae_title": "PACS", "host": LOOPBACK, "port": 104}},
        "rules": [{"name": "all", "forward": ["pacs"]}],
        "dashboard": {"host": LOOPBACK, "port": 8484},
    }))
    return path


def _health(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", "health", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def _listening() -> socket.socket:
    """A socket listening on a loopback port: what the ingest's port looks like to a probe."""
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(4)
    return server


def test_health_is_alive_and_ready_when_redis_the_spool_and_the_ingest_are(tmp_path, redis_url):
    with _listening() as ingest:
        config = _config(tmp_path, redis_url, ingest.getsockname()[1])
        alive = _health(config)
        assert alive.returncode == 0, alive.stderr
        assert "spool: ok" in alive.stdout
        ready = _health(config, "--ready", "--json")
        assert ready.returncode == 0, ready.stdout + ready.stderr
        report = json.loads(ready.stdout)
        assert report["ready"] is True
        assert [(c["name"], c["ok"]) for c in report["checks"]] == [("redis", True), ("spool", True), ("ingest", True)]
    assert not list((tmp_path / "spool" / "tmp").iterdir()), "the probe's file is gone"


def test_not_ready_names_what_is_wrong_and_alive_does_not_ask_redis(tmp_path, redis_url):
    dead_redis = f"redis://{LOOPBACK}:{free_port()}/0"
    config = _config(tmp_path, dead_redis, free_port())
    assert _health(config).returncode == 0, "alive asks nothing beyond this host"
    ready = _health(config, "--ready")
    assert ready.returncode == 1
    assert "redis: FAILED" in ready.stderr and "ingest: FAILED" in ready.stderr and "spool: ok" in ready.stdout
    # A worker-only host: no ingest port to check; still not ready without Redis.
    worker_only = _health(config, "--ready", "--no-ingest", "--json")
    assert worker_only.returncode == 1
    assert [c["name"] for c in json.loads(worker_only.stdout)["checks"]] == ["redis", "spool"]


def test_a_spool_without_room_or_that_cannot_be_written_is_not_ready(tmp_path, redis_url):
    full = _config(tmp_path, redis_url, free_port(), min_free_bytes=1 << 62)
    ready = _health(full, "--ready", "--no-ingest")
    assert ready.returncode == 1 and "min_free_bytes" in ready.stderr and "0xA700" in ready.stderr
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the spool should be")
    not_a_dir = _config(tmp_path, redis_url, free_port(), spool_dir=str(blocked))
    assert _health(not_a_dir).returncode == 1, "alive: the spool is not there"
    ready = _health(not_a_dir, "--ready", "--no-ingest")
    assert ready.returncode == 1 and "cannot be written" in ready.stderr


def test_a_config_that_does_not_load_is_not_alive(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("router: {port: not-a-port}\n")
    assert _health(bad).returncode == 1


def test_the_dashboard_probes_answer_without_the_token_and_from_any_host(tmp_path, redis_url):
    """An orchestrator's probe has no token and names the pod's address as Host."""
    with _listening() as ingest:
        config = load_config(_config(tmp_path, redis_url, ingest.getsockname()[1]))
        client = TestClient(create_app(config, token="secret-token", ingest_here=True), base_url="http://10.1.2.3:8484")
        assert client.get("/api/queues").status_code == 401  # everything else still wants the token
        assert client.get("/healthz").json() == {"alive": True}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert [c["name"] for c in ready.json()["checks"]] == ["redis", "spool", "ingest"]
    # The ingest gone: not ready (503), and says why; still alive.
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert [c["name"] for c in ready.json()["checks"] if not c["ok"]] == ["ingest"]
    assert client.get("/healthz").status_code == 200


def test_a_dashboard_on_another_host_than_the_ingest_does_not_check_its_port(tmp_path, redis_url):
    config = load_config(_config(tmp_path, redis_url, free_port()))
    client = TestClient(create_app(config), base_url="http://127.0.0.1:8484")
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert [c["name"] for c in ready.json()["checks"]] == ["redis", "spool"]


def test_run_serves_the_probes_and_health_finds_its_embedded_redis(tmp_path):
    """`dicom-router run` (embedded Redis) with a dashboard: /healthz and /readyz over real HTTP,
    the ingest's port among /readyz's checks, and `health --ready` ready too; after the stop, not ready."""
    import urllib.request

    from tests.peers import wait_for_port, wait_until
    from tests.router_proc import RouterProcess, destination, router_config

    dashboard_port = free_port()
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")})
    config["dashboard"] = {"host": LOOPBACK, "port": dashboard_port}
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        wait_for_port(LOOPBACK, dashboard_port, timeout=30, proc=router.proc)
        base = f"http://{LOOPBACK}:{dashboard_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as answer:
            assert json.load(answer) == {"alive": True}

        def readyz() -> dict:
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as answer:
                return json.load(answer)

        wait_until(lambda: readyz()["ready"], 30, "the dashboard of `run` to be ready")
        assert [c["name"] for c in readyz()["checks"]] == ["redis", "spool", "ingest"]
        ready = _health(router.config_path, "--ready")
        assert ready.returncode == 0, ready.stdout + ready.stderr
    after = _health(router.config_path, "--ready")
    assert after.returncode == 1 and "redis: FAILED" in after.stderr and "ingest: FAILED" in after.stderr
