"""The performance goals of issue 20, measured in one run against DCMTK.

Run: ``.venv/bin/python bench/bench_goals.py [--rows ct1,ct4,small] [--rounds 5]
[--ct-count 300] [--ct4-count 100] [--small-count 500] [--size-kib 512]
[--before eb734ef|none]``

Rows (what is sent):

* ``ct1``: N x 512 KiB CT instances over ONE association (one storescu);
* ``ct4``: four storescu started together, each with its own M files, one
  association each; the storescp (direct, and the router's destination) runs
  with ``--fork``;
* ``small``: N x ~9.4 KiB instances (64x64 pixels) over one association.

Modes per row, in an order that rotates from round to round:

* ``direct``: storescu -> storescp as Debian ships it (no ``+B``; ``--fork``
  only in ct4);
* ``direct+B``: the same with ``+B`` (bit-preserving: the faster reference
  bench_pipeline.py uses);
* ``before``: storescu -> ``dicom-router run`` at an older revision (``git
  archive REV`` extracted once, run with ``PYTHONPATH`` pointing at it) ->
  storescp (like ``direct``);
* ``after``: the same with the working tree's router;
* ``two-hops``: what a store-and-forward of DCMTK's own parts would at best
  do on this machine: the row's senders -> storescp A and, at the same time,
  the same instances over as many associations as the router forwards on
  (``--ct4-associations`` in ct4, one otherwise) -> storescp B, both like
  ``direct``. Acks when the first hop's senders exit, end to end when both
  folders are full; CPU is a relay's (storescp A and the second hop's
  storescu). It has no fsync, no queue and no waiting between the hops: the
  ceiling of the router's ratios here, where senders, router and destination
  share the cores;
* ``floor``: no network, no DICOM: this disk making the row's files durable
  the way the router's spool must before each answer (write, fdatasync,
  rename, fsync of the folder), one file after another per sender (four
  threads at once in ct4). What any receiver that answers only once an
  instance is on disk can at best reach here with that many associations.

Two more modes, only with ``--modes``, say where the acknowledgements' time
goes (acks only: nothing is delivered):

* ``ingest``: the working tree's router whose one destination does not
  listen: its ingest, its senders and Redis alone on the cores (nothing
  forwarded, so no file is recycled: every instance is a new file);
* ``ingest-tmpfs``: the same with the router's spool and data in
  ``/dev/shm``, where fdatasync and fsync cost nothing: NOT durable, a
  measure of what the ingest's code costs without this disk.

Goals (all against ``direct``, same run): ct1 and ct4 acks >= 0.75x and end
to end >= 0.50x, small end to end >= 0.50x; router CPU per instance (its
whole process tree, embedded Redis included) of ``after`` at most half of
``before``. Medians over rounds; a ratio is the median of per-round ratios
(both sides from the same round). Measuring is bench_pipeline.py's (imported,
not copied). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_pipeline import (  # noqa: E402
    POLL,
    RESULTS,
    TIMEOUT,
    BenchRouter,
    Interrupted,
    Sender,
    _copy_logs,
    _count,
    _fmt,
    _median,
    _storescp,
    _table,
    cpu_delta,
    cpu_snapshot,
    measure_direct,
    measure_router,
    process_tree,
    run_senders,
)
from router.ingest.store import write_all  # noqa: E402
from tests.data import ct_series  # noqa: E402
from tests.peers import free_port  # noqa: E402
from tests.router_proc import ROUTER_AE, destination, router_config  # noqa: E402

ROWS = ("ct1", "ct4", "small")
MODES = ("direct", "direct+B", "before", "after", "two-hops", "floor")
INGEST_MODES = ("ingest", "ingest-tmpfs")  # only when asked for (--modes)
ROUTER_MODES = ("before", "after")
TMPFS = Path("/dev/shm")
DEFAULT_BEFORE = "eb734ef"  # main before issue 20's work
SMALL_KIB = 8  # ct_series(size_kib=8): 64x64 pixels, ~9.4 KiB files, as bench_pipeline --small
CT4_SENDERS = 4
WATCHED = ("router", "workers", "rules")  # the router's code: "dirty" and the fingerprint look here

# (row, measured value, target, what it says); every CPU goal is added per row.
GOALS = [
    ("ct1", "ack_x_direct", 0.75, "ct1 acks x direct"),
    ("ct1", "e2e_x_direct", 0.50, "ct1 e2e x direct"),
    ("ct4", "ack_x_direct", 0.75, "ct4 acks x direct"),
    ("ct4", "e2e_x_direct", 0.50, "ct4 e2e x direct"),
    ("small", "e2e_x_direct", 0.50, "small e2e x direct"),
]
CPU_GOAL = 0.50  # after / before, CPU per instance, at most


class SenderGroup:
    """One or more storescu started together (one association each): Sender's interface."""

    def __init__(self, senders: list[Sender]) -> None:
        self.senders = senders

    def run(self, port: int, called_ae: str, dest_dirs: list[Path], n: int) -> dict[str, Any]:
        return run_senders(self.senders, port, called_ae, dest_dirs, n)

    def stop(self) -> None:
        for sender in self.senders:
            sender.stop()


