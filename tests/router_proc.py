"""The router itself as a real process, for end-to-end tests.

``dicom-router run`` (or ``ingest`` / ``worker`` separately) is started with
a config written from a dict, on a free loopback port, and stopped by PID
like every other peer (see tests/peers.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.peers import (
    LOOPBACK,
    PeerError,
    _Server,
    free_port,
    wait_for_listen,
    wait_for_listen_in_group,
)

ROUTER_AE = "DICOM_ROUTER"


def destination(port: int, ae_title: str = "STORESCP", **extra: Any) -> dict[str, Any]:
    """A destination entry for a peer on loopback, with test-sized retry delays."""
    entry: dict[str, Any] = {
        "ae_title": ae_title,
        "host": LOOPBACK,
        "port": port,
        "idle_timeout": 30,
        "retry": {"max_attempts": 3, "backoff_seconds": [0.3, 0.6, 1.0], "jitter": 0.1},
        "instance_retry": {"max_attempts": 3, "backoff_seconds": [0.3, 0.6, 1.0], "jitter": 0.1},
    }
    entry.update(extra)
    return entry


def router_config(
    workdir: Path,
    destinations: dict[str, dict[str, Any]],
    rules: list[dict[str, Any]] | None = None,
    redis_url: str | None = None,
    **router: Any,
) -> dict[str, Any]:
    """A whole config: every instance to every destination unless ``rules`` say otherwise."""
    settings: dict[str, Any] = {
        "ae_title": ROUTER_AE,
        "host": LOOPBACK,
        "port": 0,  # chosen at start
        "spool_dir": str(workdir / "spool"),
        "reconcile_interval": 1,
    }
    if redis_url:
        settings["redis_url"] = redis_url
    settings.update(router)
    if rules is None:
        rules = [{"name": "everything everywhere", "when": {}, "forward": list(destinations)}]
    return {"router": settings, "destinations": destinations, "rules": rules}


class RouterProcess(_Server):
    """``dicom-router COMMAND -c CONFIG``, started and stopped by PID.

    Args:
        workdir: where the config and log go.
        config: the config as a dict (``router.port`` 0 means: pick a free port).
        command: ``run``, ``ingest`` or ``worker``.
        args: extra command-line arguments (``--queue X``...).
    """

    stop_grace = 20.0

    def __init__(self, workdir: Path, config: dict[str, Any], command: str = "run", args: list[str] | None = None,
                 name: str | None = None, log_level: str = "DEBUG") -> None:
        self.name = name or command
        super().__init__(workdir)
        self.config = config
        self.command = command
        self.args = list(args or [])
        self.log_level = log_level
        self.config_path = self.workdir / f"{self.name}.yaml"
        self.fixed_port = int(config["router"].get("port") or 0)
        self.port = self.fixed_port

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM to ``run`` (or ``ingest``…) alone first, as systemd's ``KillMode=mixed``
        and ``docker stop`` do: the supervisor stops its children, then its embedded
        Redis, so no worker finds Redis gone while it stops. Then the group, as before."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._wait_exit(self.stop_grace if grace is None else grace)
        super().stop(grace)

    def _choose_ports(self) -> None:
        self.port = self.fixed_port or free_port()
        self.config["router"]["port"] = self.port
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "router", self.command, "-c", str(self.config_path),
                "--log-level", self.log_level, *self.args]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _wait_ready(self) -> None:
        if self.command == "ingest":
            wait_for_listen(self.proc, self.port, timeout=30)
            # The socket listens a moment before the line saying so is written:
            # a test reading the log at once must find it there.
            self._wait_for_log("listening on", "ingest did not log that it listens")
            return
        if self.command == "run":  # the listener is a child of the supervisor: one of our group
            wait_for_listen_in_group(self.proc, self.port, timeout=30)
            if self.log_level.upper() in ("DEBUG", "INFO"):  # as for ingest: the line comes a moment later
                self._wait_for_log("listening on", "run's ingest did not log that it listens")
            return
        self._wait_for_log("workers.worker: worker ", "worker did not report ready")

    def _wait_for_log(self, text: str, failure: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if self.proc.poll() is not None:
                raise PeerError(f"{self.command} exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise PeerError(failure)

    @property
    def spool(self) -> Path:
        return Path(self.config["router"]["spool_dir"])

    def children(self) -> dict[int, str]:
        """PID -> command line of this process's direct children (``run`` mode)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if self.proc is not None and ppid == self.proc.pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
        return found
