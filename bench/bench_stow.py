"""STOW-RS against C-STORE to the same Orthanc, in the same run (issue 22).

Run: ``.venv/bin/python bench/bench_stow.py [--count 300] [--size-kib 512]
[--runs 3] [--max-instances 50]``

N generated CT instances (Explicit VR Little Endian, ``tests.data.ct_series``)
are written once and ONE Orthanc 1.10 with its DICOMweb plugin behind HTTP
Basic (``tests.dicomweb_peers.OrthancWeb``) is started for the whole run.
Each run measures, in an order that rotates from run to run:

* ``direct``: DCMTK ``storescu`` -> Orthanc's DICOM port (one association);
* ``router C-STORE``: ``storescu`` -> ``dicom-router run`` -> Orthanc's DICOM
  port (a destination with ``ae_title``, ``host``, ``port``);
* ``router STOW-RS``: ``storescu`` -> ``dicom-router run`` -> Orthanc's
  DICOMweb (a destination with ``dicomweb: {url, username, password_env,
  max_instances}``).

End to end is from storescu's start until Orthanc's ``/statistics`` says
``CountInstances`` = N (polled over one keep-alive HTTP connection); ack is
storescu's own wall time. CPU: the router's whole process tree (as
``bench_pipeline.py`` reads it from ``/proc``) and Orthanc's process, from
just before storescu starts until Orthanc holds N and the router's spool is
drained. Between measurements every instance is deleted from Orthanc through
its REST API (``DELETE /patients/{id}``, then ``CountInstances`` must be 0)
and ``sync`` writes the dirty pages back, so each measurement starts from an
empty Orthanc with nothing left to flush. A fresh router (with its embedded
Redis) is started for every router measurement.

Prints a Markdown table of medians (min-max) per mode and the ratios (medians
of per-run ratios: both sides of a ratio ran in the same run); writes a JSON
copy to ``bench/results/``. See bench/README.md ("bench_stow.py").
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (str(REPO), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_pipeline import (  # noqa: E402
    BenchRouter,
    Interrupted,
    Sender,
    _cmdline,
    _git,
    _wait_drained,
    cpu_delta,
    cpu_snapshot,
    process_tree,
    role,
)
from tests.data import ct_series  # noqa: E402
from tests.dicomweb_peers import OrthancWeb  # noqa: E402
from tests.peers import LOOPBACK  # noqa: E402
from tests.router_proc import ROUTER_AE, destination, router_config  # noqa: E402

RESULTS = REPO / "bench" / "results"
PASSWORD_ENV = "BENCH_STOW_PASSWORD"
TIMEOUT = 600.0  # s for one measurement
SCU_POLL = 0.005  # s between looks at storescu
MODES = ["direct", "router C-STORE", "router STOW-RS"]


# -- Orthanc ------------------------------------------------------------------------

class Poller:
    """``GET /statistics`` over one keep-alive connection, with Orthanc's Basic credentials."""

    def __init__(self, orthanc: OrthancWeb) -> None:
        self.port = orthanc.http_port
        user, password = orthanc.credentials
        self.headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        self.conn: http.client.HTTPConnection | None = None
        self.calls = 0

    def count(self) -> int:
        for attempt in (1, 2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
                self.conn.request("GET", "/statistics", headers=self.headers)
                resp = self.conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"Orthanc /statistics: HTTP {resp.status} {body[:200]!r}")
                self.calls += 1
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return int(json.loads(body)["CountInstances"])
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def empty_orthanc(orthanc: OrthancWeb, poller: Poller) -> float:
    """Delete every patient (so every instance); check none is left; return the time it took."""
    t = time.perf_counter()
    for patient in orthanc.rest("/patients"):
        orthanc._request("DELETE", f"/patients/{patient}", timeout=120)
    left = poller.count()
    if left:
        raise RuntimeError(f"Orthanc still holds {left} instances after deleting every patient")
    return time.perf_counter() - t


def orthanc_cpu(orthanc: OrthancWeb) -> float:
    """Orthanc's CPU seconds so far (user+system, all threads, reaped children)."""
    return sum(cpu_snapshot({orthanc.pid: ""}).values())


def calibrate_polls(orthanc: OrthancWeb, poller: Poller, n: int = 500) -> float:
    """Orthanc's CPU seconds per ``/statistics`` request, from ``n`` back-to-back requests."""
    cpu0 = orthanc_cpu(orthanc)
    for _ in range(n):
        poller.count()
    return (orthanc_cpu(orthanc) - cpu0) / n


# -- one measurement ------------------------------------------------------------------

