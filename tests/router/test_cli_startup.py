"""Starting any part of the router on a bad config is refused with file, line and reason.

These run the real `dicom-router` command line in a subprocess; no peer is
involved because nothing may start.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("command", [["run"], ["ingest"], ["worker"], ["check"]])
def test_start_with_a_typo_exits_1_naming_file_line_and_suggestion(tmp_path, command):
    """Every command refuses the config before starting anything, and says where."""
    config = tmp_path / "router.yaml"
    config.write_text(BAD)
    result = subprocess.run(
        [sys.executable, "-m", "router", *command, "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )
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
        result = subprocess.run([sys.executable, "-m", "router", "run", "-c", str(config)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