@dataclass
class Row:
    name: str
    n: int  # instances in all
    group: SenderGroup
    hop2: SenderGroup
    """The ``two-hops`` mode's second hop: the same instances over ``associations`` storescu."""
    fork: bool  # storescp --fork (direct and the router's destination)
    file_kib: float
    what: str
    associations: int = 1  # the router's destination's max_associations


# -- git and the two routers -----------------------------------------------------

def _git(*args: str) -> str:
    """git in the repository; never writes the (shared) index."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env).stdout.strip()


def tree_state() -> dict[str, Any]:
    """HEAD, the uncommitted files under router/ workers/ rules/, and a fingerprint of their content."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", *WATCHED).splitlines()
    digest = hashlib.sha1(_git("diff", "HEAD", "--", *WATCHED).encode())
    for name in _git("ls-files", "--others", "--exclude-standard", "--", *WATCHED).splitlines():
        with contextlib.suppress(OSError):
            digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return {"head": head, "dirty_files": dirty, "fingerprint": f"{head}+{digest.hexdigest()[:8]}" if dirty else head}


def _describe(state: dict[str, Any]) -> str:
    if not state["dirty_files"]:
        return state["head"]
    return f"{state['head']} dirty ({len(state['dirty_files'])} files under {'/ '.join(WATCHED)}/, " \
           f"fingerprint {state['fingerprint']})"


def where_imported(env: dict[str, str], cwd: Path) -> list[str]:
    """Where ``router``, ``workers`` and ``rules`` come from for a router started with ``env`` in ``cwd``."""
    code = "import router, workers, rules; print(router.__file__, workers.__file__, rules.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot import the router with PYTHONPATH={env.get('PYTHONPATH', '')!r}:\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout.split()


def _under(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def extract_before(rev: str, workdir: Path) -> tuple[Path, list[str]]:
    """``git archive REV`` into WORKDIR/before, compiled; returns it and where its modules import from.

    Raises RuntimeError when ``router``, ``workers`` or ``rules`` would not come
    from there with ``PYTHONPATH`` set (the venv has the working tree installed
    editable).
    """
    target = workdir / "before"
    target.mkdir(parents=True)
    with subprocess.Popen(["git", "archive", rev], cwd=REPO, stdout=subprocess.PIPE) as archive:
        tar = subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, capture_output=True)
        archive.stdout.close()
    if archive.returncode != 0 or tar.returncode != 0:
        raise RuntimeError(f"git archive {rev} | tar -x failed: {tar.stderr.decode(errors='replace')}")
    # Compiled now, so that no measured window pays for it (the after tree has its caches).
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(target / d) for d in WATCHED)],
                   capture_output=True, timeout=300)
    if not (target / "router" / "__main__.py").is_file():
        raise RuntimeError(f"{rev} has no router/__main__.py: `python -m router` would run the working tree's")
    files = where_imported(_router_env(target), _empty_dir(workdir))
    wrong = [f for f in files if not _under(f, target)]
    if wrong or len(files) != 3:
        raise RuntimeError(f"with PYTHONPATH={target} the router imports {files}, not all under {target}: "
                           "the 'before' router would not be the old revision")
    outside = imported_outside(target, _empty_dir(workdir))
    if outside:
        raise RuntimeError(f"with PYTHONPATH={target}, importing the old tree's modules loads these from "
                           f"elsewhere (the editable install's finder serves modules the old tree lacks): "
                           f"{', '.join(outside[:20])}")
    return target, files


# Imports every module file of the old tree (not __main__) and names each
# router/workers/rules module found outside it (even one whose import then
# failed). The venv's editable finder comes after PYTHONPATH, but it answers
# for a module the old tree lacks with the working tree's file: this catches
# the static imports of the old code.
_DEEP_CHECK = """
import importlib, json, sys, warnings
from pathlib import Path
root = Path(sys.argv[1]).resolve()
tops = set(sys.argv[2:])
outside = set()

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in tops:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.origin and spec.has_location and not Path(spec.origin).resolve().is_relative_to(root):
                    outside.add(f"{name} ({spec.origin})")
                return spec
        return None

sys.meta_path.insert(0, Watch())
warnings.simplefilter("ignore")
for top in sorted(tops):
    for f in sorted((root / top).rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        try:
            importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        except Exception:
            pass
print(json.dumps(sorted(outside)))
"""