def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def measure(mode: str, sender: Sender, n: int, workdir: Path, orthanc: OrthancWeb, poller: Poller,
            opts: argparse.Namespace) -> dict[str, Any]:
    """One measurement of ``mode``; Orthanc must be empty when it starts."""
    result: dict[str, Any] = {"mode": mode}
    base = workdir / "router"
    with contextlib.ExitStack() as stack:
        router = None
        procs: dict[int, str] = {}
        if mode != "direct":
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            common = destination(0, **({"echo_interval_seconds": 0} if opts.no_echo else {}))
            for key in ("ae_title", "host", "port"):
                common.pop(key)
            if mode == "router C-STORE":
                dest = destination(orthanc.dicom_port, orthanc.ae_title, **common)
            else:
                web: dict[str, Any] = {"url": orthanc.dicomweb_url, "username": orthanc.credentials[0],
                                       "password_env": PASSWORD_ENV, "max_instances": opts.max_instances}
                if opts.max_bytes is not None:
                    web["max_bytes"] = opts.max_bytes
                dest = {"dicomweb": web, **common}
            config = router_config(base, {"orthanc": dest}, reconcile_interval=30.0)
            router = BenchRouter(base, config, log_level=opts.log_level,
                                 env={PASSWORD_ENV: orthanc.credentials[1]})
            stack.callback(router.stop)
            router.start()
            router.wait_workers(2)  # the routing worker and the destination's
            procs = process_tree(router.pid)
            root_cmd = _cmdline(router.pid)
            result["router_destination"] = dest

        os.sync()  # what earlier measurements wrote goes to disk now, not during this one
        time.sleep(opts.settle)
        polls0 = poller.calls
        r_cpu0 = cpu_snapshot(procs)
        o_cpu0 = orthanc_cpu(orthanc)
        port, called = (router.port, ROUTER_AE) if router else (orthanc.dicom_port, orthanc.ae_title)
        ack = e2e = None
        scu_cpu = 0.0
        next_poll = 0.0
        started = time.perf_counter()
        try:
            sender.start(port, called)
            while ack is None or e2e is None:
                now = time.perf_counter()
                if ack is None:
                    used = sender.reap()
                    if used is not None:
                        ack, scu_cpu = now - started, used
                if e2e is None and now >= next_poll:
                    if poller.count() >= n:
                        e2e = time.perf_counter() - started
                    next_poll = now + opts.poll
                if now - started > TIMEOUT:
                    raise RuntimeError(f"timeout after {TIMEOUT} s: Orthanc holds {poller.count()} of {n}")
                time.sleep(SCU_POLL)
        except Exception:
            if router is not None:
                print(f"router log tail:\n{router.log_tail()}", file=sys.stderr)
            print(f"storescu log tail:\n{_log_tail(sender.log)}", file=sys.stderr)
            raise
        finally:
            sender.stop()
        polls = poller.calls - polls0
        if router is not None:
            result["drain_wait_s"] = _wait_drained(router.spool)
            procs.update(process_tree(router.pid))
        r_cpu1 = cpu_snapshot(procs)
        o_cpu1 = orthanc_cpu(orthanc)

        held = poller.count()
        if held != n:
            raise RuntimeError(f"{mode}: Orthanc holds {held} instances, expected {n}")
        result.update({"ack_s": ack, "e2e_s": e2e, "storescu_cpu_s": scu_cpu, "orthanc_cpu_s": o_cpu1 - o_cpu0,
                       "polls": polls, "held": held})
        if router is not None:
            roles = {pid: role(cmd, root_cmd) for pid, cmd in procs.items()}
            per_role: dict[str, float] = defaultdict(float)
            for (pid, _), seconds in cpu_delta(r_cpu0, r_cpu1).items():
                per_role[roles[pid]] += seconds
            result["router_cpu_by_process_s"] = dict(sorted(per_role.items()))
            result["router_cpu_s"] = sum(per_role.values())
            log = router.log_text()
            result["router_errors"] = sum(1 for line in log.splitlines() if " ERROR " in line or "Traceback" in line)
            result["router_warnings"] = sum(1 for line in log.splitlines() if " WARNING " in line)
            dead = router.spool / "dead"
            result["dead_letters"] = sum(1 for _ in dead.rglob("*.dcm")) if dead.exists() else 0
    return result


# -- report -----------------------------------------------------------------------------

def derive(runs: list[dict[str, dict[str, Any]]], n: int, poll_cpu_s: float) -> None:
    """Rates, per-instance CPU and same-run ratios, in place."""
    for run in runs:
        for m in run.values():
            m["e2e_rate"] = n / m["e2e_s"]
            m["ack_rate"] = n / m["ack_s"]
            m["orthanc_cpu_ms"] = 1000.0 * m["orthanc_cpu_s"] / n
            m["orthanc_poll_ms"] = 1000.0 * m["polls"] * poll_cpu_s / n
            m["router_cpu_ms"] = 1000.0 * m["router_cpu_s"] / n if "router_cpu_s" in m else None
        d, c, s = run["direct"], run["router C-STORE"], run["router STOW-RS"]
        run["ratios"] = {
            "STOW-RS / C-STORE": _ratios(s, c),
            "C-STORE / direct": _ratios(c, d),
            "STOW-RS / direct": _ratios(s, d),
        }


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("e2e_rate", "ack_rate", "router_cpu_ms", "orthanc_cpu_ms"):
        out[key] = a[key] / b[key] if a.get(key) and b.get(key) else None
    return out


