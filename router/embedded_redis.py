"""An embedded Redis for single-machine use (``dicom-router run`` without
``redis_url``): a ``redis-server`` child listening on a Unix socket in the
router's data directory, its append-only file beside it, stopped on exit.

A Unix socket rather than a loopback port: no other process can take the
port between choosing and binding it (a free port picked for Redis could be
the one the ingest SCP was about to bind), and nothing listens on TCP.
Only where the socket's path would be too long for ``sun_path`` does it
fall back to a free loopback port.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

log = logging.getLogger(__name__)


SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux, less elsewhere


class EmbeddedRedisError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def url_file(data_dir: Path) -> Path:
    """Where a running embedded Redis leaves its URL for the other commands."""
    return Path(data_dir) / "redis.url"


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis a running ``dicom-router run`` started, if any."""
    try:
        return url_file(data_dir).read_text().strip() or None
    except OSError:
        return None


class EmbeddedRedis:
    """Args:
    data_dir: where Redis keeps its files (created if missing).
    preexec_fn: run in the child before redis-server starts (the supervisor
        makes it die with the router).
    """

    def __init__(self, data_dir: Path, preexec_fn: Callable[[], None] | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.preexec_fn = preexec_fn
        self.socket_path = self.data_dir / "redis.sock"
        self.use_socket = len(str(self.socket_path).encode()) < SUN_PATH_MAX
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.use_socket:
            return f"unix://{self.socket_path}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def url_file(self) -> Path:
        return url_file(self.data_dir)

    def start(self, timeout: float = 10.0) -> str:
        """Start ``redis-server``; returns its URL once it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise EmbeddedRedisError(
                "no redis-server on PATH: install it (apt-get install redis-server) or set router.redis_url"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.use_socket:
            listen = ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            self.port = self.port or free_port()  # a restart keeps the port the children know
            listen = ["--bind", "127.0.0.1", "--port", str(self.port)]
        args = [
            binary,
            *listen,
            "--dir", str(self.data_dir),
            # Persistence on: the queues survive a restart (the spool would
            # rebuild them anyway, but faster is kinder to a large backlog).
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            # An instance's history is a hash of a dozen fields, its steps' JSON
            # 100-250 bytes each: above Redis's default 64-byte listpack limit
            # every history became a hashtable, 2.1 KiB per instance instead of
            # 1.3 (bench/bench_soak.py; README, "Redis").
            "--hash-max-listpack-value", "1024",
            "--hash-max-listpack-entries", "256",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=self.preexec_fn)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}; see {self.data_dir}/redis.log")
            try:
                client.ping()
                log.info("embedded Redis on %s (data in %s)", self.url, self.data_dir)
                # So that `dicom-router queues/retry` find the running router's Redis.
                self.url_file.write_text(self.url + "\n")
                return self.url
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout} s")

    def stop(self) -> None:
        self.url_file.unlink(missing_ok=True)
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # SIGTERM: redis-server flushes its AOF and exits
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