def imported_outside(before: Path, cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _DEEP_CHECK, str(before), *WATCHED], env=_router_env(before),
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"checking the old tree's imports failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _router_env(before: Path | None) -> dict[str, str]:
    """The router's environment as BenchRouter builds it, PYTHONPATH set for ``before`` (or cleared)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(before) if before is not None else ""
    return env


def _empty_dir(workdir: Path) -> Path:
    path = workdir / "import-check"
    path.mkdir(exist_ok=True)
    return path


# -- measuring -----------------------------------------------------------------------

def router_opts() -> argparse.Namespace:
    """What measure_router reads from bench_pipeline's options: its defaults."""
    return argparse.Namespace(redis="embedded", router_pdu=None, log_level="INFO")


def measure(row: Row, mode: str, workdir: Path, before_dir: Path | None, label: str) -> dict[str, Any]:
    """One measurement; an error is recorded, not raised (the other modes and rounds go on).

    A failed one keeps its logs in WORKDIR/failed/LABEL (and their tails in the error).
    """
    run_dir = workdir / "runs" / row.name
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs" / label
    for sender in row.group.senders:
        sender.log.unlink(missing_ok=True)  # one storescu log per measurement
    code = tree_state()["fingerprint"] if mode == "after" else None  # what this router start will import
    try:
        if mode == "two-hops":
            result = measure_two_hops(row, run_dir)
        elif mode == "floor":
            result = measure_floor(row, run_dir)
        elif mode in INGEST_MODES:
            result = measure_ingest(row, run_dir if mode == "ingest" else TMPFS, logs)
        elif mode in ("direct", "direct+B"):
            result = measure_direct(row.group, row.n, run_dir, [], bit_preserving=mode == "direct+B", fork=row.fork)
        else:
            path = str(before_dir) if mode == "before" else ""
            result = measure_router(row.group, row.n, run_dir, 1, router_opts(), [], router_env={"PYTHONPATH": path},
                                    scp_bit_preserving=False, scp_fork=row.fork, workers=None, logs_to=logs,
                                    dest_settings={"max_associations": row.associations})
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception as exc:  # noqa: BLE001 - recorded and reported; the run goes on
        kept = workdir / "failed" / label
        kept.mkdir(parents=True, exist_ok=True)
        for i, sender in enumerate(row.group.senders):
            with contextlib.suppress(OSError):
                shutil.copy2(sender.log, kept / f"storescu{i}.log")
        if logs.is_dir():
            for log in logs.iterdir():
                shutil.copy2(log, kept / log.name)
        tails = []
        for log in sorted(kept.iterdir()):
            lines = log.read_text(errors="replace").splitlines()
            tails.append(f"--- {log.name} (last {min(25, len(lines))} of {len(lines)} lines)\n"
                         + "\n".join(lines[-25:]))
        return {"error": f"{type(exc).__name__}: {exc}", "logs": str(kept), "log_tails": tails}
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    if code is not None:
        result["after_tree"] = code
    return result


def measure_two_hops(row: Row, workdir: Path) -> dict[str, Any]:
    """The row's senders -> storescp A while its second hop sends the same instances -> storescp B.

    ``cpu_s`` is a relay's: storescp A's (a receiver's) and the second hop's
    storescu (a sender's); ``storescu_cpu_s`` the first hop's, as elsewhere.
    """
    outs = [workdir / "hop1-out", workdir / "hop2-out"]
    senders = row.group.senders + row.hop2.senders
    first = len(row.group.senders)
    for sender in senders:
        sender.log.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        scps = []
        for out, ae in zip(outs, ("HOP1", "HOP2"), strict=True):
            stack.callback(shutil.rmtree, out, ignore_errors=True)
            scp = _storescp(out, ae, [], bit_preserving=False, fork=row.fork)
            stack.callback(scp.stop)
            scp.start()
            scps.append(scp)
        stack.callback(lambda: [sender.stop() for sender in senders])
        hop1_scp = process_tree(scps[0].pid) if row.fork else {scps[0].pid: ""}
        cpu0 = cpu_snapshot(hop1_scp)
        used: list[float | None] = [None] * len(senders)
        acks = e2e = None
        started = time.perf_counter()
        for i, sender in enumerate(senders):
            scp = scps[0] if i < first else scps[1]
            sender.start(scp.port, scp.ae_title)
        while acks is None or e2e is None:
            now = time.perf_counter()
            for i, sender in enumerate(senders):
                if used[i] is None:
                    used[i] = sender.reap()
            if acks is None and None not in used[:first]:
                acks = now - started
            if e2e is None and all(_count(out) >= row.n for out in outs):
                e2e = now - started
            if now - started > TIMEOUT:
                raise RuntimeError(f"timeout after {TIMEOUT} s: {[_count(out) for out in outs]} of {row.n}")
            time.sleep(POLL)
        while None in used:  # the folders are full: each storescu is exiting
            if time.perf_counter() - started > TIMEOUT:
                raise RuntimeError(f"timeout after {TIMEOUT} s: a storescu did not exit after its last answer")
            used = [u if u is not None else senders[i].reap() for i, u in enumerate(used)]
            time.sleep(POLL)
        if row.fork:
            hop1_scp.update(process_tree(scps[0].pid))
        receiver = sum(cpu_delta(cpu0, cpu_snapshot(hop1_scp)).values())
        return {"ack_s": acks, "e2e_s": e2e, "storescu_cpu_s": sum(used[:first]),
                "cpu_s": receiver + sum(used[first:]), "received": [_count(out) for out in outs]}


