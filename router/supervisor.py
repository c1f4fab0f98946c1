"""``dicom-router run``: everything on one machine, as separate processes.

The ingest SCP, the routing worker, one forwarding worker per destination
(times its ``max_associations``) and the dashboard (when the config has one)
each run in their own process — a slow
destination then holds up only its own worker (docs/guarantees.md, G4), and more
cores help (one Python process does not scale with threads). A child that
dies is restarted; the spool and the reconciler make that lossless.

The watch loop never sleeps on one child's behalf: each child has its own
back-off (doubling while it keeps dying young, reset once it has run
``HEALTHY_AFTER`` seconds), so an ingest killed while the workers crash-loop
on a missing Redis is back within a second. Children die with the
supervisor (``PR_SET_PDEATHSIG``), and a ``run`` started after a
``kill -9`` first stops whatever its predecessor's children left running
(their PIDs are kept in ``run.HOSTNAME.pids`` in the data directory).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from router.embedded_redis import EmbeddedRedis
from router.kernel.exitcodes import EXIT_CANNOT_LISTEN
from router.kernel.settings import Config
from router.kernel.spool import HOST

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
HEALTHY_AFTER = 30.0
"""Seconds a child must run before its back-off starts over."""
WATCH_INTERVAL = 0.2
STOP_GRACE = 15.0
ORPHAN_GRACE = 5.0

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM this process when its parent dies (Linux)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_time(pid: int) -> int | None:
    """The kernel's start time of a running ``pid`` (clock ticks since boot),
    None when it is gone or a zombie.

    With the PID it names one process for good: a PID reused by another
    program has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


@dataclass
class Child:
    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    started: float = 0.0
    restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "router", *self.args], stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def schedule_restart(self, now: float) -> float:
        """It exited: when to start it again (seconds from now)."""
        if now - self.started >= HEALTHY_AFTER:
            self.failures = 0
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** self.failures) if self.failures else 0.0
        self.failures += 1
        self.restart_at = now + delay
        return delay


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
        self._stop = threading.Event()
        self._signal: int | None = None
        self.exit_code = 0
        # One file per host: the data directory may be shared with other hosts (beside a shared spool).
        self.pid_file = config.router.redis_data_dir / f"run.{HOST}.pids"

    def _children(self, redis_url: str) -> list[Child]:
        common = ["-c", str(self.config_path), "--redis-url", redis_url, "--log-level", self.log_level]
        children = [
            Child("ingest", ["ingest", *common]),
            Child("worker[route]", ["worker", *common, "--queue", "route"]),
        ]
        for name, destination in self.config.destinations.items():
            for n in range(destination.max_associations):
                children.append(Child(f"worker[{name}#{n}]", ["worker", *common, "--queue", name]))
        if self.config.dashboard is not None:
            children.append(Child("dashboard", ["dashboard", *common, "--ingest-here"]))
        return children

    def run(self) -> int:
        """Start everything and watch it until SIGINT/SIGTERM; returns an exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.stop_orphans()
        redis_url = self.config.router.redis_url
        if redis_url is None:
            self.redis = EmbeddedRedis(self.config.router.redis_data_dir, preexec_fn=_die_with_parent)
            redis_url = self.redis.start()
        self.children = self._children(redis_url)
        try:
            for child in self.children:
                if self._stop.is_set():
                    break
                child.start()
            self._write_pids()
            while not self._stop.wait(WATCH_INTERVAL):
                self._watch()
        finally:
            if self._signal is not None:  # said here, after any start the signal came in the middle of
                log.info("signal %d: stopping", self._signal)
            self._stop_all()
        return self.exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        # No logging in a signal handler: it may have interrupted a log call of this thread.
        self._signal = signum
        self._stop.set()

    def _watch(self) -> None:
        if self.redis is not None and self.redis.process is not None and self.redis.process.poll() is not None:
            log.error("embedded Redis exited with %s; restarting it", self.redis.process.returncode)
            try:
                self.redis.start()  # same port and data: the children reconnect
            except Exception:  # noqa: BLE001 - slow to load, say: the next look starts it again
                log.exception("embedded Redis did not restart; trying again")
                return
            self._write_pids()
        now = time.monotonic()
        changed = False
        for child in self.children:
            if self._stop.is_set():
                return  # no start after stop
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                    changed = True
                continue
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            if code == EXIT_CANNOT_LISTEN and child.name == "ingest":
                # The port is taken or not ours: say so once and stop, rather
                # than restart an ingest that cannot work. (A dashboard that
                # cannot listen is restarted with its back-off: routing goes on.)
                log.error("%s cannot listen on %s:%s; stopping", child.name, self.config.router.host,
                          self.config.router.port)
                self.exit_code = 1
                self._stop.set()
                return
            delay = child.schedule_restart(now)
            log.error("%s exited with %s; restarting in %.1f s", child.name, code, delay)
        if changed:
            self._write_pids()

    def _stop_all(self) -> None:
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in running:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop; killing it", child.name)
                child.process.kill()
                child.process.wait()
        if self.redis is not None:
            self.redis.stop()
        self.pid_file.unlink(missing_ok=True)
        log.info("stopped")

    # -- what an earlier run left behind --

    def _write_pids(self) -> None:
        """Record the children (and the embedded Redis), so that a run after a crash can stop them."""
        processes = [c.process for c in self.children if c.process is not None]
        if self.redis is not None and self.redis.process is not None:
            processes.append(self.redis.process)
        lines = [f"{p.pid} {start_time(p.pid)}" for p in processes if start_time(p.pid) is not None]
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.pid_file)

    def stop_orphans(self) -> int:
        """Stop the processes an earlier ``run`` of this config left running; how many there were.

        Only a process whose PID and start time both match the record is
        signalled: a PID since reused by another program is left alone.
        """
        try:
            records = self.pid_file.read_text().split("\n")
        except FileNotFoundError:
            return 0
        orphans = []
        for line in records:
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and start_time(int(fields[0])) == int(fields[1]):
                orphans.append(int(fields[0]))
        for pid in orphans:
            log.warning("stopping pid %d, left running by an earlier run of this router", pid)
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + ORPHAN_GRACE
        for pid in orphans:
            while start_time(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if start_time(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return len(orphans)
