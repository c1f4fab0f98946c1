"""Starting any part of the router on a bad config is refused with file, line and reason.

These run the real `dicom-router` command line in a subprocess; no peer is
involved because nothing may start.
"""

from __future__ import annotations

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