def measure_floor(row: Row, workdir: Path) -> dict[str, Any]:
    """The row's files made durable as a spool must before each answer, one after another
    per sender (a thread each, at once): write a new file in ``tmp/``, fdatasync, rename
    into ``out/``, fsync ``out/``. The files are read before the clock starts.

    ``cpu_s`` is this process's CPU over the writes (its other threads are idle).
    """
    folder = workdir / "floor"
    shutil.rmtree(folder, ignore_errors=True)
    tmp, out = folder / "tmp", folder / "out"
    tmp.mkdir(parents=True)
    out.mkdir()
    contents = [[Path(f).read_bytes() for f in sender.files] for sender in row.group.senders]
    errors: list[BaseException] = []
    start = threading.Barrier(len(contents) + 1)

    def write(index: int, files: list[bytes]) -> None:
        try:
            start.wait()
            dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for k, data in enumerate(files):
                    name = f"{index}-{k}.dcm"
                    fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        write_all(fd, data)
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
                    os.rename(tmp / name, out / name)
                    os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the measuring thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i, files)) for i, files in enumerate(contents)]
    try:
        for thread in threads:
            thread.start()
        cpu0 = time.process_time()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        took = time.perf_counter() - began
        cpu = time.process_time() - cpu0
        if errors:
            raise errors[0]
        written = _count(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"ack_s": took, "e2e_s": took, "storescu_cpu_s": 0.0, "cpu_s": cpu, "received": written}


def measure_ingest(row: Row, where: Path, logs_to: Path) -> dict[str, Any]:
    """The row's senders -> the working tree's router, whose one destination does not
    listen: acknowledgements only (``e2e_s`` None). Its spool, data and embedded
    Redis live in a new folder under ``where``. ``cpu_s`` is the router's whole tree."""
    base = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=where))
    try:
        config = router_config(base / "router", {"dest0": destination(free_port(), "NOBODY")},
                               reconcile_interval=30.0)
        router = BenchRouter(base / "router", config, log_level=router_opts().log_level,
                             env={"PYTHONPATH": ""})
        try:
            router.start()
            router.wait_settled()
            procs = process_tree(router.pid)
            cpu0 = cpu_snapshot(procs)
            result = run_senders(row.group.senders, router.port, ROUTER_AE, [], row.n)
            procs.update(process_tree(router.pid))
            cpu = sum(cpu_delta(cpu0, cpu_snapshot(procs)).values())
            spool = base / "router" / "spool"
            received = sum(1 for state in ("incoming", "out") for _ in (spool / state).rglob("*.dcm"))
        finally:
            router.stop()
            _copy_logs(base, logs_to)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if received != row.n:
        raise RuntimeError(f"the router's spool holds {received} of {row.n} instances")
    return {**result, "e2e_s": None, "cpu_s": cpu, "received": received}


def ok(m: dict[str, Any] | None) -> bool:
    return m is not None and "error" not in m


def derive(rounds: list[dict[str, Any]], rows: dict[str, Row]) -> None:
    """Rates, ratios (against the same round's direct and direct+B), CPU and RSS figures, in place."""
    for rnd in rounds:
        for name, ms in rnd["rows"].items():
            n = rows[name].n
            for m in ms.values():
                if not ok(m):
                    continue
                m["ack_rate"] = n / m["ack_s"]
                m["e2e_rate"] = n / m["e2e_s"] if m["e2e_s"] else None
                m["cpu_ms_per_inst"] = 1000.0 * m["cpu_s"] / n
                if "cpu_by_process_s" in m:
                    m["cpu_ms_by_process"] = {r: 1000.0 * s / n for r, s in m["cpu_by_process_s"].items()}
                    m["rss_sum_mib"] = sum(m["peak_rss_kib"].values()) / 1024
                    m["rss_max_mib"] = max(m["peak_rss_max_kib"].values(), default=0) / 1024
            for ref, suffix in (("direct", "direct"), ("direct+B", "directB")):
                d = ms.get(ref)
                for m in ms.values():
                    if ok(m) and ok(d):
                        m[f"ack_x_{suffix}"] = m["ack_rate"] / d["ack_rate"]
                        m[f"e2e_x_{suffix}"] = m["e2e_rate"] / d["e2e_rate"] if m["e2e_rate"] else None
            bound, floor = ms.get("two-hops"), ms.get("floor")
            for mode in (*ROUTER_MODES, *INGEST_MODES):
                m = ms.get(mode)
                if ok(m) and ok(bound):
                    m["ack_x_bound"] = m["ack_rate"] / bound["ack_rate"]
                    m["e2e_x_bound"] = m["e2e_rate"] / bound["e2e_rate"] if m["e2e_rate"] else None
                if ok(m) and ok(floor):
                    m["ack_x_floor"] = m["ack_rate"] / floor["ack_rate"]
            before, after = ms.get("before"), ms.get("after")
            if ok(before) and ok(after) and before["cpu_s"] > 0:
                after["cpu_x_before"] = after["cpu_s"] / before["cpu_s"]


