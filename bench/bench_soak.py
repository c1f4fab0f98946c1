"""The soak of issue 20: thousands of instances while the destination is down, then delivered.

Run: ``.venv/bin/python bench/bench_soak.py [--count 10000] [--size-kib 64]
[--senders 2] [--down 60] [--every 10] [--settle 15] [--timeout 1800] [--keep]``

The goal it shows: "10,000 instances with a destination down for the first
minute: memory of every process flat (end <= 1.25x its size after the first
2,000), all delivered, the spool empty at the end."

* N CT instances (Explicit VR LE, ``tests.data.ct_series``) are written once,
  in folders of ``--chunk`` files: one folder is one storescu association.
* A free port is picked for the destination and nothing is started on it.
  ``dicom-router run`` starts (embedded Redis, log level INFO, the
  ``tests.router_proc`` config with that one destination, ``reconcile_interval``
  30 s = the product default), as ``bench_pipeline.measure_router`` does.
* ``--senders`` threads each run DCMTK storescu over their share of the
  folders, one after the other (``+sd``: the command line stays short).
  The first one starts at t = 0.
* At t = ``--down`` s the destination (storescp, no ``+B``, no ``--fork``)
  starts on that port; the router, which held the destination and probes it
  (workers/probe.py), must then deliver everything.
* Every second: VmRSS of every process of the router's tree (bench_pipeline's
  process_tree and role), the spool's file counts, the files at the
  destination, the C-STOREs storescu saw answered.
* "After the first 2,000": the sample at which the router had first received
  ``--baseline`` instances (default N/5 = 2,000 of 10,000; received = files
  in the spool's incoming/, out/*/, dead/*/, quarantine/ plus files at the
  destination). "End": once every sender is done, the destination is up and
  incoming/ and out/*/ are empty, ``--settle`` s later.

Exit status 0 only if every criterion passes (memory flat, all sent, all
delivered, spool empty, no router process exited), 1 otherwise. A JSON copy
goes to ``bench/results/``. See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pydicom  # noqa: E402
import redis  # noqa: E402

from bench_pipeline import (  # noqa: E402
    BenchRouter,
    _cmdline,
    _count,
    _git,
    _stat,
    _table,
    memory,
    process_tree,
    role,
)
from tests.data import ct_series  # noqa: E402
from tests.peers import LOOPBACK, StoreSCP, association_config, free_port, peer_env  # noqa: E402
from tests.router_proc import ROUTER_AE, destination, router_config  # noqa: E402

RESULTS = BENCH / "results"
DEST = "pacs"
DEST_AE = "PACS"
LIMIT = 1.25  # end RSS <= LIMIT x RSS at the baseline
POLL = 0.1  # s between looks at the spool while the baseline or the drain is awaited


class Interrupted(Exception):
    """SIGTERM: unwind and stop everything we started."""


class SoakTimeout(Exception):
    """--timeout passed before the end."""


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


# -- data ----------------------------------------------------------------------

def generate(data_dir: Path, n: int, size_kib: int, chunk: int) -> list[tuple[Path, int]]:
    """N instances in folders of ``chunk`` files; returns (folder, files in it)."""
    files = ct_series(data_dir / "all", n, size_kib=size_kib)
    folders = []
    for start in range(0, n, chunk):
        folder = data_dir / f"c{start // chunk:04d}"
        folder.mkdir()
        part = files[start:start + chunk]
        for f in part:
            os.rename(f, folder / f.name)
        folders.append((folder, len(part)))
    (data_dir / "all").rmdir()
    return folders


def sop_uid_of_name(name: str) -> str:
    """storescp's default file name is ``<modality>.<SOP Instance UID>``."""
    return name.split(".", 1)[1] if "." in name else name


# -- senders -------------------------------------------------------------------

