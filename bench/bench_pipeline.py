"""Throughput of the whole router against DCMTK, in the same run.

Run: ``.venv/bin/python bench/bench_pipeline.py [--count 500] [--size-kib 512]
[--small] [--rounds 3] [--destinations 1] [--profile DIR]``

N generated CT instances (Explicit VR Little Endian) are written once; then
each round measures, in an order that rotates from round to round:

* ``direct``: DCMTK ``storescu`` -> DCMTK ``storescp`` (one association);
* ``router``: ``storescu`` -> ``dicom-router run`` -> ``storescp``;
* ``router x2`` (``--destinations 2``): the same, fanned out to two storescp.

Every peer gets ``TCP_NODELAY=1``; ``storescp`` runs without ``--fork`` and
with ``+B`` (bit-preserving), without the completion hook the tests use.
A fresh router (and Redis, and storescp) is started for every measurement;
its CPU and memory are read from ``/proc`` for every process of its tree
(supervisor, embedded Redis, ingest, routing worker, forwarding workers),
counting only the measured window (storescu start -> spool drained).

Prints the medians (ratios are medians of per-round ratios: both sides of a
ratio ran in the same round) and every round's raw numbers; writes a JSON copy
to ``bench/results/``. See bench/README.md for the columns and the figures.
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.data import ct_series  # noqa: E402
from tests.peers import LOOPBACK, RedisServer, StoreSCP, association_config, peer_env  # noqa: E402
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config  # noqa: E402

RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.005  # s between looks at the destination folders
TIMEOUT = 600.0  # s for one measurement to finish


class Interrupted(Exception):
    """SIGTERM: unwind and stop everything we started."""


# -- /proc ---------------------------------------------------------------------

def _stat(pid: int, reaped: bool = False) -> tuple[int, float, int] | None:
    """(ppid, CPU seconds user+system of all its threads, start time in ticks).

    ``reaped``: add the CPU of the children it has waited for (cutime, cstime).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After "pid (comm)": state ppid ... utime(12) stime(13) cutime(14) cstime(15) ... starttime(20)
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return int(fields[1]), ticks / CLK_TCK, int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int) -> dict[int, str]:
    """PID -> command line of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st:
                parents[int(entry.name)] = st[0]
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: _cmdline(pid) for pid in sorted(tree)}


def role(cmdline: str, root_cmd: str) -> str:
    """A short name for a router process from its command line."""
    words = cmdline.split()
    if "redis-server" in cmdline:
        return "redis"
    if cmdline == root_cmd or " run " in f" {cmdline} ":
        return "supervisor"
    if "ingest" in words:
        return "ingest"
    if "worker" in words and "--queue" in words[:-1]:
        return f"worker[{words[words.index('--queue') + 1]}]"
    if "router" in words[:-1] and words.index("router") > 0 and words[words.index("router") - 1] == "-m":
        return words[words.index("router") + 1]  # python -m router SUBCOMMAND
    return os.path.basename(words[0]) if words else "?"


def cpu_snapshot(pids: dict[int, str]) -> dict[tuple[int, int], float]:
    """(pid, start time) -> CPU seconds so far, for the processes still alive.

    Each process's figure includes the children it has reaped, and a zombie
    still shows its own: summed over a whole tree, a process that came and
    went is counted once (by its parent once reaped).
    """
    found = {}
    for pid in pids:
        st = _stat(pid, reaped=True)
        if st:
            found[(pid, st[2])] = st[1]
    return found


def cpu_delta(cpu0: dict[tuple[int, int], float], cpu1: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """CPU seconds each process spent between two snapshots of the same tree.

    A process new in ``cpu1`` counts from zero; one gone from it counts
    minus its ``cpu0`` figure (its parent's reaped CPU now holds its total).
    """
    return {key: cpu1.get(key, 0.0) - cpu0.get(key, 0.0) for key in {*cpu0, *cpu1}}


def memory(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


# -- peers ---------------------------------------------------------------------

class BenchRouter(RouterProcess):
    """tests.router_proc.RouterProcess at a chosen log level (the tests run DEBUG).

    ``env``: more environment variables for the router (e.g. ``PYTHONPATH`` to
    run another revision's code); its children inherit them.
    """

    def __init__(self, *args: Any, log_level: str = "INFO", env: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_level = log_level
        self.extra_env = dict(env or {})

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "router", self.command, "-c", str(self.config_path),
                "--log-level", self.log_level, *self.args]

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update(self.extra_env)
        return env

    def wait_workers(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` workers logged that they are ready."""
        deadline = time.monotonic() + timeout
        while self.log_text().count("workers.worker: worker ") < n:
            if not self.running():
                raise RuntimeError(f"router exited during start\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"router workers not ready after {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_settled(self, timeout: float = 60.0, settle: float = 0.5) -> None:
        """Wait until every worker process of the tree logged that it is ready.

        For a router whose processes are not known in advance: the tree must
        be unchanged for ``settle`` seconds and hold no more processes with
        ``worker`` in their command line than ready lines in the log.
        """
        deadline = time.monotonic() + timeout
        last: tuple[int, ...] = ()
        since = time.monotonic()
        while True:
            if not self.running():
                raise RuntimeError(f"router exited during start\n{self.log_tail()}")
            tree = process_tree(self.pid)
            now = time.monotonic()
            if tuple(tree) != last:
                last, since = tuple(tree), now
            workers = sum(1 for cmd in tree.values() if "worker" in cmd.split())
            if now - since >= settle and self.log_text().count("workers.worker: worker ") >= workers:
                return
            if now > deadline:
                raise RuntimeError(f"router not settled after {timeout} s ({workers} worker processes)\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)


def _storescp(out_dir: Path, ae_title: str, extra: list[str], bit_preserving: bool = True,
              fork: bool = False) -> StoreSCP:
    return StoreSCP(out_dir, ae_title=ae_title, accept="all", fork=fork, bit_preserving=bit_preserving,
                    track_completion=False, extra_args=extra)


def _count(folder: Path) -> int:
    try:
        return len(os.listdir(folder))
    except FileNotFoundError:
        return 0


class Sender:
    """storescu over one association, with the file list and association config fixed once."""

    def __init__(self, files: list[Path], workdir: Path, extra: list[str]) -> None:
        self.files = [str(f) for f in files]
        self.cfg, self.profile = association_config(files, workdir / "assoc.cfg")
        self.log = workdir / "storescu.log"
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def run(self, port: int, called_ae: str, dest_dirs: list[Path], n: int) -> dict[str, float]:
        """Send everything; return ack time, end-to-end time and storescu's CPU.

        Ack time is storescu's wall time (start -> exit); end-to-end is start ->
        the moment every folder in ``dest_dirs`` holds ``n`` files.
        """
        return run_senders([self], port, called_ae, dest_dirs, n)

    def start(self, port: int, called_ae: str) -> None:
        cmd = ["storescu", "-aet", "BENCHSCU", "-aec", called_ae, "-xf", str(self.cfg), self.profile,
               "-nh", *self.extra, LOOPBACK, str(port), *self.files]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=peer_env())

    def reap(self) -> float | None:
        """storescu's CPU seconds once it has exited (reaped here), else None; raises if it failed."""
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if not pid:
            return None
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            raise RuntimeError(f"storescu exited {self.proc.returncode}; see {self.log}")
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def run_senders(senders: list[Sender], port: int, called_ae: str, dest_dirs: list[Path],
                n: int) -> dict[str, Any]:
    """Start every sender at once (one association each) and wait for all.

    Ack time is from the first start until the last storescu exits; end to
    end, until every folder in ``dest_dirs`` holds ``n`` files; storescu CPU
    is summed. Every sender is stopped on the way out.
    """
    acks: list[float | None] = [None] * len(senders)
    cpu = 0.0
    e2e = None
    started = time.perf_counter()
    try:
        for sender in senders:
            sender.start(port, called_ae)
        while None in acks or e2e is None:
            now = time.perf_counter()
            for i, sender in enumerate(senders):
                if acks[i] is None:
                    used = sender.reap()
                    if used is not None:
                        acks[i] = now - started
                        cpu += used
            if e2e is None and all(_count(d) >= n for d in dest_dirs):
                e2e = now - started
            if now - started > TIMEOUT:
                got = [_count(d) for d in dest_dirs]
                raise RuntimeError(f"timeout after {TIMEOUT} s: destinations hold {got} of {n}")
            time.sleep(POLL)
    finally:
        for sender in senders:
            sender.stop()
    result: dict[str, Any] = {"ack_s": max(acks), "e2e_s": e2e, "storescu_cpu_s": cpu}
    if len(senders) > 1:
        result["ack_each_s"] = acks
    return result


# -- measurements --------------------------------------------------------------

def measure_direct(sender: Sender, n: int, workdir: Path, scp_extra: list[str], bit_preserving: bool = True,
                   fork: bool = False) -> dict[str, Any]:
    """``sender`` (a Sender, or anything with its ``run``) -> one storescp.

    CPU is storescp's; with ``fork``, its children's too (exited children are
    zombies or reaped until storescp is stopped: either way counted once).
    """
    out = workdir / "direct-out"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, out, ignore_errors=True)
        scp = _storescp(out, "DIRECT", scp_extra, bit_preserving=bit_preserving, fork=fork)
        stack.callback(scp.stop)
        scp.start()
        procs = process_tree(scp.pid) if fork else {scp.pid: ""}
        cpu0 = cpu_snapshot(procs)
        result = sender.run(scp.port, "DIRECT", [out], n)
        if fork:
            procs.update(process_tree(scp.pid))
        result["cpu_s"] = sum(cpu_delta(cpu0, cpu_snapshot(procs)).values())  # storescp's own CPU
        result["peak_rss_kib"] = {"storescp": memory(scp.pid).get("VmHWM", 0)}
        result["received"] = _count(out)
    return result


def _copy_logs(base: Path, to: Path) -> None:
    """Every ``*.log`` under ``base`` (router, embedded Redis, storescp) into ``to``, flattened."""
    with contextlib.suppress(OSError):
        to.mkdir(parents=True, exist_ok=True)
        for log in base.rglob("*.log"):
            shutil.copy2(log, to / "-".join(log.relative_to(base).parts))


def _wait_drained(spool: Path, timeout: float = 60.0) -> float:
    """Wait until the spool holds nothing to route or forward; return the wait."""
    started = time.perf_counter()
    while True:
        left = _count(spool / "incoming") + sum(_count(d) for d in (spool / "out").glob("*"))
        if not left:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"spool not drained after {timeout} s: {left} files left")
        time.sleep(0.02)


class PySpy:
    """py-spy record attached to some processes for the length of a measurement."""

    def __init__(self, out_dir: Path, label: str, idle: bool, rate: int) -> None:
        self.out_dir = out_dir
        self.label = label
        self.idle = idle
        self.rate = rate
        self.procs: dict[str, subprocess.Popen] = {}
        self.outputs: dict[str, Path] = {}

    def attach(self, targets: dict[str, int]) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        for name, pid in targets.items():
            out = self.out_dir / f"{self.label}-{name}.txt"
            cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(self.rate),
                   "--nonblocking", "-o", str(out)]
            if self.idle:
                cmd += ["--idle", "--threads"]
            log = open(self.out_dir / f"{self.label}-{name}.log", "wb")
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            self.outputs[name] = out
        time.sleep(1.0)  # let py-spy attach before the load starts

    def detach(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = {}


def measure_router(sender: Sender, n: int, workdir: Path, ndest: int, opts: argparse.Namespace,
                   scp_extra: list[str], spy: PySpy | None = None, router_env: dict[str, str] | None = None,
                   scp_bit_preserving: bool = True, scp_fork: bool = False,
                   workers: int | None = -1, logs_to: Path | None = None,
                   dest_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sender`` -> a fresh ``dicom-router run`` -> ``ndest`` fresh storescp.

    ``opts`` needs ``redis``, ``router_pdu`` and ``log_level``. ``router_env``:
    more environment for the router. ``workers``: how many worker ready lines
    to wait for (-1: one per destination plus the routing worker; None: as
    many as the tree has worker processes, for a router of unknown shape).
    Processes of the same role are summed; ``processes`` lists each one.
    ``logs_to``: copy the router's and the storescp logs there once all is stopped.
    ``dest_settings``: more settings of each destination (``max_associations``...).
    """
    base = workdir / f"router{ndest}"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        if logs_to is not None:
            stack.callback(_copy_logs, base, logs_to)  # runs after everything below is stopped
        dests, dirs = {}, []
        for i in range(ndest):
            out = base / f"dest{i}-out"
            scp = _storescp(out, f"DEST{i}", scp_extra, bit_preserving=scp_bit_preserving, fork=scp_fork)
            stack.callback(scp.stop)
            scp.start()
            dests[f"dest{i}"] = destination(scp.port, scp.ae_title, **(dest_settings or {}))
            dirs.append(out)
        redis_url = None
        redis = None
        if opts.redis == "external":
            redis = RedisServer(base / "redis", persistent=True)
            stack.callback(redis.stop)
            redis.start()
            redis_url = redis.url
        settings: dict[str, Any] = {"reconcile_interval": 30.0}  # the product default (tests use 1 s)
        if opts.router_pdu is not None:
            settings["max_pdu"] = opts.router_pdu
        config = router_config(base / "router", dests, redis_url=redis_url, **settings)
        router = BenchRouter(base / "router", config, log_level=opts.log_level, env=router_env)
        stack.callback(router.stop)
        router.start()
        if workers is None:
            router.wait_settled()
        else:
            router.wait_workers(1 + ndest if workers < 0 else workers)
        root_cmd = _cmdline(router.pid)
        procs = process_tree(router.pid)
        if redis is not None:
            procs[redis.pid] = _cmdline(redis.pid)
        if spy is not None:
            by_role = {role(cmd, root_cmd): pid for pid, cmd in procs.items()}
            stack.callback(spy.detach)
            spy.attach({"ingest": by_role["ingest"], "forward": by_role["worker[dest0]"],
                        "route": by_role["worker[route]"]})
        cpu0 = cpu_snapshot(procs)
        result = sender.run(router.port, ROUTER_AE, dirs, n)
        result["drain_wait_s"] = _wait_drained(router.spool)
        procs.update(process_tree(router.pid))  # any process started during the window counts too
        cpu1 = cpu_snapshot(procs)
        if spy is not None:
            spy.detach()
        roles = {pid: role(cmd, root_cmd) for pid, cmd in procs.items()}
        per_pid: dict[int, float] = defaultdict(float)
        for key, seconds in cpu_delta(cpu0, cpu1).items():
            per_pid[key[0]] += seconds
        peak = {pid: memory(pid).get("VmHWM", 0) for pid in procs}
        per_role: dict[str, float] = defaultdict(float)
        rss_role: dict[str, int] = defaultdict(int)
        rss_max: dict[str, int] = defaultdict(int)
        count: Counter[str] = Counter()
        for pid, name in roles.items():
            per_role[name] += per_pid.get(pid, 0.0)
            rss_role[name] += peak[pid]
            rss_max[name] = max(rss_max[name], peak[pid])
            count[name] += 1
        result["cpu_by_process_s"] = dict(sorted(per_role.items()))
        result["cpu_s"] = sum(per_role.values())
        result["peak_rss_kib"] = dict(sorted(rss_role.items()))  # summed over processes of a role
        result["peak_rss_max_kib"] = dict(sorted(rss_max.items()))
        result["processes_by_role"] = dict(sorted(count.items()))
        result["processes"] = [{"pid": pid, "role": roles[pid], "cmdline": procs[pid],
                                "cpu_s": round(per_pid.get(pid, 0.0), 3), "peak_rss_kib": peak[pid]}
                               for pid in sorted(procs)]
        result["received"] = [_count(d) for d in dirs]
        log = router.log_text()
        result["router_errors"] = sum(1 for line in log.splitlines() if " ERROR " in line or "Traceback" in line)
        result["pids"] = {r: pid for pid, r in roles.items()}
    return result


# -- profile summaries -----------------------------------------------------------

def summarize_profile(path: Path, top: int = 15, thread_filter: str | None = None) -> dict[str, Any]:
    """Self and cumulative sample shares per function from py-spy's raw (collapsed) output.

    A frame reads ``function (file:line)``; functions are keyed without the line.
    With ``thread_filter`` (a function key, e.g.
    ``DULServiceProvider.run_reactor (pynetdicom/dul.py)``),
    only stacks through that function count: one kind of thread.
    """
    self_fn: Counter[str] = Counter()
    cum_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        keys = [_function_key(f) for f in frames]
        if thread_filter and thread_filter not in keys:
            continue
        k = int(count)
        total += k
        self_fn[keys[-1]] += k
        self_line[_short(frames[-1])] += k
        for key in set(keys):
            if not _WRAPPER.search(key):
                cum_fn[key] += k

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * c / total, 1)) for name, c in counter.most_common(top)]

    return {"samples": total, "self": share(self_fn), "cumulative": share(cum_fn),
            "self_by_line": share(self_line)}


# Frames every stack of a thread or a worker passes through: left out of the
# cumulative lists, which would otherwise open with a dozen 100 % entries.
_WRAPPER = re.compile(r"\((threading\.py|click/|<frozen runpy>|router/__main__\.py|router/cli\.py|"
                      r"workers/worker\.py|rq/worker/base\.py\)|rq/worker/worker_classes\.py)|^Thread\.")


def _short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        where = re.sub(r"^.*/lib/python3\.\d+/", "", where)  # the standard library
    return f"{name} ({where})" if where else name


def _function_key(frame: str) -> str:
    short = _short(frame)
    name, _, where = short.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def profile(sender: Sender, n: int, workdir: Path, opts: argparse.Namespace, scp_extra: list[str]) -> dict[str, Any]:
    """Two extra router runs under py-spy: on-CPU samples, then wall-clock (idle included)."""
    out_dir = Path(opts.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for label, idle in (("cpu", False), ("wall", True)):
        spy = PySpy(out_dir, label, idle, opts.profile_rate)
        run = measure_router(sender, n, workdir, 1, opts, scp_extra, spy=spy)
        summary[label] = {"run": {k: run[k] for k in ("ack_s", "e2e_s", "cpu_s", "cpu_by_process_s")}}
        for name, path in spy.outputs.items():
            summary[label][name] = summarize_profile(path)
        if idle:
            # The ingest thread that runs the C-STORE handler, and the forward
            # worker's job thread: where their wall-clock time goes.
            summary[label]["ingest_assoc_thread"] = summarize_profile(spy.outputs["ingest"], thread_filter="AcceptedAssociation.run (router/ingest/fastscp.py)")
            summary[label]["forward_job_thread"] = summarize_profile(spy.outputs["forward"], thread_filter="BaseWorker.perform_job (rq/worker/base.py)")
    return summary


def print_profile(summary: dict[str, Any], top: int) -> None:
    for label, runs in summary.items():
        for name, prof in runs.items():
            if name == "run" or not prof.get("samples"):
                continue
            print(f"\n== py-spy {label}: {name} ({prof['samples']} samples) ==")
            rows = [(f"{s:5.1f}%", fn) for fn, s in prof["self"][:top]]
            print("  self:")
            for pct, fn in rows:
                print(f"    {pct}  {fn}")
            print("  cumulative:")
            for fn, s in prof["cumulative"][:top]:
                print(f"    {s:5.1f}%  {fn}")


# -- table ---------------------------------------------------------------------

def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def derive(rounds: list[dict[str, Any]], n: int) -> None:
    """Add rates and ratios to each round's measurements, in place."""
    for rnd in rounds:
        measured = {name: m for name, m in rnd.items() if name != "round"}
        for m in measured.values():
            m["ack_rate"] = n / m["ack_s"]
            m["e2e_rate"] = n / m["e2e_s"]
            m["cpu_ms_per_inst"] = 1000.0 * m["cpu_s"] / n
        direct = rnd["direct"]
        for m in measured.values():
            m["ack_x_direct"] = m["ack_rate"] / direct["ack_rate"]
            m["e2e_x_direct"] = m["e2e_rate"] / direct["e2e_rate"]
        if "router" in rnd and "router x2" in rnd:
            one, two = rnd["router"], rnd["router x2"]
            two["extra_cpu_s"] = two["cpu_s"] - one["cpu_s"]
            two["extra_cpu_x"] = two["extra_cpu_s"] / one["cpu_s"]


COLUMNS = [
    ("ack inst/s", "ack_rate", ".0f"),
    ("e2e inst/s", "e2e_rate", ".0f"),
    ("ack x dir", "ack_x_direct", ".2f"),
    ("e2e x dir", "e2e_x_direct", ".2f"),
    ("CPU s", "cpu_s", ".2f"),
    ("CPU ms/inst", "cpu_ms_per_inst", ".2f"),
    ("+CPU 2nd dest", "extra_cpu_x", ".2f"),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def report(rounds: list[dict[str, Any]], modes: list[str]) -> tuple[str, dict[str, Any]]:
    header = ["mode", *(c[0] for c in COLUMNS)]
    medians: dict[str, Any] = {}
    rows = []
    for mode in modes:
        med = {key: _median([r[mode].get(key) for r in rounds]) for _, key, _ in COLUMNS}
        medians[mode] = med
        rows.append([mode, *(_fmt(med[key], spec) for _, key, spec in COLUMNS)])
    text = [f"Medians over {len(rounds)} round(s) (ratios: median of per-round ratios)", _table(header, rows)]

    roles = sorted({r for rnd in rounds for m in modes if m != "direct" for r in rnd[m]["cpu_by_process_s"]})
    if roles:
        h2 = ["mode", *(f"CPU s {r}" for r in roles)]
        rows2 = []
        for mode in modes:
            if mode == "direct":
                continue
            vals = {r: _median([rnd[mode]["cpu_by_process_s"].get(r) for rnd in rounds]) for r in roles}
            medians[mode]["cpu_by_process_s"] = vals
            rows2.append([mode, *(_fmt(vals[r], ".2f") for r in roles)])
        text += ["", "Router CPU seconds by process (median; measured window only)", _table(h2, rows2)]
        h3 = ["mode", *(f"peak MiB {r}" for r in roles)]
        rows3 = []
        for mode in modes:
            if mode == "direct":
                continue
            vals = {r: _median([rnd[mode]["peak_rss_kib"].get(r) for rnd in rounds]) for r in roles}
            medians[mode]["peak_rss_kib"] = vals
            rows3.append([mode, *(_fmt(None if vals[r] is None else vals[r] / 1024, ".0f") for r in roles)])
        text += ["", "Peak RSS per router process (VmHWM, median, MiB)", _table(h3, rows3)]

    raw_header = ["round", "mode", "ack s", "e2e s", "ack inst/s", "e2e inst/s", "ack x dir", "e2e x dir",
                  "CPU s", "scu CPU s", "received", "errors"]
    raw_rows = []
    for rnd in rounds:
        for mode in modes:
            m = rnd[mode]
            received = m["received"] if isinstance(m["received"], int) else "/".join(map(str, m["received"]))
            raw_rows.append([str(rnd["round"]), mode, f"{m['ack_s']:.3f}", f"{m['e2e_s']:.3f}",
                             f"{m['ack_rate']:.0f}", f"{m['e2e_rate']:.0f}", f"{m['ack_x_direct']:.2f}",
                             f"{m['e2e_x_direct']:.2f}", f"{m['cpu_s']:.2f}", f"{m['storescu_cpu_s']:.2f}",
                             str(received), str(m.get("router_errors", 0))])
    text += ["", "Every round (in the order run)", _table(raw_header, raw_rows)]
    return "\n".join(text), medians


# -- main ----------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=500, help="instances per run (default 500)")
    p.add_argument("--size-kib", type=int, default=512, help="pixel data per instance (default 512)")
    p.add_argument("--small", action="store_true", help="~9 KiB instances (64x64 pixels; overrides --size-kib)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--destinations", type=int, choices=(1, 2), default=1,
                   help="2: also measure fan-out to two storescp, and the 2nd destination's extra CPU")
    p.add_argument("--redis", choices=("embedded", "external"), default="embedded",
                   help="embedded: `run` starts its own redis-server (AOF everysec), counted in the router's "
                        "CPU; external: tests.peers.RedisServer (AOF everysec), counted too (default embedded)")
    p.add_argument("--log-level", default="INFO", help="router log level (default INFO, the product default)")
    p.add_argument("--router-pdu", type=int, default=None, help="router.max_pdu (default: the config default, 0)")
    p.add_argument("--scp-pdu", type=int, default=None, help="storescp -pdu for every storescp (default DCMTK's 16384)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="after the rounds, two more router runs under py-spy (on-CPU, then wall clock "
                        "with idle); raw stacks and a summary go to DIR")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    p.add_argument("--profile-only", action="store_true", help="skip the rounds (with --profile)")
    p.add_argument("--top", type=int, default=12, help="functions per profile list (default 12)")
    p.add_argument("--workdir", default=None, help="where data and peers live (default: a new temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured direct run that warms caches")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    size_kib = 8 if opts.small else opts.size_kib
    n = opts.count

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    scp_extra = ["-pdu", str(opts.scp_pdu)] if opts.scp_pdu else []
    sender: Sender | None = None
    try:
        t = time.perf_counter()
        files = ct_series(workdir / "data", n, size_kib=size_kib)
        file_kib = statistics.mean(f.stat().st_size for f in files[:10]) / 1024
        print(f"generated {n} CT instances of {file_kib:.1f} KiB (Explicit VR LE) in {time.perf_counter() - t:.1f} s",
              flush=True)
        sender = Sender(files, workdir, [])
        if not opts.no_warmup and not opts.profile_only:
            measure_direct(sender, n, workdir, scp_extra)

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = f"{n}x{size_kib}k-d{opts.destinations}" + ("-profile" if opts.profile else "")
        out = RESULTS / f"pipeline-{stamp}-{tag}.json"
        modes = ["direct", "router"] + (["router x2"] if opts.destinations == 2 else [])
        rounds: list[dict[str, Any]] = []
        for r in range(0 if opts.profile_only else opts.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            rnd: dict[str, Any] = {"round": r + 1}
            for mode in order:
                if mode == "direct":
                    rnd[mode] = measure_direct(sender, n, workdir, scp_extra)
                else:
                    rnd[mode] = measure_router(sender, n, workdir, 2 if mode == "router x2" else 1, opts, scp_extra)
                m = rnd[mode]
                print(f"round {r + 1} {mode:<9}: ack {m['ack_s']:.3f} s  e2e {m['e2e_s']:.3f} s  "
                      f"CPU {m['cpu_s']:.2f} s", flush=True)
            rounds.append(rnd)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"partial": True, "rounds": rounds}, indent=1, default=str))

        result: dict[str, Any] = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "load_avg_start": os.getloadavg()},
            "commit": _git("rev-parse", "--short", "HEAD"), "dirty_files": _git("status", "--porcelain", "--", "router", "workers", "rules").splitlines(),
            "params": {"count": n, "size_kib": size_kib, "file_kib": round(file_kib, 1), "rounds": opts.rounds,
                       "destinations": opts.destinations, "redis": opts.redis, "log_level": opts.log_level,
                       "router_pdu": opts.router_pdu, "scp_pdu": opts.scp_pdu},
        }
        if rounds:
            derive(rounds, n)
            text, medians = report(rounds, modes)
            print()
            print(f"{n} x {file_kib:.0f} KiB CT, {opts.rounds} rounds, {os.cpu_count()} cores, "
                  f"load {os.getloadavg()[0]:.1f}")
            print(text)
            result.update({"medians": medians, "rounds": rounds, "table": text})
        if opts.profile:
            summary = profile(sender, n, workdir, opts, scp_extra)
            print_profile(summary, opts.top)
            result["profile"] = summary
            (Path(opts.profile) / "summary.json").write_text(json.dumps(summary, indent=1))

        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nJSON: {out.relative_to(REPO)}")
        return 0
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}): everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if sender is not None:
            sender.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
