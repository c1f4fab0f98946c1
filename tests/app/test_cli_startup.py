"""Starting any part of the router on a bad config is refused with file, line and reason.

These run the real `dicom-router` command line in a subprocess; no peer is
involved because nothing may start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

BAD = """\
router:
  ae_title: DICOM_ROUTER
  spool_dir: ./spool
  redis_url: redis://127.0.0.1:1/0
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}
rules:
  - name: typo
    when: {StudyDescripton: CHEST}
    forward: [pacs]
"""


def _dicom_router(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``dicom-router ARGS... -c CONFIG`` (the config is the last argument), as an operator runs it."""
    *command, config = args
    return subprocess.run([sys.executable, "-m", "router", *map(str, command), "-c", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("command", [["run"], ["ingest"], ["worker"], ["check"]])
def test_start_with_a_typo_exits_1_naming_file_line_and_suggestion(tmp_path, command):
    """Every command refuses the config before starting anything, and says where."""
    config = tmp_path / "router.yaml"
    config.write_text(BAD)
    result = _dicom_router(*command, config)
    assert result.returncode == 1, result.stderr
    assert f"{config}:9:" in result.stderr + result.stdout
    assert "StudyDescription" in result.stderr + result.stdout
    assert not (tmp_path / "spool").exists()


def test_run_on_a_port_in_use_stops_with_an_error(tmp_path):
    """`run` whose ingest port is taken says so and exits 1 instead of
    restarting the ingest forever (the listening socket here is the test's own)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "router.yaml"
        config.write_text(
            f"router: {{host: 127.0.0.1, port: {port}, spool_dir: ./spool, data_dir: ./redis}}\n"
            "destinations: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n"
            "rules: [{name: all, forward: [pacs]}]\n"
        )
        result = _dicom_router("run", config)
    assert result.returncode == 1
    assert f"{config}:1:" in result.stderr and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "spool").exists()


DEID = """\
router: {{host: 127.0.0.1, port: 0, spool_dir: ./spool, data_dir: ./data{extra}}}
destinations:
  research: {{ae_title: RESEARCH, host: 127.0.0.1, port: {port}}}
rules:
  - name: research copy
    morph:
      - anonymize: {{profile: basic}}
    forward: [research]
"""


@pytest.mark.parametrize("command", [["run"], ["worker"], ["check"]])
def test_a_rule_needing_a_secret_without_one_is_refused_before_anything_starts(tmp_path, command):
    """With a shared Redis (several hosts), an anonymize rule and no secret would
    quarantine every instance: every command refuses, naming the rule's line."""
    config = tmp_path / "router.yaml"
    config.write_text(DEID.format(extra=", redis_url: 'redis://127.0.0.1:1/0'", port=104))
    env = {k: v for k, v in os.environ.items() if k != "DICOM_ROUTER_SECRET"}
    result = _dicom_router(*command, config, env=env)
    assert result.returncode == 1, result.stderr
    assert f"{config}:6:5: rule 'research copy': anonymize needs the de-identification secret" in result.stderr
    assert not (tmp_path / "spool").exists()


def test_run_refuses_a_min_free_bytes_its_spool_volume_cannot_meet(tmp_path):
    """A min_free_bytes beyond the spool volume's size: refused at start, not 0xA700 for every C-STORE."""
    config = tmp_path / "router.yaml"
    config.write_text(
        f"router: {{host: 127.0.0.1, port: 0, spool_dir: ./spool, data_dir: ./data, min_free_bytes: {1 << 62}}}\n"
        "destinations: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n"
        "rules: [{name: all, forward: [pacs]}]\n"
    )
    result = _dicom_router("run", config)
    assert result.returncode == 1, result.stderr
    assert f"{config}:1:" in result.stderr and "router.min_free_bytes is" in result.stderr
    assert "every C-STORE would be answered 0xA700" in result.stderr


def test_run_refuses_the_default_min_free_bytes_on_a_spool_volume_smaller_than_it(tmp_path):
    """A 16 MiB tmpfs spool with the default min_free_bytes (64 MiB): refused at
    start, naming the router section, instead of answering 0xA700 to everything."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        config = tmp_path / "router.yaml"
        config.write_text(
            f"router: {{host: 127.0.0.1, port: 0, spool_dir: {mount}/spool, data_dir: ./data}}\n"
            "destinations: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n"
            "rules: [{name: all, forward: [pacs]}]\n"
        )
        result = _dicom_router("run", config)
        assert result.returncode == 1, result.stderr
        assert f"{config}:1:" in result.stderr
        assert f"router.min_free_bytes is {64 << 20} bytes but the spool's volume ({mount})" in result.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_ingest_alone_needs_no_secret(tmp_path, redis_url, monkeypatch):
    """`ingest` on its own host never morphs: a rule needing the secret does not stop it."""
    from tests.router_proc import RouterProcess

    monkeypatch.delenv("DICOM_ROUTER_SECRET", raising=False)
    config = {
        "router": {"host": "127.0.0.1", "port": 0, "spool_dir": str(tmp_path / "spool"), "redis_url": redis_url},
        "destinations": {"research": {"ae_title": "RESEARCH", "host": "127.0.0.1", "port": 104}},
        "rules": [{"name": "research copy", "morph": [{"anonymize": {"profile": "basic"}}], "forward": ["research"]}],
    }
    with RouterProcess(tmp_path, config, "ingest") as ingest:
        assert "listening on" in ingest.log_text()