# -- report ----------------------------------------------------------------------------

ROW_COLUMNS = [
    ("ack inst/s", "ack_rate", ".0f"),
    ("e2e inst/s", "e2e_rate", ".0f"),
    ("ack x direct", "ack_x_direct", ".2f"),
    ("e2e x direct", "e2e_x_direct", ".2f"),
    ("ack x direct+B", "ack_x_directB", ".2f"),
    ("e2e x direct+B", "e2e_x_directB", ".2f"),
    ("ack x two-hops", "ack_x_bound", ".2f"),
    ("e2e x two-hops", "e2e_x_bound", ".2f"),
    ("ack x floor", "ack_x_floor", ".2f"),
    ("CPU ms/inst", "cpu_ms_per_inst", ".2f"),
    ("RSS MiB sum", "rss_sum_mib", ".0f"),
    ("RSS MiB max", "rss_max_mib", ".0f"),
]


def _values(rounds: list[dict[str, Any]], row: str, mode: str, key: str) -> list[float]:
    out = []
    for rnd in rounds:
        m = rnd["rows"].get(row, {}).get(mode)
        if ok(m) and m.get(key) is not None:
            out.append(m[key])
    return out


def _sub(rounds: list[dict[str, Any]], row: str, mode: str, key: str, sub: str) -> list[float]:
    out = []
    for rnd in rounds:
        m = rnd["rows"].get(row, {}).get(mode)
        if ok(m) and sub in m.get(key, {}):
            out.append(m[key][sub])
    return out


