"""Memory with a growing backlog: does the router's RSS stay flat while a
destination is down and instances pile up in the spool?

    .venv/bin/python bench/bench_backlog.py [--count 4000] [--steps 4] [--size-kib 16]

Starts `dicom-router run` (embedded Redis) with one destination whose port
nothing listens on, sends the instances with DCMTK storescu in ``--steps``
bursts, and after each burst prints the backlog and every router process's
resident memory (VmRSS) and peak (VmHWM). Then it starts the destination
(storescp) and reports how long the backlog took to drain and the memory
after. Everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import data  # noqa: E402
from tests.peers import LOOPBACK, StoreSCP, free_port, storescu  # noqa: E402
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config  # noqa: E402


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def _role(cmdline: str) -> str:
    if "redis-server" in cmdline:
        return "redis"
    if " ingest " in cmdline:
        return "ingest"
    if "--queue" in cmdline:
        return "worker[" + cmdline.split("--queue", 1)[1].split()[0] + "]"
    return cmdline.split()[0]


def _table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).rjust(widths[c]) for c in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size-kib", type=int, default=16)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        work = Path(tmp)
        files = data.ct_series(work / "ct", opts.count, size_kib=opts.size_kib)
        port = free_port()
        config = router_config(work / "router", {"pacs": destination(port, "PACS")})
        config["router"]["reconcile_interval"] = 30
        router = RouterProcess(work / "router", config)
        router._command = lambda: [sys.executable, "-m", "router", "run", "-c", str(router.config_path),
                                   "--log-level", "INFO"]
        rows: list[dict[str, object]] = []
        scp = None
        try:
            router.start()
            time.sleep(2)
            step = -(-opts.count // opts.steps)
            for start in range(0, opts.count, step):
                chunk = files[start : start + step]
                result = storescu(LOOPBACK, router.port, chunk, called_ae=ROUTER_AE)
                if result.returncode != 0:
                    raise RuntimeError(result.stdout[-2000:])
                time.sleep(3)  # let routing settle
                backlog = len(list((router.spool / "out" / "pacs").glob("*.dcm")))
                row: dict[str, object] = {"backlog": backlog}
                for pid, cmd in sorted(router.children().items()):
                    mem = _memory(pid)
                    row[f"{_role(cmd)} RSS MiB"] = round(mem["VmRSS"] / 1024, 1)
                rows.append(row)
            scp = StoreSCP(work / "pacs", ae_title="PACS", port=port, track_completion=False).start()
            started = time.monotonic()
            while list((router.spool / "out" / "pacs").glob("*.dcm")):
                time.sleep(0.2)
            drained = time.monotonic() - started
            row = {"backlog": 0}
            for pid, cmd in sorted(router.children().items()):
                mem = _memory(pid)
                row[f"{_role(cmd)} RSS MiB"] = round(mem["VmRSS"] / 1024, 1)
            rows.append(row)
        finally:
            router.stop()
            if scp is not None:
                scp.stop()
        print(f"{opts.count} x {opts.size_kib} KiB CT, destination down, then up")
        _table(rows)
        print(f"backlog of {opts.count} drained in {drained:.1f} s ({opts.count / drained:.0f} inst/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