def _cell(values: list[float | None], spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = format(statistics.median(values), spec)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), spec)}–{format(max(values), spec)})"


def _md(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(r) for r in rows)])


def report(runs: list[dict[str, dict[str, Any]]], n: int) -> tuple[str, dict[str, Any]]:
    medians: dict[str, Any] = {}
    cols = [("e2e inst/s", "e2e_rate", ".0f"), ("ack inst/s", "ack_rate", ".0f"),
            ("router CPU ms/inst", "router_cpu_ms", ".2f"), ("Orthanc CPU ms/inst", "orthanc_cpu_ms", ".2f"),
            ("of which polls", "orthanc_poll_ms", ".2f")]
    rows = []
    for mode in MODES:
        rows.append([mode, *(_cell([r[mode][key] for r in runs], spec) for _, key, spec in cols)])
        medians[mode] = {key: _median([r[mode][key] for r in runs]) for _, key, _ in cols}
    text = [f"Medians (min–max) over {len(runs)} run(s)", "", _md(["mode", *(c[0] for c in cols)], rows)]

    rcols = [("e2e inst/s", "e2e_rate"), ("ack inst/s", "ack_rate"), ("router CPU/inst", "router_cpu_ms"),
             ("Orthanc CPU/inst", "orthanc_cpu_ms")]
    rrows = []
    for name in runs[0]["ratios"]:
        rrows.append([name, *(_cell([r["ratios"][name][key] for r in runs], ".2f") for _, key in rcols)])
        medians[name] = {key: _median([r["ratios"][name][key] for r in runs]) for _, key in rcols}
    text += ["", "Ratios (median (min–max) of per-run ratios)", "",
             _md(["ratio", *(c[0] for c in rcols)], rrows)]

    roles = sorted({role for r in runs for mode in MODES[1:] for role in r[mode]["router_cpu_by_process_s"]})
    prows = []
    for mode in MODES[1:]:
        cells = []
        for rl in roles:
            vals = [r[mode]["router_cpu_by_process_s"].get(rl) for r in runs]
            cells.append(_cell([None if v is None else 1000.0 * v / n for v in vals], ".2f"))
        prows.append([mode, *cells])
    text += ["", "Router CPU ms/inst by process (median (min–max))", "", _md(["mode", *roles], prows)]

    raw_header = ["run", "mode", "ack s", "e2e s", "e2e inst/s", "router CPU s", "Orthanc CPU s", "polls",
                  "drain wait s", "errors", "dead"]
    raw = []
    for i, r in enumerate(runs, 1):
        for mode in r["order"]:
            m = r[mode]
            raw.append([str(i), mode, f"{m['ack_s']:.3f}", f"{m['e2e_s']:.3f}", f"{m['e2e_rate']:.0f}",
                        "-" if m.get("router_cpu_s") is None else f"{m['router_cpu_s']:.2f}",
                        f"{m['orthanc_cpu_s']:.2f}", str(m["polls"]),
                        "-" if "drain_wait_s" not in m else f"{m['drain_wait_s']:.2f}",
                        str(m.get("router_errors", "-")), str(m.get("dead_letters", "-"))])
    text += ["", "Every measurement, in the order run", "", _md(raw_header, raw)]
    return "\n".join(text), medians


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- main -----------------------------------------------------------------------------