def report(rounds: list[dict[str, Any]], rows: dict[str, Row], modes: list[str]) -> tuple[str, dict[str, Any]]:
    text: list[str] = []
    medians: dict[str, Any] = {}
    for name, row in rows.items():
        medians[name] = {}
        table = []
        for mode in modes:
            med = {key: _median(_values(rounds, name, mode, key)) for _, key, _ in ROW_COLUMNS}
            failed = sum(1 for rnd in rounds if not ok(rnd["rows"].get(name, {}).get(mode)))
            medians[name][mode] = med
            table.append([mode + (f" ({failed} failed)" if failed else ""),
                          *(_fmt(med[key], spec) for _, key, spec in ROW_COLUMNS)])
        text += [f"== {name}: {row.what} ==", _table(["mode", *(c[0] for c in ROW_COLUMNS)], table), ""]
    text.append("CPU and RSS of direct modes: storescp's (with its --fork children); of before/after: the "
                "router's whole tree; of two-hops: a relay's (the first storescp and the second hop's storescu); "
                "of floor: the writing threads'; of ingest modes: the router's whole tree, nothing forwarded.")

    routers = [m for m in modes if m in ROUTER_MODES]
    roles = sorted({r for rnd in rounds for ms in rnd["rows"].values() for mode in routers
                    if ok(ms.get(mode)) for r in ms[mode]["cpu_by_process_s"]})
    if roles and routers:
        cpu_rows, rss_rows = [], []
        for name in rows:
            for mode in routers:
                cpu = {r: _median(_sub(rounds, name, mode, "cpu_ms_by_process", r)) for r in roles}
                rss = {r: _median(_sub(rounds, name, mode, "peak_rss_kib", r)) for r in roles}
                nproc = {r: max(_sub(rounds, name, mode, "processes_by_role", r), default=0) for r in roles}
                medians[name][mode].update({"cpu_ms_by_process": cpu, "peak_rss_kib_by_process": rss,
                                            "processes_by_role": nproc})
                total = medians[name][mode]["cpu_ms_per_inst"]
                cpu_rows.append([f"{name} {mode}", *(_fmt(cpu[r], ".2f") for r in roles), _fmt(total, ".2f")])
                rss_rows.append([f"{name} {mode}", *(_fmt(None if rss[r] is None else rss[r] / 1024, ".0f")
                                                      + (f" ({nproc[r]})" if nproc[r] > 1 else "") for r in roles)])
        text += ["", "Router CPU ms per instance by process (median; window: first storescu start -> spool drained)",
                 _table(["row mode", *roles, "total"], cpu_rows),
                 "", "Peak RSS by process (VmHWM, MiB, median; (N): N processes of that role, summed)",
                 _table(["row mode", *roles], rss_rows)]

    goals = []
    goal_rows = []
    for row, key, target, label in GOALS:
        if row not in rows:
            continue
        after = _values(rounds, row, "after", key)
        before = _median(_values(rounds, row, "before", key))
        vs_b = _median(_values(rounds, row, "after", key.replace("_direct", "_directB")))
        bound = _median(_values(rounds, row, "two-hops", key))
        med = _median(after)
        verdict = "n/a" if med is None else ("PASS" if med >= target else "FAIL")
        goals.append({"goal": label, "target": f">= {target:.2f}", "after": med, "before": before,
                      "after_x_directB": vs_b, "two_hops": bound, "result": verdict, "rounds": after})
        goal_rows.append([label, f">= {target:.2f}", _fmt(med, ".3f"), verdict, _fmt(before, ".3f"),
                          _fmt(vs_b, ".3f"), _fmt(bound, ".3f"), _spread(after)])
    for row in rows:
        ratios = _values(rounds, row, "after", "cpu_x_before")
        med = _median(ratios)
        verdict = "n/a" if med is None else ("PASS" if med <= CPU_GOAL else "FAIL")
        b_ms = _median(_values(rounds, row, "before", "cpu_ms_per_inst"))
        a_ms = _median(_values(rounds, row, "after", "cpu_ms_per_inst"))
        label = f"{row} CPU/inst after/before"
        goals.append({"goal": label, "target": f"<= {CPU_GOAL:.2f}", "after": med, "result": verdict,
                      "before_ms_per_inst": b_ms, "after_ms_per_inst": a_ms, "rounds": ratios})
        goal_rows.append([label, f"<= {CPU_GOAL:.2f}", _fmt(med, ".3f"), verdict,
                          f"{_fmt(b_ms, '.2f')} -> {_fmt(a_ms, '.2f')} ms", "", "", _spread(ratios)])
    text += ["", "GOALS (after, median of per-round ratios; 'before', 'x direct+B' and DCMTK's own two hops "
             "(the ceiling on this machine) for reference)",
             _table(["goal", "target", "after", "result", "before", "after x direct+B", "two-hops",
                     "rounds (min-max)"], goal_rows)]
    medians["goals"] = goals

    raw_header = ["round", "row", "mode", "ack s", "e2e s", "ack/s", "e2e/s", "ack x dir", "e2e x dir",
                  "ack x dir+B", "e2e x dir+B", "CPU ms/inst", "scu CPU s", "drain s", "received", "errors"]
    raw = []
    failures = []
    for rnd in rounds:
        for name, mode in rnd["order"]:
            m = rnd["rows"][name][mode]
            if not ok(m):
                raw.append([str(rnd["round"]), name, mode, "FAILED", *([""] * (len(raw_header) - 4))])
                failures.append(f"round {rnd['round']} {name} {mode}: {m['error'].splitlines()[0]} "
                                f"(logs: {m['logs']}, kept with --keep; their tails are in the JSON)")
                continue
            received = m["received"] if isinstance(m["received"], int) else "/".join(map(str, m["received"]))
            raw.append([str(rnd["round"]), name, mode, f"{m['ack_s']:.3f}", _fmt(m["e2e_s"], ".3f"),
                        f"{m['ack_rate']:.0f}", _fmt(m["e2e_rate"], ".0f"), _fmt(m.get("ack_x_direct"), ".2f"),
                        _fmt(m.get("e2e_x_direct"), ".2f"), _fmt(m.get("ack_x_directB"), ".2f"),
                        _fmt(m.get("e2e_x_directB"), ".2f"), f"{m['cpu_ms_per_inst']:.2f}",
                        f"{m['storescu_cpu_s']:.2f}", _fmt(m.get("drain_wait_s"), ".2f"), str(received),
                        str(m.get("router_errors", "-"))])
    text += ["", "Every round (in the order run)", _table(raw_header, raw)]
    if failures:
        text += ["", "Failed measurements:", *failures]
    return "\n".join(text), medians


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


# -- main --------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in (*MODES, *INGEST_MODES)]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}: choose from {', '.join((*MODES, *INGEST_MODES))}")
    return list(dict.fromkeys(modes))