class Senders:
    """``nsenders`` threads, each running storescu over its folders one after the other."""

    def __init__(self, folders: list[tuple[Path, int]], nsenders: int, port: int, workdir: Path) -> None:
        first = next(folders[0][0].iterdir())
        self.cfg, self.profile = association_config([first], workdir / "assoc.cfg")
        self.shares = [folders[k::nsenders] for k in range(nsenders)]
        self.port = port
        self.logs = [workdir / f"storescu-{k}.log" for k in range(nsenders)]
        self._offsets = [0] * nsenders
        self._rest = [b""] * nsenders
        self.success = 0
        self.other = 0
        self.runs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.started = 0.0
        self.ended: list[float | None] = [None] * nsenders
        self.finished: float | None = None

    def start(self) -> float:
        self.started = time.monotonic()
        for k in range(len(self.shares)):
            thread = threading.Thread(target=self._run, args=(k,), name=f"sender-{k}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self.started

    def _run(self, k: int) -> None:
        try:
            self._send(k)
        finally:
            self.ended[k] = time.monotonic()

    def _send(self, k: int) -> None:
        for folder, nfiles in self.shares[k]:
            cmd = ["storescu", "-v", "-aet", f"SOAKSCU{k}", "-aec", ROUTER_AE, "-xf", str(self.cfg), self.profile,
                   "-nh", "+sd", LOOPBACK, str(self.port), str(folder)]
            with self.lock:
                if self.stopping.is_set():
                    return
                begun = time.monotonic()
                try:
                    with open(self.logs[k], "ab") as log:
                        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=peer_env())
                except OSError as exc:
                    self.errors.append(f"sender {k}: {exc}")
                    return
                self.procs[proc.pid] = proc
            code = proc.wait()
            with self.lock:
                self.procs.pop(proc.pid, None)
                self.runs.append({"sender": k, "folder": folder.name, "files": nfiles, "exit": code,
                                  "start_s": round(begun - self.started, 2),
                                  "seconds": round(time.monotonic() - begun, 2)})
                if code != 0 and not self.stopping.is_set():
                    self.errors.append(f"sender {k}: storescu exited {code} on {folder.name} (see {self.logs[k].name})")

    def done(self) -> bool:
        if self.finished is None and self.threads and not any(t.is_alive() for t in self.threads):
            self.finished = max(t for t in self.ended if t is not None)
        return self.finished is not None

    def count_responses(self) -> int:
        """C-STORE responses in storescu's -v logs so far (read incrementally); returns the successes."""
        for k, path in enumerate(self.logs):
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[k])
                    data = f.read()
            except FileNotFoundError:
                continue
            self._offsets[k] += len(data)
            data = self._rest[k] + data
            cut = data.rfind(b"\n") + 1
            whole, self._rest[k] = data[:cut], data[cut:]
            responses = whole.count(b"Received Store Response (")
            ok = whole.count(b"Received Store Response (Success")
            self.success += ok
            self.other += responses - ok
        return self.success

    def stop(self) -> None:
        """Stop the threads: kill the storescu each is running, by PID."""
        self.stopping.set()
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for thread in self.threads:
            thread.join(timeout=10)


# -- router processes ----------------------------------------------------------

class Processes:
    """The router's process tree, each process labelled once by its role.

    A process is known by (PID, start time); a second process of the same role
    (two forwarding workers of one destination, a restarted worker) gets
    ``role#2``, ``role#3``... Processes that are not there at the start
    (redis' save children...) are tracked too, as transient ones.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.root_cmd = _cmdline(root)
        self.labels: dict[tuple[int, int], str] = {}
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.core: list[str] = []
        self.exited: dict[str, float] = {}

    def scan(self, t: float) -> dict[str, int]:
        """label -> PID of what is alive now."""
        alive: dict[str, int] = {}
        for pid, cmd in process_tree(self.root).items():
            st = _stat(pid)
            if st is None:
                continue
            key = (pid, st[2])
            label = self.labels.get(key)
            if label is None:
                base = role(cmd, self.root_cmd)
                used = set(self.labels.values())
                label, k = base, 1
                while label in used:
                    k += 1
                    label = f"{base}#{k}"
                self.labels[key] = label
                self.first_seen[label] = t
            self.last_seen[label] = t
            alive[label] = pid
        for label in self.last_seen:
            if label not in alive and label not in self.exited:
                self.exited[label] = t
        return alive

    def mark_core(self, alive: dict[str, int]) -> None:
        """The processes there once the router is ready: judged, shown as columns."""
        self.core = list(alive)

    def judged(self, label: str) -> bool:
        """One of the router's own processes (there at the start, or a later one of the same role)."""
        return label.split("#")[0] in {c.split("#")[0] for c in self.core}

    def judged_labels(self) -> list[str]:
        """The start's processes first, then later ones of the same roles (restarts)."""
        return list(self.core) + [lb for lb in self.first_seen if lb not in self.core and self.judged(lb)]


def spool_counts(spool: Path) -> dict[str, int]:
    """Files per spool state (instances only, not their .json notes)."""

    def files(folder: Path, suffixes: tuple[str, ...] = (".dcm",)) -> int:
        try:
            return sum(1 for e in os.scandir(folder) if e.name.endswith(suffixes))
        except FileNotFoundError:
            return 0

    def per_destination(folder: Path) -> int:
        try:
            return sum(files(Path(e.path)) for e in os.scandir(folder) if e.is_dir())
        except FileNotFoundError:
            return 0

    return {"incoming": files(spool / "incoming"), "out": per_destination(spool / "out"),
            "dead": per_destination(spool / "dead"), "quarantine": files(spool / "quarantine", (".dcm", ".bin")),
            "tmp": _count(spool / "tmp")}


