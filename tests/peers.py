"""Real peers for tests: redis-server, DCMTK storescp/storescu/echoscu, Orthanc.

Every server here binds loopback ports chosen by binding port 0, keeps the PID
of the process it started, and stops exactly that process (and, for servers
that fork, the process group it leads) in ``stop()``.  All are context
managers.  DCMTK programs and Orthanc get ``TCP_NODELAY=1`` in their
environment: Debian's DCMTK leaves Nagle on, which costs ~45 ms per C-STORE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

LOOPBACK = "127.0.0.1"
ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_PLUGIN_DIR = "/usr/share/orthanc/plugins"

# Implicit VR Little Endian: the one transfer syntax every SCP accepts (PS3.5 10.1).
IMPLICIT_LE = "1.2.840.10008.1.2"

# A presentation context ID is an odd number 1..255 (PS3.8 9.3.2.2), so one
# association carries at most 128 of them.
MAX_PRESENTATION_CONTEXTS = 128


class PeerError(RuntimeError):
    """A peer process failed to start, answer or stop."""


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago.

    The kernel picks it when binding port 0; servers started with it are
    checked to be alive and listening, and restarted on another port if
    someone else took it in between.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Args:
        host: address to connect to.
        port: TCP port.
        timeout: seconds before giving up.
        proc: when given, fail early if this process has exited (a server
            that died on "address in use" must not be mistaken for another
            process listening on the same port).

    Raises:
        PeerError: on timeout or when ``proc`` exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and _exited(proc):
            raise PeerError(f"process {proc.pid} exited before listening on "
                            f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise PeerError(f"nothing listening on {host}:{port} after {timeout} s")
            time.sleep(0.02)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXADDR:HEXPORT; state 0A is TCP_LISTEN.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def wait_for_listen(proc: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    """Wait until process ``proc`` itself listens on TCP ``port``.

    Unlike ``wait_for_port`` this opens no connection: storescp logs
    "Association Received" even for a bare TCP connect, which would spoil
    association counts.  It also proves the listener is our process.

    Raises:
        PeerError: on timeout or when ``proc`` exited.
    """
    deadline = time.monotonic() + timeout
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    while True:
        if _exited(proc):
            raise PeerError(f"process {proc.pid} exited before listening on port {port}")
        inodes = _listening_inodes(port)
        if inodes and _owns_socket(fd_dir, inodes):
            return
        if time.monotonic() > deadline:
            raise PeerError(f"process {proc.pid} not listening on port {port} "
                            f"after {timeout} s")
        time.sleep(0.02)


def wait_for_listen_in_group(proc: subprocess.Popen, port: int, timeout: float = 30.0) -> None:
    """Wait until a process of ``proc``'s process group (``proc`` leads it: started with
    ``start_new_session``) listens on TCP ``port``: a server whose listener is a child,
    such as ``dicom-router run``'s ingest.

    A port chosen free a moment ago may have been taken since by another test's
    server (two suites at once): connecting to it, as ``wait_for_port`` does,
    would take that one for ours and send it our instances.

    Raises:
        PeerError: on timeout or when ``proc`` exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        if _exited(proc):
            raise PeerError(f"process {proc.pid} exited before its group listened on port {port}")
        inodes = _listening_inodes(port)
        if inodes and any(_owns_socket(Path(f"/proc/{pid}/fd"), inodes) for pid in _group(proc.pid)):
            return
        if time.monotonic() > deadline:
            raise PeerError(f"no process of group {proc.pid} listening on port {port} after {timeout} s")
        time.sleep(0.02)