def _rows(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ROWS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'}: choose among {','.join(ROWS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a row named twice in {text!r}")
    return [r for r in ROWS if r in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=_rows, default=list(ROWS), help="rows to measure, comma-separated "
                   "(default ct1,ct4,small)")
    p.add_argument("--rounds", type=_positive, default=5, help="interleaved rounds (default 5: these machines "
                   "vary by 30 %% between runs of the same code)")
    p.add_argument("--ct-count", type=_positive, default=300, help="ct1: instances (default 300)")
    p.add_argument("--ct4-count", type=_positive, default=100, help="ct4: instances per sender (default 100)")
    p.add_argument("--ct4-associations", type=_positive, default=2,
                   help="ct4: the router's destination's max_associations, for before and after alike "
                        "(default 2: four senders' instances forwarded over up to two associations)")
    p.add_argument("--small-count", type=_positive, default=500, help="small: instances (default 500)")
    p.add_argument("--size-kib", type=_positive, default=512, help="ct1/ct4 pixel data per instance (default 512)")
    p.add_argument("--before", default=DEFAULT_BEFORE, help=f"the older revision (default {DEFAULT_BEFORE}); "
                   "'none' skips the before mode")
    p.add_argument("--workdir", default=None, help="where data, the old tree and peers live: a new or empty "
                   "folder (default: a new temp dir); removed at the end unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured direct run per row")
    p.add_argument("--modes", type=_modes, default=list(MODES),
                   help=f"modes to run, comma-separated (default {','.join(MODES)}; also {','.join(INGEST_MODES)})")
    opts = p.parse_args(argv)
    if opts.before.lower() == "none":
        opts.before = None
    else:
        full = _git("rev-parse", "--verify", "--quiet", f"{opts.before}^{{commit}}")
        if not full:
            p.error(f"--before {opts.before}: not a commit in {REPO}")
        opts.before_full = full
    if opts.workdir:
        wd = Path(opts.workdir)
        if wd.exists() and (not wd.is_dir() or any(wd.iterdir())):
            p.error(f"--workdir {wd}: exists and is not an empty folder")
        if wd.resolve().is_relative_to(REPO.resolve()):
            p.error(f"--workdir {wd}: inside the repository (the routers would import from it)")
    return opts


def build_rows(opts: argparse.Namespace, data: Path) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for name in opts.rows:
        if name == "ct1":
            files = ct_series(data / "ct1", opts.ct_count, size_kib=opts.size_kib)
            senders = [Sender(files, data / "ct1", [])]
            what = f"{len(files)} x {{kib}} KiB CT, one association"
            fork = False
        elif name == "ct4":
            senders = []
            for i in range(CT4_SENDERS):
                folder = data / f"ct4-{i}"
                files = ct_series(folder, opts.ct4_count, size_kib=opts.size_kib, prefix=f"S{i}CT")
                senders.append(Sender(files, folder, []))
            what = (f"{CT4_SENDERS} senders x {opts.ct4_count} x {{kib}} KiB CT, concurrent associations, "
                    f"storescp --fork; the router forwards over up to {opts.ct4_associations} association(s)")
            fork = True
        else:
            files = ct_series(data / "small", opts.small_count, size_kib=SMALL_KIB)
            senders = [Sender(files, data / "small", [])]
            what = f"{len(files)} x {{kib}} KiB (64x64 pixels), one association"
            fork = False
        sample = [Path(f) for s in senders for f in s.files[:5]]
        kib = statistics.mean(f.stat().st_size for f in sample) / 1024
        n = sum(len(s.files) for s in senders)
        associations = opts.ct4_associations if name == "ct4" else 1
        rows[name] = Row(name, n, SenderGroup(senders), _second_hop(senders, associations, data / f"{name}-hop2"),
                         fork, kib, what.format(kib=f"{kib:.1f}"), associations)
    return rows


def _second_hop(senders: list[Sender], associations: int, folder: Path) -> SenderGroup:
    """The two-hops mode's second hop: every sender's files, dealt in turn to ``associations`` storescu."""
    files = [Path(f) for sender in senders for f in sender.files]
    group = []
    for i in range(min(associations, len(files))):
        where = folder / str(i)
        where.mkdir(parents=True, exist_ok=True)
        group.append(Sender(files[i::associations], where, []))
    return SenderGroup(group)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="bench-goals-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Row] = {}
    try:
        started_state = tree_state()
        load_start = os.getloadavg()
        before_dir = None
        before_imports: list[str] = []
        if opts.before:
            before_dir, before_imports = extract_before(opts.before_full, workdir)
        after_imports = where_imported(_router_env(None), _empty_dir(workdir))
        wrong = [f for f in after_imports if not _under(f, REPO)]
        if wrong:
            raise RuntimeError(f"the 'after' router imports {after_imports}, not all under {REPO}")

        t = time.perf_counter()
        rows = build_rows(opts, workdir / "data")
        _progress(f"generated {sum(r.n for r in rows.values())} instances in {time.perf_counter() - t:.1f} s")
        if not opts.no_warmup:
            for row in rows.values():
                measure_direct(row.group, row.n, workdir / "runs" / row.name, [], bit_preserving=False,
                               fork=row.fork)

        modes = [m for m in opts.modes if opts.before or m != "before"]
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"goals-{stamp}-{'+'.join(rows)}-r{opts.rounds}.json"
        rounds: list[dict[str, Any]] = []
        for r in range(opts.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            rnd: dict[str, Any] = {"round": r + 1, "order": [], "rows": {}}
            for name, row in rows.items():
                rnd["rows"][name] = {}
                for mode in order:
                    m = measure(row, mode, workdir, before_dir, f"r{r + 1}-{name}-{mode.replace('+', 'B')}")
                    rnd["rows"][name][mode] = m
                    rnd["order"].append((name, mode))
                    if ok(m):
                        _progress(f"round {r + 1} {name:<5} {mode:<8}: ack {m['ack_s']:.3f} s  "
                                  f"e2e {_fmt(m['e2e_s'], '.3f')} s  CPU {m['cpu_s']:.2f} s")
                    else:
                        _progress(f"round {r + 1} {name:<5} {mode:<8}: FAILED {m['error'][:2000]}\n"
                                  + "\n".join(m["log_tails"]))
            rounds.append(rnd)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"partial": True, "rounds": rounds}, indent=1, default=str))

        ended_state = tree_state()
        load_end = os.getloadavg()
        derive(rounds, rows)
        table, medians = report(rounds, rows, modes)
        dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        head = [
            f"bench_goals (issue 20), {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"machine: {os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in load_start)} at start, "
            f"{' '.join(f'{x:.2f}' for x in load_end)} at end; {platform.platform()}, Python "
            f"{platform.python_version()}, {dcmtk.strip('$ ').strip()}",
            "before: " + (f"{opts.before} = {opts.before_full[:10]} (git archive into the work dir, "
                          "PYTHONPATH; router/workers/rules import from there: checked)"
                          if opts.before else "none (skipped)"),
            f"after: {_describe(started_state)}, the working tree"
            + ("" if started_state == ended_state else f"; CHANGED during the run, at the end: {_describe(ended_state)}"),
            f"params: rows {','.join(rows)}; {opts.rounds} round(s), modes rotating per round; "
            + "; ".join(f"{r.name} = {r.what}" for r in rows.values())
            + f"; warm-up {'no' if opts.no_warmup else 'one direct run per row'}; router log INFO, "
            "reconcile_interval 30, embedded Redis; storescp +xa, no +B unless direct+B",
            "ratios: median of per-round ratios (both sides from the same round); rates: medians",
        ]
        if started_state["dirty_files"]:
            shown = started_state["dirty_files"][:12]
            more = len(started_state["dirty_files"]) - len(shown)
            head.append("after's uncommitted files: " + ", ".join(f.strip() for f in shown)
                        + (f" and {more} more" if more > 0 else ""))
        changed = sorted({m.get("after_tree") for rnd in rounds for ms in rnd["rows"].values()
                          for m in [ms.get("after")] if ok(m)} - {None})
        if len(changed) > 1:
            head.append(f"WARNING: the working tree's router code changed between 'after' runs "
                        f"(fingerprints {', '.join(changed)}): rounds may have measured different code")
        text = "\n".join(head) + "\n\n" + table
        print(text)
        failed = sum(1 for rnd in rounds for ms in rnd["rows"].values() for m in ms.values() if not ok(m))

        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "dcmtk": dcmtk, "load_avg_start": load_start, "load_avg_end": load_end},
            "before": {"rev": opts.before, "commit": getattr(opts, "before_full", None), "imports": before_imports},
            "after": {"start": started_state, "end": ended_state, "imports": after_imports},
            "params": {"rows": list(rows), "rounds": opts.rounds, "ct_count": opts.ct_count,
                       "ct4_count": opts.ct4_count, "ct4_senders": CT4_SENDERS, "small_count": opts.small_count,
                       "size_kib": opts.size_kib, "small_size_kib": SMALL_KIB, "warmup": not opts.no_warmup,
                       "file_kib": {r.name: round(r.file_kib, 1) for r in rows.values()},
                       "instances": {r.name: r.n for r in rows.values()}},
            "medians": medians, "rounds": rounds, "table": text,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nJSON: {out.relative_to(REPO)}")
        if opts.keep:
            print(f"work dir kept: {workdir}")
        return 1 if failed else 0
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({str(exc) or 'Ctrl-C'}): everything started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench_goals: {exc}", file=sys.stderr)
        return 1
    finally:
        for row in rows.values():
            row.group.stop()
            row.hop2.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