class RedisProbe:
    """The router's embedded Redis, read-only: its data size each second, what its keys are at the end.

    Tells Redis's own data (``used_memory``) from the RSS of its process
    (which also holds what the allocator keeps after data is freed).
    """

    def __init__(self, data_dir: Path) -> None:
        self.client: redis.Redis | None = None
        try:
            url = (data_dir / "redis.url").read_text().strip()  # left there by router/embedded_redis.py
            self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
            self.client.ping()
        except (OSError, redis.RedisError):
            self.client = None

    def sample(self) -> dict[str, int]:
        if self.client is None:
            return {}
        try:
            info = self.client.info("memory")
            return {"used_kib": int(info["used_memory"]) // 1024, "keys": int(self.client.dbsize())}
        except (redis.RedisError, KeyError, ValueError):
            return {}

    HISTORY = ("dicom-router:instance:*", "dicom-router:find:*")
    """The per-instance histories and their identifier index, kept 7 days by design
    (router/kernel/history.py): Redis memory that grows with instances received, not with the backlog."""

    def history_kib(self) -> int | None:
        """MEMORY USAGE of every history key, in KiB (None without Redis)."""
        if self.client is None:
            return None
        total = 0
        try:
            for pattern in self.HISTORY:
                keys = list(self.client.scan_iter(match=pattern, count=1000))
                for start in range(0, len(keys), 1000):
                    pipe = self.client.pipeline(transaction=False)
                    for key in keys[start:start + 1000]:
                        pipe.memory_usage(key)
                    total += sum(size or 0 for size in pipe.execute())
        except redis.RedisError:
            return None
        return total // 1024

    def census(self) -> dict[str, dict[str, Any]]:
        """Keys by kind (the key up to its variable part): count, MEMORY USAGE in all, the largest, a TTL."""
        if self.client is None:
            return {}
        found: dict[str, dict[str, Any]] = {}
        try:
            keys = list(self.client.scan_iter(count=1000))
            for start in range(0, len(keys), 1000):
                batch = keys[start:start + 1000]
                pipe = self.client.pipeline(transaction=False)
                for key in batch:
                    pipe.memory_usage(key)
                for key, size in zip(batch, pipe.execute()):
                    text = key.decode(errors="replace")
                    parts = text.split(":")
                    kind = ":".join(parts[:2]) if len(parts) > 2 else text
                    entry = found.setdefault(kind, {"keys": 0, "bytes": 0, "largest": text, "largest_bytes": -1})
                    entry["keys"] += 1
                    entry["bytes"] += size or 0
                    if (size or 0) > entry["largest_bytes"]:
                        entry["largest"], entry["largest_bytes"] = text, size or 0
            for entry in found.values():
                entry["ttl_s"] = self.client.ttl(entry["largest"])
        except redis.RedisError as exc:
            return {"error": {"keys": 0, "bytes": 0, "largest": str(exc), "largest_bytes": 0, "ttl_s": None}}
        return dict(sorted(found.items(), key=lambda kv: -kv[1]["bytes"]))


# -- the run -------------------------------------------------------------------

class Soak:
    def __init__(self, opts: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.opts = opts
        self.workdir = workdir
        self.stack = stack
        self.samples: list[dict[str, Any]] = []
        self.events: dict[str, float] = {}
        self.baseline: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.peak_kib: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}
        self.scp: StoreSCP | None = None
        self.timed_out = False

    def setup(self, folders: list[tuple[Path, int]]) -> None:
        """Start the router (the destination's port left dead) and prepare the senders."""
        opts = self.opts
        port = free_port()  # the destination's: nothing listens on it yet
        config = router_config(self.workdir / "router", {DEST: destination(port, DEST_AE)},
                               reconcile_interval=30.0)  # the product default (tests use 1 s)
        router = BenchRouter(self.workdir / "router", config, log_level="INFO")
        self.router = router
        self.stack.callback(router.stop)
        router.start()
        router.wait_workers(1 + config["destinations"][DEST].get("max_associations", 1))
        self.redis = RedisProbe(router.spool.parent / "redis")
        self.procs = Processes(router.pid)
        self.procs.mark_core(self.procs.scan(0.0))
        self.dest_dir = self.workdir / "destination"
        self.senders = Senders(folders, opts.senders, router.port, self.workdir)
        self.stack.callback(self.senders.stop)
        print(f"router up (pid {router.pid}, port {router.port}; processes: {', '.join(self.procs.core)}); "
              f"destination port {port}, down until t={opts.down:g} s", flush=True)
        self.port = port

    def run(self, deadline: float) -> None:
        """Send, start the destination at --down, sample every second until drained + --settle."""
        opts, router = self.opts, self.router
        t0 = self.t0 = self.senders.start()
        up_at = t0 + opts.down
        next_sample = t0
        drained_at: float | None = None
        while True:
            self._destination_if_due(up_at)
            sample = self.sample(time.monotonic() - t0)
            if self.senders.done() and "sent" not in self.events:
                self.events["sent"] = self.senders.finished - t0
            if drained_at is not None and time.monotonic() >= drained_at + opts.settle:
                sample["redis"]["history_kib"] = self.redis.history_kib()
                self.end = sample
                self.events["end"] = sample["t"]
                break
            if not router.running():
                raise RuntimeError(f"the router exited\n{router.log_tail()}")
            if time.monotonic() > deadline:
                self.timed_out = True
                raise SoakTimeout(f"--timeout {opts.timeout:g} s reached at t={sample['t']:.0f} s")
            next_sample += 1.0
            # Until the next 1 s sample: start the destination on time, take the
            # baseline sample as soon as --baseline instances are in, note the
            # moment the spool is drained (polled every POLL s when awaited).
            while (pause := next_sample - time.monotonic()) > 0:
                if self._destination_if_due(up_at):
                    continue
                fast = False
                if self.baseline is None:
                    fast = True
                    if self.received() >= opts.baseline:
                        self.sample(time.monotonic() - t0)
                        continue
                if drained_at is None and self.scp is not None and self.senders.done():
                    fast = True
                    counts = spool_counts(self.router.spool)
                    if counts["incoming"] == 0 and counts["out"] == 0:
                        drained_at = time.monotonic()
                        self.events["drained"] = drained_at - t0
                        print(f"t={drained_at - t0:.1f} s: spool drained", flush=True)
                        continue
                wake = min(pause, POLL) if fast else pause
                if self.scp is None:
                    wake = min(wake, max(0.0, up_at - time.monotonic()))
                time.sleep(wake)

    def _destination_if_due(self, up_at: float) -> bool:
        """Start the destination (storescp on the port the router was given) once ``up_at`` has come."""
        if self.scp is not None or time.monotonic() < up_at:
            return False
        self.scp = StoreSCP(self.dest_dir, ae_title=DEST_AE, accept="all", fork=False, bit_preserving=False,
                            track_completion=False, port=self.port, workdir=self.workdir / "storescp")
        self.stack.callback(self.scp.stop)
        self.scp.start()
        self.events["destination up"] = time.monotonic() - self.t0
        print(f"t={self.events['destination up']:.1f} s: destination up", flush=True)
        return True

    def received(self) -> int:
        """Instances the router holds or delivered: spool incoming/, out/*/, dead/*/, quarantine/ + destination."""
        counts = spool_counts(self.router.spool)
        return (counts["incoming"] + counts["out"] + counts["dead"] + counts["quarantine"]
                + _count(self.dest_dir))

    def sample(self, t: float) -> dict[str, Any]:
        alive = self.procs.scan(t)
        rss = {}
        for label, pid in alive.items():
            mem = memory(pid)
            if "VmRSS" in mem:
                rss[label] = mem["VmRSS"]
                self.peak_kib[label] = max(self.peak_kib.get(label, 0), mem.get("VmHWM", 0))
            st = _stat(pid)
            if st:
                self.cpu_s[label] = st[1]
        # Acknowledged before counting the spool: the router answers an instance once
        # it is durable, so ``acked`` > ``received`` would be an instance answered but not held.
        acked = self.senders.count_responses()
        counts = spool_counts(self.router.spool)
        delivered = _count(self.dest_dir)
        sample = {"t": round(t, 1), **counts, "delivered": delivered,
                  "received": counts["incoming"] + counts["out"] + counts["dead"] + counts["quarantine"] + delivered,
                  "acked": acked, "rss_kib": rss, "redis": self.redis.sample()}
        self.samples.append(sample)
        if self.baseline is None and sample["received"] >= self.opts.baseline:
            sample["redis"]["history_kib"] = self.redis.history_kib()
            self.baseline = sample
            self.events[f"{self.opts.baseline} received"] = sample["t"]
        return sample


# -- verification and report ---------------------------------------------------

def sent_uids(folders: list[tuple[Path, int]]) -> set[str]:
    return {str(pydicom.filereader.read_file_meta_info(f).MediaStorageSOPInstanceUID)
            for folder, _ in folders for f in folder.iterdir()}


_NORMALIZE = [(re.compile(r"\b[0-9a-f]{16}-[0-9a-f]{8}\b"), "<id>"), (re.compile(r"\b\d+(\.\d+)+\b"), "<n.n>"),
              (re.compile(r"\d+"), "<n>")]


def log_summary(text: str) -> dict[str, Any]:
    """Lines per level, and the distinct WARNING/ERROR messages (numbers and ids masked) with counts."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    tracebacks = 0
    for line in text.splitlines():
        if line.startswith("Traceback"):
            tracebacks += 1
        match = re.search(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)
        if not match:
            continue
        levels[match.group(1)] += 1
        if match.group(1) in ("WARNING", "ERROR", "CRITICAL"):
            msg = match.group(1) + " " + line[match.end():].strip()
            for pattern, repl in _NORMALIZE:
                msg = pattern.sub(repl, msg)
            messages[msg[:200]] += 1
    return {"levels": dict(levels), "tracebacks": tracebacks, "messages": messages.most_common(12)}


def queues_json(router: BenchRouter) -> Any:
    """``dicom-router queues --json`` against the running router (Redis's view of what is left)."""
    try:
        out = subprocess.run([sys.executable, "-m", "router", "queues", "-c", str(router.config_path), "--json"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {"error": f"exit {out.returncode}: {(out.stdout + out.stderr)[-500:]}"}


def timeline(soak: Soak, every: float) -> tuple[str, list[str]]:
    labels = soak.procs.judged_labels()
    marks: dict[int, list[str]] = {}
    for name, t in soak.events.items():
        if name in ("drained", "sent", "destination up"):
            # the sample right after the event
            idx = next((i for i, s in enumerate(soak.samples) if s["t"] >= t), len(soak.samples) - 1)
        else:
            idx = next((i for i, s in enumerate(soak.samples) if s["t"] == t), None)
        if idx is not None:
            marks.setdefault(idx, []).append(name)
    rows = []
    next_t = 0.0
    for i, s in enumerate(soak.samples):
        show = i in marks or i == len(soak.samples) - 1
        if s["t"] >= next_t - 0.5:
            show = True
            while next_t - 0.5 <= s["t"]:
                next_t += every
        if not show:
            continue
        t = f"{s['t']:.0f}" if s["t"] == int(s["t"]) else f"{s['t']:.1f}"
        rows.append([t, str(s["acked"]), str(s["received"]), str(s["delivered"]), str(s["incoming"]),
                     str(s["out"]), str(s["dead"] + s["quarantine"]),
                     *(mib(s["rss_kib"].get(lb)) for lb in labels),
                     mib(s["redis"].get("used_kib")), str(s["redis"].get("keys", "-")), ", ".join(marks.get(i, []))])
    header = ["t s", "acked", "received", "delivered", "incoming", "out", "dead+q", *labels,
              "redis data", "redis keys", "event"]
    return _table(header, rows), labels


def summarize(soak: Soak, n: int, opts: argparse.Namespace, uids_sent: set[str]) -> tuple[str, dict[str, Any], bool]:
    lines = []
    criteria: dict[str, dict[str, Any]] = {}
    base, end = soak.baseline, soak.end
    rows = []
    per_process = {}
    flat_ok = base is not None and end is not None
    worst = None
    transient: Counter[str] = Counter()
    # Redis keeps each instance's history 7 days after its last step, by design (journeys,
    # commitment answers: router/kernel/history.py): data that grows with instances
    # received, which no soak of minutes sees expire. Redis is judged on the rest of its
    # memory: its RSS less what the histories grew by (MEMORY USAGE of each history key).
    history_growth = None
    hb = (base or {}).get("redis", {}).get("history_kib")
    he = (end or {}).get("redis", {}).get("history_kib")
    if hb is not None and he is not None:
        history_growth = max(0, he - hb)
    for label in soak.procs.first_seen:
        at_base = base["rss_kib"].get(label) if base else None
        at_end = end["rss_kib"].get(label) if end else None
        ratio = at_end / at_base if at_base and at_end else None
        if label == "redis" and ratio is not None and history_growth is not None:
            ratio = (at_end - history_growth) / at_base
        sampled = [s["rss_kib"][label] for s in soak.samples if label in s["rss_kib"]]
        after_base = [s["rss_kib"][label] for s in soak.samples
                      if label in s["rss_kib"] and base is not None and s["t"] >= base["t"]]
        if not soak.procs.judged(label):
            transient[label.split("#")[0]] += 1
            per_process[label] = {"seen_s": [soak.procs.first_seen[label], soak.procs.last_seen[label]],
                                  "vmhwm_kib": soak.peak_kib.get(label), "verdict": "transient"}
            continue
        if ratio is None:
            verdict = "FAIL" if base is not None and end is not None else "-"
            flat_ok = False
        else:
            verdict = "PASS" if ratio <= LIMIT else "FAIL"
            flat_ok = flat_ok and ratio <= LIMIT
            if worst is None or ratio > worst[1]:
                worst = (label, ratio)
        per_process[label] = {"rss_at_baseline_kib": at_base, "rss_end_kib": at_end, "ratio": ratio,
                              "max_sampled_kib": max(sampled, default=None),
                              "max_after_baseline_kib": max(after_base, default=None),
                              "vmhwm_kib": soak.peak_kib.get(label), "cpu_s": soak.cpu_s.get(label),
                              "seen_s": [soak.procs.first_seen[label], soak.procs.last_seen[label]],
                              "exited_at_s": soak.procs.exited.get(label), "verdict": verdict}
        shown = "-" if ratio is None else f"{ratio:.2f}"
        if label == "redis" and ratio is not None and history_growth is not None:
            shown += f" (less {mib(history_growth)} MiB of histories)"
        rows.append([label, mib(at_base), mib(max(after_base, default=None)), mib(at_end),
                     shown, mib(soak.peak_kib.get(label)),
                     f"{soak.cpu_s.get(label, 0):.1f}", verdict])
    title = (f"Per process: RSS MiB at {base['received'] if base else '?'} received (t={base['t']:.0f} s), "
             f"at the end (t={end['t']:.0f} s)" if base and end else "Per process: RSS MiB (run incomplete)")
    lines += [title, _table(["process", "at baseline", "max after", "end", "end/base", "peak (HWM)", "CPU s",
                             f"<= {LIMIT}x"], rows)]
    if transient:
        lines.append("short-lived children seen (not judged): "
                     + ", ".join(f"{name} x{k}" for name, k in sorted(transient.items())))
    lines.append("")
    criteria["memory flat"] = {"pass": flat_ok, "worst": worst}
    detail = f"worst {worst[0]} {worst[1]:.2f}x" if worst else "no baseline or no end sample"
    lines.append(f"memory flat (end <= {LIMIT}x at {opts.baseline} received, every router process): "
                 f"{'PASS' if flat_ok else 'FAIL'} ({detail})")
    # How much of Redis's growth the histories are, and what the rest did.
    ub = (base or {}).get("redis", {}).get("used_kib")
    ue = (end or {}).get("redis", {}).get("used_kib")
    if None not in (hb, he, ub, ue) and base and end and end["received"] > base["received"]:
        per = (he - hb) * 1024 / (end["received"] - base["received"])
        rest_b, rest_e = ub - hb, ue - he
        criteria["redis without histories"] = {"history_kib": [hb, he], "used_kib": [ub, ue],
                                               "history_bytes_per_instance": round(per),
                                               "rest_kib": [rest_b, rest_e]}
        lines.append(f"  redis data: the per-instance histories (kept 7 days) {mib(hb)} -> {mib(he)} MiB, "
                     f"{per:.0f} B per instance received; everything else (queues, streams, the keyspace's own tables) "
                     f"{mib(rest_b)} -> {mib(rest_e)} MiB "
                     f"({rest_e / rest_b if rest_b else float('nan'):.2f}x)")

    # sent
    acked = soak.senders.success
    bad_runs = [r for r in soak.senders.runs if r["exit"] != 0]
    sent_ok = acked >= n and not bad_runs and not soak.senders.errors and soak.senders.other == 0
    criteria["all sent"] = {"pass": sent_ok, "acked_success": acked, "other_responses": soak.senders.other,
                            "storescu_runs": len(soak.senders.runs), "failed_runs": bad_runs,
                            "errors": soak.senders.errors}
    sent_s = soak.events.get("sent")
    rate = f", {n / sent_s:.0f} inst/s" if sent_s else ""
    lines.append(f"all sent: {'PASS' if sent_ok else 'FAIL'} ({acked} of {n} C-STOREs answered Success, "
                 f"{soak.senders.other} other answers, {len(soak.senders.runs)} storescu runs, {len(bad_runs)} "
                 f"exited non-zero; last one done at t={sent_s if sent_s is None else round(sent_s, 1)} s{rate})")

    # delivered
    names = os.listdir(soak.dest_dir) if soak.dest_dir.exists() else []
    got = {sop_uid_of_name(x) for x in names}
    missing = uids_sent - got
    requests = soak.scp.store_request_count() if soak.scp else 0
    delivered_ok = len(names) >= n and not missing
    criteria["all delivered"] = {"pass": delivered_ok, "files": len(names), "distinct_uids": len(got),
                                 "missing": len(missing), "missing_examples": sorted(missing)[:5],
                                 "store_requests_at_destination": requests}
    lines.append(f"all delivered: {'PASS' if delivered_ok else 'FAIL'} ({len(names)} files at the destination, "
                 f"{len(got)} distinct SOP Instance UIDs, {len(missing)} of the {len(uids_sent)} sent missing; "
                 f"{requests} C-STORE requests received there, {max(0, requests - len(got))} more than instances)")

    # spool
    counts = spool_counts(soak.router.spool)
    spool_ok = counts["incoming"] == counts["out"] == counts["dead"] == counts["quarantine"] == 0
    criteria["spool empty"] = {"pass": spool_ok, **counts}
    lines.append(f"spool empty: {'PASS' if spool_ok else 'FAIL'} (incoming {counts['incoming']}, out "
                 f"{counts['out']}, dead {counts['dead']}, quarantine {counts['quarantine']}; tmp {counts['tmp']})")

    # processes
    gone = {lb: t for lb, t in soak.procs.exited.items() if soak.procs.judged(lb)}
    extra = [lb for lb in soak.procs.judged_labels() if lb not in soak.procs.core]
    procs_ok = not gone and not extra
    criteria["no process exited"] = {"pass": procs_ok, "exited": gone, "new": extra}
    lines.append(f"router processes: {'PASS' if procs_ok else 'FAIL'} ("
                 + (f"exited: {gone}; new: {extra}" if not procs_ok else
                    f"the same {len(soak.procs.core)} processes from start to end") + ")")

    ok = all(c.get("pass", True) for c in criteria.values()) and not soak.timed_out  # some are figures only
    return "\n".join(lines), {"per_process": per_process, "criteria": criteria}, ok


# -- main ----------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10000, help="instances (default 10000)")
    p.add_argument("--size-kib", type=int, default=64, help="pixel data per instance, KiB (default 64)")
    p.add_argument("--senders", type=int, default=2, help="storescu processes sending in parallel (default 2)")
    p.add_argument("--chunk", type=int, default=None,
                   help="files per storescu association (default 500, fewer when needed to give every sender one)")
    p.add_argument("--down", type=float, default=60.0,
                   help="seconds after the first send before the destination starts (default 60)")
    p.add_argument("--baseline", type=int, default=None,
                   help="received instances at which the reference RSS is taken (default count/5: 2000 of 10000)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between timeline rows (default 10)")
    p.add_argument("--settle", type=float, default=15.0,
                   help="seconds to wait after the spool drained before the end sample (default 15: longer than "
                        "jemalloc's 10 s decay, after which Redis gives back the pages the drain freed)")
    p.add_argument("--timeout", type=float, default=1800.0, help="overall limit in seconds (default 1800)")
    p.add_argument("--workdir", default=None, help="parent of the run's temp dir (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (data, spool, logs)")
    opts = p.parse_args(argv)
    if opts.count < 1:
        p.error(f"--count must be at least 1 (got {opts.count})")
    if not 1 <= opts.size_kib <= 65536:
        p.error(f"--size-kib must be between 1 and 65536 (got {opts.size_kib})")
    if not 1 <= opts.senders <= 64:
        p.error(f"--senders must be between 1 and 64 (got {opts.senders})")
    if opts.senders > opts.count:
        p.error(f"--senders {opts.senders} is more than --count {opts.count}")
    if opts.chunk is None:
        opts.chunk = min(500, -(-opts.count // opts.senders))
    if opts.chunk < 1:
        p.error(f"--chunk must be at least 1 (got {opts.chunk})")
    if -(-opts.count // opts.chunk) < opts.senders:
        p.error(f"--count {opts.count} in chunks of {opts.chunk} gives fewer associations than --senders "
                f"{opts.senders}: lower --chunk or --senders")
    for name in ("down", "settle"):
        if not 0 <= getattr(opts, name) < 86400:
            p.error(f"--{name} must be >= 0 and < 86400 seconds (got {getattr(opts, name)})")
    if not opts.every > 0:
        p.error(f"--every must be > 0 seconds (got {opts.every})")
    if not opts.timeout > 0:
        p.error(f"--timeout must be > 0 seconds (got {opts.timeout})")
    if opts.baseline is None:
        opts.baseline = max(1, opts.count // 5)
    if not 1 <= opts.baseline <= opts.count:
        p.error(f"--baseline must be between 1 and --count {opts.count} (got {opts.baseline})")
    if opts.workdir is not None and not Path(opts.workdir).is_dir():
        p.error(f"--workdir {opts.workdir}: no such directory")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    deadline = started + opts.timeout
    n = opts.count

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-", dir=opts.workdir))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg()},
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty_files": _git("status", "--porcelain", "--", "router", "workers", "rules").splitlines(),
        "params": {k: getattr(opts, k) for k in ("count", "size_kib", "senders", "chunk", "down", "baseline",
                                                 "every", "settle", "timeout")},
    }
    soak: Soak | None = None
    try:
        with contextlib.ExitStack() as stack:
            t = time.perf_counter()
            folders = generate(workdir / "data", n, opts.size_kib, opts.chunk)
            gen_s = time.perf_counter() - t
            file_kib = folders[0][0].joinpath(sorted(os.listdir(folders[0][0]))[0]).stat().st_size / 1024
            result["generate_s"] = round(gen_s, 2)
            result["params"]["file_kib"] = round(file_kib, 1)
            print(f"generated {n} CT instances of {file_kib:.1f} KiB in {gen_s:.1f} s "
                  f"({1000 * gen_s / n:.2f} ms each), {len(folders)} folders of <= {opts.chunk}", flush=True)
            soak = Soak(opts, workdir, stack)
            soak.setup(folders)
            failure = None
            try:
                soak.run(deadline)
            except (SoakTimeout, RuntimeError) as exc:
                failure = str(exc)
            queues = queues_json(soak.router) if soak.router.running() else {"error": "router not running"}
            census = soak.redis.census()
            soak.senders.stop()
            t = time.perf_counter()
            uids = sent_uids(folders)
            verify_s = time.perf_counter() - t
            # everything measured: stop the router now so that its log is complete
            soak.router.stop()
            log = log_summary(soak.router.log_text())
            text_timeline, _ = timeline(soak, opts.every)
            text_summary, summary, ok = summarize(soak, n, opts, uids)
            if failure:
                ok = False

        ev = soak.events
        up = ev.get("destination up")
        drained = ev.get("drained")
        print()
        print(f"{n} x {file_kib:.0f} KiB CT, {opts.senders} senders x associations of {opts.chunk}, destination down "
              f"for {opts.down:g} s; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; commit {result['commit']}")
        print(f"Timeline (every {opts.every:g} s and at events; RSS MiB per router process)")
        print(text_timeline)
        print()
        print(text_summary)
        print()
        wall = time.monotonic() - started
        print(f"times: generate {gen_s:.1f} s; all sent at t={ev['sent']:.1f} s" if "sent" in ev else
              f"times: generate {gen_s:.1f} s; sending not finished", end="")
        print(f"; destination up at t={up:.1f} s" if up is not None else "; destination never up", end="")
        if drained is not None and up is not None:
            print(f"; drained at t={drained:.1f} s, {drained - max(up, ev.get('sent', up)):.1f} s after the "
                  f"destination came up and the last send ended ({drained - up:.1f} s after it came up)", end="")
        print(f"; end at t={ev['end']:.1f} s" if "end" in ev else "; no end", end="")
        print(f"; total wall {wall:.1f} s (verification read {len(uids)} sent files in {verify_s:.1f} s)")
        lv = log["levels"]
        print(f"router log: {sum(lv.values())} lines ({', '.join(f'{k} {v}' for k, v in sorted(lv.items()))}), "
              f"{log['tracebacks']} tracebacks")
        for msg, count in log["messages"]:
            print(f"  {count:6d} x {msg}")
        base_r = soak.baseline["redis"] if soak.baseline else {}
        end_r = soak.end["redis"] if soak.end else (soak.samples[-1]["redis"] if soak.samples else {})
        if census:
            print(f"redis data (used_memory): {mib(base_r.get('used_kib'))} MiB at the baseline, "
                  f"{mib(end_r.get('used_kib'))} MiB at the end; {end_r.get('keys', '?')} keys at the end, by kind "
                  f"(MEMORY USAGE):")
            for kind, c in list(census.items())[:6]:
                print(f"  {c['keys']:7d} x {kind:<26} {c['bytes'] / 2**20:6.2f} MiB, mean {c['bytes'] / c['keys']:.0f} B,"
                      f" largest {c['largest_bytes']} B ({c['largest'][:60]}), TTL {c['ttl_s']} s")
        if isinstance(queues, dict) and "error" in queues:
            print(f"dicom-router queues --json: {queues['error']}")
        if failure:
            print(f"\nFAILED TO FINISH: {failure}")
        print(f"\nRESULT: {'PASS' if ok else 'FAIL'}")

        result.update({"events_s": ev, "samples": soak.samples, "summary": summary, "router_log": log,
                       "queues_at_end": queues, "redis_census_at_end": census, "pass": ok, "failure": failure, "wall_s": round(wall, 1),
                       "labels": {f"{pid}": lb for (pid, _), lb in soak.procs.labels.items()},
                       "senders": {"runs": soak.senders.runs, "errors": soak.senders.errors},
                       "timeline": text_timeline, "table": text_summary})
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"soak-{stamp}-{n}x{opts.size_kib}k.json"
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"JSON: {out.relative_to(REPO)}")
        if opts.keep:
            print(f"work dir kept: {workdir}")
        return 0 if ok else 1
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({str(exc) or 'Ctrl-C'}): everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
