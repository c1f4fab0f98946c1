"""``dicom-router run``: everything on one machine, as separate processes.

The ingest SCP, the routing worker and one forwarding worker per destination
(times its ``max_associations``) each run in their own process — a slow
destination then holds up only its own worker (PRODUCT.md §4.4), and more
cores help (one Python process does not scale with threads). A child that
dies is restarted; the spool and the reconciler make that lossless.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from router.cli import EXIT_CANNOT_LISTEN
from router.embedded_redis import EmbeddedRedis
from router.settings import Config

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0


@dataclass
class Child:
    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "router", *self.args], stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)


class Supervisor:
    """Args:
    config: the validated configuration.
    config_path: its file, handed to the children.
    """

    def __init__(self, config: Config, config_path: Path, log_level: str = "INFO") -> None:
        self.config = config
        self.config_path = config_path
        self.log_level = log_level
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self._stopping = False
        self.exit_code = 0

    def _children(self, redis_url: str) -> list[Child]:
        common = ["-c", str(self.config_path), "--redis-url", redis_url, "--log-level", self.log_level]
        children = [
            Child("ingest", ["ingest", *common]),
            Child("worker[route]", ["worker", *common, "--queue", "route"]),
        ]
        for name, destination in self.config.destinations.items():
            for n in range(destination.max_associations):
                children.append(Child(f"worker[{name}#{n}]", ["worker", *common, "--queue", name]))
        return children

    def run(self) -> int:
        """Start everything and watch it until SIGINT/SIGTERM; returns an exit code."""
        redis_url = self.config.router.redis_url
        if redis_url is None:
            self.redis = EmbeddedRedis(self.config.router.redis_data_dir)
            redis_url = self.redis.start()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.children = self._children(redis_url)
        try:
            for child in self.children:
                child.start()
            while not self._stopping:
                self._watch()
                time.sleep(0.5)
        finally:
            self._stop_all()
        return self.exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        self._stopping = True

    def _watch(self) -> None:
        if self.redis is not None and self.redis.process is not None and self.redis.process.poll() is not None:
            log.error("embedded Redis exited with %s; restarting it", self.redis.process.returncode)
            self.redis.start()  # same port and data: the children reconnect
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            if code == EXIT_CANNOT_LISTEN and not child.restarts:
                # The port is taken or not ours: say so once and stop, rather
                # than restart an ingest that cannot work.
                log.error("%s cannot listen on %s:%s; stopping", child.name, self.config.router.host,
                          self.config.router.port)
                self.exit_code = 1
                self._stopping = True
                return
            log.error("%s exited with %s; restarting", child.name, code)
            if time.monotonic() - child.started < 5:
                time.sleep(RESTART_DELAY * min(30, 2**child.restarts))
            child.restarts += 1
            child.start()

    def _stop_all(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop; killing it", child.name)
                child.process.kill()
                child.process.wait()
        if self.redis is not None:
            self.redis.stop()
        log.info("stopped")