def _group(pgid: int) -> list[int]:
    """The PIDs of process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp
            found.append(int(entry.name))
    return found


def _owns_socket(fd_dir: Path, inodes: set[str]) -> bool:
    """True if a descriptor in ``fd_dir`` (/proc/PID/fd) is one of the socket ``inodes``."""
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _exited(proc: subprocess.Popen) -> bool:
    """True if ``proc`` has exited; a zombie is left unreaped (see _Server.stop)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def peer_env(**extra: str) -> dict[str, str]:
    """Environment for DCMTK programs and Orthanc: ours plus TCP_NODELAY=1."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


class _Server:
    """A server process we started: PID kept, stopped by PID, log to a file.

    Subclasses implement ``_command()`` and ``_wait_ready()``; ports are
    chosen in ``_choose_ports()`` so that a port race is retried.
    """

    name = "server"
    start_attempts = 3
    stop_grace = 10.0

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running server, or None."""
        return self.proc.pid if self.proc else None

    def _choose_ports(self) -> None:
        raise NotImplementedError

    def _keep_ports(self) -> None:
        """After the first start, pin the ports: a restart comes back on them."""
        self.fixed_port = self.port

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return peer_env()

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def start(self):
        """Start the server and wait until it answers; returns self.

        A server can be stopped (or killed) and started again: it comes back
        on the same ports, with the same directories, appending to its log.
        """
        if self.proc is not None:
            raise PeerError(f"{self.name} already started (pid {self.proc.pid})")
        last_error: Exception | None = None
        for _ in range(self.start_attempts):
            self._choose_ports()
            with open(self.log_path, "ab") as log:
                # Own session: a forking server's children share our process
                # group, so stop() can reach them through the PID we keep.
                self.proc = subprocess.Popen(
                    self._command(), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=self._env(), cwd=self.workdir,
                    start_new_session=True)
            try:
                self._wait_ready()
                self._keep_ports()
                return self
            except PeerError as exc:
                last_error = exc
                self.stop()
        raise PeerError(f"{self.name} did not start: {last_error}\n{self.log_tail()}")

    def signal_stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the server's process group without waiting."""
        if self.proc is None or self.proc.returncode is not None:
            return  # already reaped: its PID may belong to someone else now
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float | None = None) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds; reap it.

        Leftover members of its process group (children of a forking server
        still in an association) are killed while the leader is still an
        unreaped zombie, so the group ID cannot have been reused by then.
        """
        if self.proc is None:
            return
        grace = self.stop_grace if grace is None else grace
        self.signal_stop(signal.SIGTERM)
        if not self._wait_exit(grace):
            self.signal_stop(signal.SIGKILL)
            self._wait_exit(10)
        self.signal_stop(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def _wait_exit(self, timeout: float) -> bool:
        """Wait until the leader exited, without reaping it; True if it did."""
        deadline = time.monotonic() + timeout
        while True:
            if _exited(self.proc):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server and its group (a crash, for tests), and reap it."""
        if self.proc is None:
            return
        self.signal_stop(signal.SIGKILL)
        self._wait_exit(10)
        self.signal_stop(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def running(self) -> bool:
        """True while the process we started is alive (does not reap it)."""
        return self.proc is not None and not self._wait_exit(0)

    def log_text(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class RedisServer(_Server):
    """A private redis-server on a free loopback port.

    Args:
        workdir: its working and data directory.
        persistent: keep data across restarts (AOF with fsync every second
            plus RDB snapshots); default is a pure in-memory server.
        port: a fixed port (for restarting the same server); default free.
    """

    name = "redis"

    def __init__(self, workdir: str | os.PathLike, persistent: bool = False,
                 port: int | None = None):
        super().__init__(workdir)
        self.persistent = persistent
        self.fixed_port = port
        self.port: int | None = port

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0"""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _choose_ports(self) -> None:
        self.port = self.fixed_port or free_port()

    def _command(self) -> list[str]:
        cmd = [shutil.which("redis-server") or "redis-server",
               "--bind", LOOPBACK, "--port", str(self.port),
               "--dir", str(self.workdir), "--daemonize", "no",
               "--protected-mode", "yes", "--loglevel", "notice"]
        if self.persistent:
            cmd += ["--save", "1 1", "--appendonly", "yes",
                    "--appendfsync", "everysec"]
        else:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_ready(self) -> None:
        wait_for_listen(self.proc, self.port, timeout=10)
        deadline = time.monotonic() + 10
        while self.ping() is not True:
            if _exited(self.proc) or time.monotonic() > deadline:
                raise PeerError(f"redis on port {self.port} does not answer PING")
            time.sleep(0.05)

    def ping(self) -> bool:
        """PING over a raw socket (no client library needed)."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class StoreSCP(_Server):
    """DCMTK ``storescp`` as a destination that writes what it receives.

    Args:
        out_dir: where received files are written (created if missing).
        ae_title: its AE title.
        accept: ``"all"`` (``+xa``: every syntax DCMTK knows except JPEG
            Lossless Process 14 .57), ``"implicit-only"`` (``+xi``: forces a
            sender to decompress), or ``"default"`` (uncompressed only).
        fork: ``--fork``, one child per association (needed for concurrent
            associations).
        bit_preserving: ``+B``, write the received dataset bytes exactly as
            read (what byte-identity checks need); otherwise DCMTK re-encodes.
        track_completion: append each stored file's name to a completion log
            (``--exec-on-reception``) once it is fully written, so
            ``files()`` never shows a half-written file.  Costs one
            ``/bin/sh`` per instance; turn off for benchmarks.
        answer_delay: seconds storescp waits after writing each file before
            it answers (a slow archive): the completion command sleeps too,
            run in the foreground (``--exec-sync``). Needs
            ``track_completion``. (``--sleep-after`` takes whole seconds, and
            storescp cuts it short when a per-file command ends.)
        extra_args: more options, e.g. ``["--refuse"]``, ``["--abort-after"]``,
            ``["-pdu", "131072"]`` (a slow archive: ``answer_delay``, above).
        workdir: where the log and completion log go (default: beside out_dir).
        port: a fixed port (to restart "the same" destination); default free.
    """

    name = "storescp"
    ACCEPT_FLAGS = {"all": ["+xa"], "implicit-only": ["+xi"], "default": []}

    def __init__(self, out_dir: str | os.PathLike, ae_title: str = "STORESCP",
                 accept: str = "all", fork: bool = False,
                 bit_preserving: bool = True, track_completion: bool = True,
                 extra_args: Sequence[str] = (), workdir: str | os.PathLike | None = None,
                 port: int | None = None, answer_delay: float = 0.0):
        if accept not in self.ACCEPT_FLAGS:
            raise ValueError(f"accept must be one of {sorted(self.ACCEPT_FLAGS)}")
        if answer_delay and not track_completion:
            raise ValueError("answer_delay runs in the completion command: it needs track_completion")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if workdir is None:
            workdir = self.out_dir.parent / f"{self.out_dir.name}.storescp"
        super().__init__(workdir)
        self.ae_title = ae_title
        self.accept = accept
        self.fork = fork
        self.bit_preserving = bit_preserving
        self.track_completion = track_completion
        self.answer_delay = answer_delay
        self.extra_args = list(extra_args)
        self.fixed_port = port
        self.port: int | None = port
        self.done_path = self.workdir / "received.txt"

    def _choose_ports(self) -> None:
        self.port = self.fixed_port or free_port()

    def _command(self) -> list[str]:
        cmd = ["storescp", "-v", "-aet", self.ae_title, "-od", str(self.out_dir),
               *self.ACCEPT_FLAGS[self.accept]]
        if self.fork:
            cmd.append("--fork")
        if self.bit_preserving:
            cmd.append("+B")
        if self.track_completion:
            # #f is the file name storescp just finished writing (the command
            # runs after the C-STORE was processed).  ">>" appends with
            # O_APPEND, so lines from concurrent children do not interleave.
            command = f"echo '#f' >> '{self.done_path}'"
            if self.answer_delay:
                cmd += ["--exec-sync"]
                command += f"; sleep {self.answer_delay:g}"
            cmd += ["-xcr", command]
        cmd += self.extra_args
        cmd.append(str(self.port))
        return cmd

    def _wait_ready(self) -> None:
        wait_for_listen(self.proc, self.port, timeout=10)

    def files(self) -> list[Path]:
        """Received files, sorted by name.

        With ``track_completion`` only files whose C-STORE finished are
        listed; otherwise every file in ``out_dir`` (possibly one being
        written).
        """
        if not self.track_completion:
            return sorted(p for p in self.out_dir.iterdir() if p.is_file())
        try:
            names = self.done_path.read_text().split()
        except FileNotFoundError:
            return []
        return sorted({self.out_dir / n for n in names if (self.out_dir / n).is_file()})

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> received file, for every completed file."""
        return {str(pydicom.filereader.read_file_meta_info(f).MediaStorageSOPInstanceUID): f
                for f in self.files()}

    def association_count(self) -> int:
        """Associations received so far: one "Association Received" log entry each.

        Counted as occurrences in the whole log, not as lines: with
        ``--fork`` each child logs "Association Received in child process
        (pid: N)" into the shared log (inherited O_APPEND descriptor), and
        another child's "RECV: ...." progress dots can share its line.
        Readiness is checked without connecting (``wait_for_listen``),
        because storescp logs a bare TCP connect as an association too.
        """
        return self.log_text().count("Association Received")

    def store_request_count(self) -> int:
        """C-STORE requests received so far (retries and duplicates included)."""
        return self.log_text().count("Received Store Request")

    def wait_for_files(self, n: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least ``n`` distinct files were received; return them.

        Raises:
            PeerError: after ``timeout`` seconds, naming how many arrived.
        """
        deadline = time.monotonic() + timeout
        while True:
            files = self.files()
            if len(files) >= n:
                return files
            if time.monotonic() > deadline:
                raise PeerError(f"storescp {self.ae_title}: {len(files)} of {n} files "
                                f"after {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)


class Orthanc(_Server):
    """A private Orthanc with its own config, storage and ports.

    Orthanc has no bind-address option: its DICOM and HTTP ports listen on
    every interface; ``RemoteAccessAllowed: false`` keeps HTTP to loopback.
    The Debian package's own service (4242/8042) is never used.

    Args:
        workdir: config, storage, index and log go here.
        ae_title: its AE title.
        accept_all_transfer_syntaxes: accept every DICOM transfer syntax;
            False accepts implicit VR little endian only.
        transfer_syntaxes: explicit list for ``AcceptedTransferSyntaxes``
            (overrides the flag above).
        modalities: ``DicomModalities`` entries, name -> [AET, host, port]
            (storage commitment requesters and report targets must be there).
        plugins: load the Debian plugins (DICOMweb); off by default.
        config: further keys merged into the JSON config.
        verbose: start with ``--verbose``.
        dicom_port, http_port: fixed ports (e.g. a destination configured
            before it comes up); default free ones.
    """

    name = "orthanc"
    stop_grace = 15.0

    def __init__(self, workdir: str | os.PathLike, ae_title: str = "ORTHANC",
                 accept_all_transfer_syntaxes: bool = True,
                 transfer_syntaxes: Sequence[str] | None = None,
                 modalities: dict[str, Sequence] | None = None,
                 plugins: bool = False, config: dict | None = None,
                 verbose: bool = False, dicom_port: int | None = None,
                 http_port: int | None = None):
        super().__init__(workdir)
        self.ae_title = ae_title
        if transfer_syntaxes is None:
            transfer_syntaxes = (["1.2.840.10008.1.*"] if accept_all_transfer_syntaxes
                                 else [IMPLICIT_LE])
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.modalities = dict(modalities or {})
        self.plugins = plugins
        self.extra_config = dict(config or {})
        self.verbose = verbose
        self.config_path = self.workdir / "orthanc.json"
        self.fixed_ports = (dicom_port, http_port)
        self.dicom_port: int | None = dicom_port
        self.http_port: int | None = http_port
        # Bypass any HTTP proxy from the environment: we only talk to loopback.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def port(self) -> int | None:
        """The DICOM port (alias of dicom_port)."""
        return self.dicom_port

    @property
    def url(self) -> str:
        """Base URL of its REST API."""
        return f"http://{LOOPBACK}:{self.http_port}"

    def _choose_ports(self) -> None:
        fixed_dicom, fixed_http = self.fixed_ports
        self.dicom_port = fixed_dicom or free_port()
        self.http_port = fixed_http or free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self._write_config()

    def _keep_ports(self) -> None:
        self.fixed_ports = (self.dicom_port, self.http_port)

    def _write_config(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        config = {
            "Name": self.ae_title,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "AcceptedTransferSyntaxes": self.transfer_syntaxes,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [ORTHANC_PLUGIN_DIR] if self.plugins else [],
            "SaveJobs": False,
            "LoadPrivateDictionary": True,
        }
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2))

    def _command(self) -> list[str]:
        cmd = [ORTHANC_BIN]
        if self.verbose:
            cmd.append("--verbose")
        cmd.append(str(self.config_path))
        return cmd

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if _exited(self.proc):
                raise PeerError("Orthanc exited during start")
            try:
                system = self.rest("/system")
                if system.get("DicomPort") == self.dicom_port:
                    break
            except (OSError, PeerError):
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"Orthanc HTTP {self.http_port} not answering")
            time.sleep(0.05)
        wait_for_listen(self.proc, self.dicom_port, timeout=10)

    # -- REST ---------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None,
                 timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with self._http.open(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise PeerError(f"Orthanc {method} {path}: HTTP {exc.code} "
                            f"{exc.read()[:200]!r}") from exc

    def rest(self, path: str) -> object:
        """GET ``path`` from the REST API and decode the JSON answer."""
        return json.loads(self._request("GET", path))

    def rest_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API as raw bytes."""
        return self._request("GET", path)

    def post(self, path: str, payload: object) -> object:
        """POST JSON (or raw bytes) to ``path`` and decode the JSON answer."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        answer = self._request("POST", path, body)
        return json.loads(answer) if answer.strip() else None

    def delete(self, path: str) -> None:
        """DELETE ``path``."""
        self._request("DELETE", path)

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return self.rest("/instances")

    def instance_count(self) -> int:
        """``CountInstances`` from ``/statistics``."""
        return self.rest("/statistics")["CountInstances"]

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance (``/instances/ID/file``)."""
        return self.rest_bytes(f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str) -> dict:
        """``/instances/ID/simplified-tags``."""
        return self.rest(f"/instances/{instance_id}/simplified-tags")

    def instance_metadata(self, instance_id: str, name: str) -> str:
        """One metadata item, e.g. ``TransferSyntax``, ``RemoteAET``, ``CalledAET``."""
        return self.rest_bytes(f"/instances/{instance_id}/metadata/{name}").decode()

    def sop_instance_uids(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance ID for everything stored."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {},
                                          "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in found}

    def wait_for_instances(self, n: int, timeout: float = 30.0) -> list[str]:
        """Wait until at least ``n`` instances are stored; return their IDs.

        Raises:
            PeerError: after ``timeout`` seconds, naming how many arrived.
        """
        deadline = time.monotonic() + timeout
        while True:
            count = self.instance_count()
            if count >= n:
                return self.instances()
            if time.monotonic() > deadline:
                raise PeerError(f"Orthanc {self.ae_title}: {count} of {n} instances "
                                f"after {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)


# -- DCMTK clients ------------------------------------------------------------

def _file_contexts(files: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """(SOP Class UID, Transfer Syntax UID) of each file, from its file meta."""
    pairs = []
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        pairs.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    return pairs


def association_config(files: Iterable[str | os.PathLike], path: str | os.PathLike,
                       profile: str = "Files") -> tuple[Path, str]:
    """Write a DCMTK association config proposing exactly what ``files`` need.

    One presentation context per (SOP class, transfer syntax) present, each
    proposing only the file's own transfer syntax, so storescu sends every
    file as it is on disk (no conversion) and a mixed set of compressed and
    uncompressed files travels on ONE association.

    Returns:
        (config path, profile name) for ``storescu -xf PATH PROFILE``.

    Raises:
        ValueError: when the files need more than 128 presentation contexts.
    """
    pairs = sorted(set(_file_contexts(files)))
    if len(pairs) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(pairs)} (SOP class, transfer syntax) pairs: more than "
                         f"{MAX_PRESENTATION_CONTEXTS} presentation contexts")
    syntaxes = sorted({ts for _, ts in pairs})
    ts_key = {ts: f"TS{i}" for i, ts in enumerate(syntaxes, 1)}
    lines = ["[[TransferSyntaxes]]"]
    for ts in syntaxes:
        lines += [f"[{ts_key[ts]}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{i} = {sop}\\{ts_key[ts]}"
              for i, (sop, ts) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", f"[{profile}]", "PresentationContexts = Contexts"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path, profile


def storescu(host: str, port: int, files: Sequence[str | os.PathLike],
             called_ae: str = "ANY-SCP", calling_ae: str = "STORESCU",
             extra_args: Sequence[str] = (), timeout: float = 300.0,
             check: bool = False, halt_on_failure: bool = False) -> subprocess.CompletedProcess:
    """Send ``files`` with DCMTK storescu over one association, as they are.

    The association proposes exactly each file's (SOP class, transfer
    syntax), via a generated ``-xf`` association config, so compressed and
    uncompressed files go together unconverted.

    Args:
        host, port: the SCP.
        files: DICOM files with file meta.
        called_ae, calling_ae: AE titles.
        extra_args: more storescu options (e.g. ``["-pdu", "131072"]``).
        timeout: seconds before the process is killed.
        check: raise CalledProcessError on a non-zero exit.
        halt_on_failure: stop at the first failed C-STORE (default ``-nh``:
            carry on, like a modality would).

    Returns:
        The CompletedProcess; stdout holds storescu's ``-v`` log.
    """
    files = [str(f) for f in files]
    if not files:
        raise ValueError("storescu needs at least one file")
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        cfg, profile = association_config(files, Path(tmp) / "assoc.cfg")
        cmd = ["storescu", "-v", "-aet", calling_ae, "-aec", called_ae,
               "-xf", str(cfg), profile]
        if not halt_on_failure:
            cmd.append("-nh")
        cmd += [*extra_args, host, str(port), *files]
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=peer_env(), timeout=timeout, check=check)



@dataclass(frozen=True)
class StoreOutcome:
    """What storescu said about one file it was asked to send.

    Attributes:
        path: the file, as given to storescu.
        status: the words of its "Received Store Response (...)" line
            (``Success``, ``Warning...``, ``Refused: OutOfResources``...),
            or None when no C-STORE response came (storescu refused the
            file itself, or the association failed).
        messages: storescu's error and warning lines about this file.
        conversion: "A -> B" when storescu had to convert the file to
            another transfer syntax (the SCP accepted no presentation
            context for the file's own), else None.
    """

    path: str
    status: str | None
    messages: tuple[str, ...] = ()
    conversion: str | None = None

    @property
    def stored(self) -> bool:
        """The SCP answered Success or Warning: it holds the instance (PS3.4 B.2.3)."""
        return self.status is not None and self.status.startswith(("Success", "Warning"))

    @property
    def reason(self) -> str:
        """One line saying why it was not stored (empty when it was)."""
        if self.stored:
            return ""
        parts = [f"C-STORE response: {self.status}"] if self.status else []
        if self.conversion:
            parts.append(f"no context for its own syntax, storescu tried {self.conversion}")
        parts += [m for m in self.messages if m.startswith("E:")] or list(self.messages)
        text = "; ".join(parts) or "storescu neither sent it nor said why"
        return text.replace(self.path, Path(self.path).name)


_RESPONSE = re.compile(r"^I: Received Store Response \((.*)\)\s*$")
_CONVERSION = re.compile(r"^I: Converting transfer syntax: (.*) -> (.*?)\s*$")


def store_outcomes(output: str, files: Sequence[str | os.PathLike]) -> dict[str, StoreOutcome]:
    """Per-file outcomes parsed from the ``-v`` output of one storescu run.

    storescu logs "Sending file: PATH", then its warnings and errors about
    the file, then "Received Store Response (STATUS)" when the SCP answered.
    Lines printed elsewhere that name a file (e.g. while it checks its input
    files) are counted for that file too; a file never named gets the
    run's error lines (association rejected...).

    Returns:
        ``str(path)`` -> StoreOutcome, for every file in ``files``.
    """
    wanted = [str(f) for f in files]
    status: dict[str, str] = {}
    conversion: dict[str, str] = {}
    messages: dict[str, list[str]] = {f: [] for f in wanted}
    general: list[str] = []
    current = None
    for line in output.splitlines():
        if line.startswith("XMIT:"):
            continue
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: "):].strip()
            continue
        if line.startswith(("I: Releasing Association", "I: Requesting Association")):
            current = None
            continue
        match = _RESPONSE.match(line)
        if match and current is not None:
            status[current] = match.group(1)
            continue
        match = _CONVERSION.match(line)
        if match and current is not None:
            if match.group(1) != match.group(2):
                conversion[current] = f"{match.group(1)} -> {match.group(2)}"
            continue
        if not line.startswith(("E:", "W:", "F:")):
            continue
        named = [f for f in wanted if f in line]
        for f in named or ([current] if current in messages else []):
            messages[f].append(line.strip())
        if not named and current is None:
            general.append(line.strip())
    return {f: StoreOutcome(f, status.get(f), tuple(messages[f] or (general if f not in status else ())),
                            conversion.get(f))
            for f in wanted}


def context_groups(files: Sequence[str | os.PathLike],
                   limit: int = MAX_PRESENTATION_CONTEXTS) -> list[list[str]]:
    """Split ``files`` into groups that each need at most ``limit`` presentation contexts.

    Files are grouped by (SOP class, transfer syntax) so that each pair
    lives in one group; the groups are filled in that order.
    """
    by_pair: dict[tuple[str, str], list[str]] = {}
    for f, pair in zip(files, _file_contexts(files)):
        by_pair.setdefault(pair, []).append(str(f))
    groups: list[list[str]] = []
    pairs_in_group = limit
    for pair in sorted(by_pair):
        if pairs_in_group == limit:
            groups.append([])
            pairs_in_group = 0
        groups[-1].extend(by_pair[pair])
        pairs_in_group += 1
    return groups


def storescu_groups(host: str, port: int, files: Sequence[str | os.PathLike],
                    **kwargs) -> tuple[dict[str, StoreOutcome], list[subprocess.CompletedProcess]]:
    """Send a big mixed set as stored, one storescu run per group of <= 128 contexts.

    Args:
        host, port: the SCP.
        files: DICOM files with file meta, in any mix of SOP classes and
            transfer syntaxes.
        **kwargs: passed to ``storescu()`` (AE titles, extra_args, timeout).

    Returns:
        (``str(path)`` -> StoreOutcome for every file, the storescu runs).
    """
    outcomes: dict[str, StoreOutcome] = {}
    runs = []
    for group in context_groups(files):
        run = storescu(host, port, group, **kwargs)
        runs.append(run)
        outcomes.update(store_outcomes(run.stdout, group))
    return outcomes, runs


def wait_until(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        AssertionError: after ``timeout`` seconds, naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return found


def store_as_it_is(host: str, port: int, path: str | os.PathLike, called_ae: str,
                   calling_ae: str = "MODALITY") -> int:
    """C-STORE one file with pynetdicom exactly as it is on disk; returns the status.

    The command's UIDs come from the file meta and the data set bytes are
    sent unread, so this sends what DCMTK's storescu refuses to: a truncated
    data set, a meta that lies about the instance, a syntax DCMTK 3.6.7 does
    not know (HTJ2K). It plays a broken modality over a real association.
    """
    from pynetdicom import AE, _config

    meta = pydicom.filereader.read_file_meta_info(path)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            raise PeerError(f"no association with {host}:{port}")
        status = assoc.send_c_store(Path(path))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(status.Status)


def echoscu(host: str, port: int, called_ae: str = "ANY-SCP",
            calling_ae: str = "ECHOSCU", extra_args: Sequence[str] = (),
            timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess:
    """C-ECHO ``host:port`` with DCMTK echoscu; returncode 0 means success."""
    cmd = ["echoscu", "-v", "-aet", calling_ae, "-aec", called_ae, *extra_args,
           host, str(port)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=peer_env(), timeout=timeout, check=check)


def stop_all(servers: Iterable[_Server]) -> None:
    """Stop several servers concurrently (Orthanc alone takes ~3 s to stop)."""
    servers = [s for s in servers if s is not None]
    for s in servers:
        s.signal_stop(signal.SIGTERM)
    for s in servers:
        s.stop()