def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=300, help="instances per measurement (default 300)")
    p.add_argument("--size-kib", type=int, default=512, help="pixel data per instance (default 512 → 513 KiB files)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of the three modes (default 3)")
    p.add_argument("--max-instances", type=int, default=50,
                   help="the STOW-RS destination's dicomweb.max_instances (default 50, the product default)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="dicomweb.max_bytes (default: the product default, 32 MiB)")
    p.add_argument("--poll", type=float, default=0.01,
                   help="seconds between Orthanc /statistics requests while waiting (default 0.01)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds of quiet after sync before each measurement (default 0.5)")
    p.add_argument("--no-echo", action="store_true",
                   help="destinations with echo_interval_seconds 0 (default: the product default, 60 s)")
    p.add_argument("--log-level", default="INFO", help="router log level (default INFO, the product default)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the unmeasured first pass of the three modes (page cache, Orthanc, plugin)")
    p.add_argument("--workdir", default=None, help="where data, Orthanc and routers live (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    opts = p.parse_args(argv)
    if opts.count < 1 or opts.runs < 1 or opts.size_kib < 1 or opts.max_instances < 1 or opts.poll <= 0:
        p.error("--count, --runs, --size-kib, --max-instances and --poll must be positive")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    n = opts.count

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="bench-stow-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if not opts.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        try:
            load_start = os.getloadavg()
            t = time.perf_counter()
            files = ct_series(workdir / "data", n, size_kib=opts.size_kib)
            file_kib = statistics.mean(f.stat().st_size for f in files[:10]) / 1024
            print(f"generated {n} CT instances of {file_kib:.1f} KiB (Explicit VR LE) in "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            sender = Sender(files, workdir, [])
            stack.callback(sender.stop)

            orthanc = OrthancWeb(workdir / "orthanc")
            stack.callback(orthanc.stop)
            orthanc.start()
            poller = Poller(orthanc)
            stack.callback(poller.close)
            poll_cpu_s = calibrate_polls(orthanc, poller)
            print(f"Orthanc {orthanc.rest('/system').get('Version')} pid {orthanc.pid}: "
                  f"{1000 * poll_cpu_s:.3f} ms CPU per /statistics request", file=sys.stderr, flush=True)

            if not opts.no_warmup:
                for mode in MODES:
                    empty_orthanc(orthanc, poller)
                    m = measure(mode, sender, n, workdir, orthanc, poller, opts)
                    print(f"warm-up {mode:<15}: e2e {m['e2e_s']:.3f} s (not counted)", file=sys.stderr, flush=True)

            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = RESULTS / f"stow-{stamp}-{n}x{opts.size_kib}k.json"
            runs: list[dict[str, Any]] = []
            for r in range(opts.runs):
                order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
                run: dict[str, Any] = {"order": order}
                for mode in order:
                    deleted = empty_orthanc(orthanc, poller)
                    m = measure(mode, sender, n, workdir, orthanc, poller, opts)
                    m["delete_before_s"] = deleted
                    run[mode] = m
                    rcpu = "-" if m.get("router_cpu_s") is None else f"{m['router_cpu_s']:.2f} s"
                    print(f"run {r + 1} {mode:<15}: ack {m['ack_s']:.3f} s  e2e {m['e2e_s']:.3f} s  "
                          f"router CPU {rcpu}  Orthanc CPU {m['orthanc_cpu_s']:.2f} s", file=sys.stderr, flush=True)
                runs.append(run)
                RESULTS.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"partial": True, "runs": runs}, indent=1, default=str))
            empty_orthanc(orthanc, poller)

            # "order" is not a mode: keep it out of derive's loops.
            orders = [run.pop("order") for run in runs]
            derive(runs, n, poll_cpu_s)
            for run, order in zip(runs, orders):
                run["order"] = order
            text, medians = report(runs, n)
            load_end = os.getloadavg()
            dirty = _git("status", "--porcelain", "--", "router", "workers", "rules").splitlines()
            header = (
                f"{n} × {file_kib:.0f} KiB CT (Explicit VR LE), {opts.runs} runs, STOW-RS max_instances "
                f"{opts.max_instances}" + (f", max_bytes {opts.max_bytes}" if opts.max_bytes else "") + "\n"
                f"{datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} cores, load average "
                f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at the start, "
                f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at the end\n"
                f"router {_git('rev-parse', '--short', 'HEAD')}{' + uncommitted ' + str(len(dirty)) + ' file(s)' if dirty else ''}"
                f", Python {platform.python_version()}, Orthanc {orthanc.rest('/system').get('Version')} "
                f"(DICOMweb plugin {orthanc.rest('/plugins/dicom-web').get('Version')}), "
                f"{_version(['storescu', '--version']).strip('$ ')}\n"
                f"Orthanc CPU per /statistics poll: {1000 * poll_cpu_s:.3f} ms (polled every {opts.poll * 1000:.0f} ms "
                f"until it holds N; included in Orthanc's CPU, the 'of which polls' column)"
            )
            print()
            print(header)
            print()
            print(text)
            result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "header": header,
                      "params": {k: v for k, v in vars(opts).items()}, "file_kib": round(file_kib, 1),
                      "poll_cpu_s": poll_cpu_s, "load_start": load_start, "load_end": load_end,
                      "commit": _git("rev-parse", "--short", "HEAD"), "dirty_files": dirty,
                      "medians": medians, "runs": runs, "table": text}
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str))
            print(f"\nJSON: {out.relative_to(REPO)}")
            return 0
        except (KeyboardInterrupt, Interrupted) as exc:
            print(f"\ninterrupted ({str(exc) or 'Ctrl-C'}): stopping everything started", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - report it, stop everything, exit 1
            print(f"\nfailed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if "orthanc" in locals():
                print(f"Orthanc log tail:\n{_log_tail(orthanc.log_path, 20)}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stops below are not to be cut short


if __name__ == "__main__":
    sys.exit(main())
