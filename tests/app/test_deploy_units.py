"""The systemd units in deploy/systemd, checked offline by systemd itself
(`systemd-analyze verify`: a typo in a key, a value systemd cannot parse, a
missing executable all fail), and what each must carry (issue 21)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED = "/opt/dicom-router/.venv/bin/dicom-router"
UNITS = ["dicom-router.service", "dicom-router-ingest.service", "dicom-router-worker@.service"]


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def _as_here(name: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's dicom-router (systemd checks the file
    is executable); a template is verified as one of its instances."""
    text = (DEPLOY / name).read_text().replace(INSTALLED, str(Path(sys.executable).parent / "dicom-router"))
    target = tmp_path / name.replace("@.service", "@route.service")
    target.write_text(text)
    return target


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_is_one_systemd_accepts_without_a_warning(name, tmp_path):
    result = _verify(_as_here(name, tmp_path))
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_a_unit_with_a_typo_is_caught(tmp_path):
    """The check above fails on a broken unit: systemd warns on an unknown key."""
    unit = _as_here("dicom-router.service", tmp_path)
    unit.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key" in _verify(unit).stderr


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_is_hardened_reads_its_config_from_the_environment_and_restarts_only_what_helps(name):
    text = (DEPLOY / name).read_text()
    for line in ("User=dicom-router", "Environment=DICOM_ROUTER_CONFIG=/etc/dicom-router/router.yaml",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "StateDirectory=dicom-router",
                 "Restart=on-failure"):
        assert line in text.splitlines(), f"{name} lacks {line}"
    assert " -c " not in text.split("ExecStart=", 1)[1].splitlines()[0], "the config comes from DICOM_ROUTER_CONFIG"
    listens = "worker@" not in name
    assert ("RestartPreventExitStatus=78" in text) == listens  # EX_CONFIG: its port cannot be bound
    assert ("AmbientCapabilities=CAP_NET_BIND_SERVICE" in text) == listens  # port 104 without root
    if name == "dicom-router.service":
        assert "KillMode=mixed" in text  # run stops its children in order, the embedded Redis last


def test_the_sysusers_file_makes_the_user_the_units_run_as():
    result = subprocess.run(["systemd-sysusers", "--dry-run", str(DEPLOY / "dicom-router.sysusers")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "dicom-router" in result.stdout + result.stderr


def test_systemd_analyze_is_there():
    """tests/run installs systemd's tools when missing: these checks never skip."""
    assert shutil.which("systemd-analyze") and shutil.which("systemd-sysusers")
