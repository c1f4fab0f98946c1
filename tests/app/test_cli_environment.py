"""DICOM_ROUTER_CONFIG as the default of -c, and the opt-in JSON log format that the
children of `run` inherit (issue 21: for containers, systemd and log shippers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.peers import free_port, wait_until
from tests.router_proc import RouterProcess, destination, router_config


def _router(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def _config_file(tmp_path, **kwargs) -> str:
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, **kwargs)
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_config_comes_from_dicom_router_config_when_no_c_is_given(tmp_path, monkeypatch):
    path = _config_file(tmp_path, port=free_port())
    monkeypatch.delenv("DICOM_ROUTER_CONFIG", raising=False)
    missing = _router("check")
    assert missing.returncode == 2 and "DICOM_ROUTER_CONFIG" in missing.stderr, missing.stderr
    env = dict(os.environ, DICOM_ROUTER_CONFIG=path)
    checked = _router("check", env=env)
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
    assert _router("health", env=env).returncode == 0
    # -c still wins over the environment
    assert _router("check", "-c", str(tmp_path / "nowhere.yaml"), env=env).returncode != 0


def _json_lines(text: str) -> list[dict]:
    """Every line of a log written in JSON: each must parse (a traceback is inside its line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_an_ingest_logs_json_when_asked(tmp_path, redis_url):
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url)
    with RouterProcess(tmp_path, config, "ingest", args=["--log-format", "json"]) as ingest:
        lines = _json_lines(ingest.log_text())
    listening = [e for e in lines if "listening on" in e["message"]]
    assert listening and listening[0]["logger"] == "router.ingest.server" and listening[0]["level"] == "INFO"
    assert set(listening[0]) == {"time", "level", "pid", "logger", "message"} and listening[0]["time"].endswith("Z")


def test_the_children_of_run_log_json_too(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("DICOM_ROUTER_LOG_FORMAT", "json")
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url)
    with RouterProcess(tmp_path, config) as router:
        wait_until(lambda: router.log_text().count("workers.worker") >= 2, 30, "both workers ready")
        lines = _json_lines(router.log_text())
    loggers = {e["logger"] for e in lines}
    assert {"router.supervisor", "router.ingest.server", "workers.worker"} <= loggers, loggers
    assert len({e["pid"] for e in lines}) >= 3, "the supervisor, the ingest and the workers each wrote"
