"""Faults the router is built to survive, made to happen end to end (docs/guarantees.md, the faults' table).

A routing worker, the embedded Redis and the dashboard are killed with
``kill -9`` while instances flow; a destination aborts now and then. DCMTK's
storescu is the modality, DCMTK's storescp the archive, Redis a real
redis-server (the test's, or the one ``run`` embeds), and the router runs as
real processes (``dicom-router run``, or ``ingest`` and ``worker`` apart).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from router.kernel import keys
from router.kernel.spool import SUFFIX
from router.supervisor import start_time
from tests import data
from tests.peers import LOOPBACK, StoreSCP, free_port, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e


def _uids(paths) -> set[str]:
    return {data.sop_instance_uid(p) for p in paths}


def _spool_files(spool: Path, state: str) -> list[Path]:
    folder = spool / state
    return sorted(folder.rglob(f"*{SUFFIX}")) if folder.exists() else []


def _spool_empty(spool: Path) -> bool:
    return not _spool_files(spool, "incoming") and not _spool_files(spool, "out")


def _send(router: RouterProcess, files) -> subprocess.CompletedProcess:
    return storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="MODALITY")


def _assert_all_sent(result: subprocess.CompletedProcess, count: int) -> None:
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("Received Store Response (Success)") == count, result.stdout[-3000:]


def _child(router: RouterProcess, needle: str) -> int | None:
    """The PID of ``run``'s child whose command line holds ``needle``, if one runs."""
    return next((pid for pid, cmd in router.children().items() if needle in cmd and start_time(pid)), None)


# -- kill -9 of a routing worker -----------------------------------------------------------------------------------


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T for stopped...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _freeze_while_holding_claims(conn: redis.Redis, worker: RouterProcess, spool: Path,
                                 timeout: float = 60) -> list[str]:
    """Stop ``worker`` (SIGSTOP) at a moment it has routed a batch already and holds route
    claims whose files are still in ``incoming/``; returns those spool ids. A moment it
    turns out to hold none, it goes on.

    Frozen first, then killed: the claims seen are the ones it dies holding, whatever
    the machine's load does to the time between a look and the kill.
    """
    mine = f"-{worker.pid}-"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "workers.routing: routed" not in worker.log_text():
            time.sleep(0.005)
            continue
        for key in conn.scan_iter(keys.inflight_pattern(keys.ROUTE)):
            if mine not in key.decode() or not conn.hlen(key):
                continue
            os.kill(worker.pid, signal.SIGSTOP)
            wait_until(lambda: _state(worker.pid) == "T", 10, "the routing worker to stop")
            held = [i.decode() for i in conn.hkeys(key)]
            if held and all((spool / "incoming" / f"{i}{SUFFIX}").exists() for i in held):
                return held
            os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError(f"the routing worker held no claim after a routed batch within {timeout} s")


def test_kill_9_of_a_routing_worker_holding_claims_loses_nothing(
    tmp_path, redis_url, redis_conn, storescp_factory, small_series
):
    """kill -9 of the routing worker while storescu sends and it holds a batch of claims
    (``route_at_ingest: false``: every instance goes through ``incoming/``): its claimed
    files wait in ``incoming/``, its claims are given back once its heartbeat is gone,
    a new routing worker routes them, every instance reaches storescp and the spool empties."""
    files = small_series(300)
    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url,
                           route_at_ingest=False)
    with (
        RouterProcess(tmp_path, config, "ingest") as ingest,
        RouterProcess(tmp_path, config, "worker", ["--queue", "pacs"], name="forward"),
    ):
        route = RouterProcess(tmp_path, config, "worker", ["--queue", "route"], name="route1").start()
        try:
            with ThreadPoolExecutor(1) as pool:
                sending = pool.submit(_send, ingest, files)
                frozen = _freeze_while_holding_claims(redis_conn, route, ingest.spool)
                claims_key = next(k for k in redis_conn.scan_iter(keys.inflight_pattern(keys.ROUTE))
                                  if f"-{route.pid}-" in k.decode())
                route.kill()
                sent = sending.result()
        finally:
            route.kill()
        # The ingest answered throughout: the routing worker is not on its path.
        _assert_all_sent(sent, len(files))
        held = {i.decode() for i in redis_conn.hkeys(claims_key)}
        assert held, "the dead worker's claims were gone at once: the kill proves nothing"
        assert held >= set(frozen)
        assert all((ingest.spool / "incoming" / f"{i}{SUFFIX}").exists() for i in held)
        with RouterProcess(tmp_path, config, "worker", ["--queue", "route"], name="route2"):
            # Its heartbeat lasts 15 s (workers/maintenance.py); the reconciler runs every second.
            wait_until(lambda: not redis_conn.exists(claims_key), 90, "the dead worker's claims to be given back")
            assert _uids(pacs.wait_for_files(len(files), timeout=120)) == _uids(files)
            wait_until(lambda: _spool_empty(ingest.spool), 60, "the spool to empty")


# -- kill -9 of the embedded Redis ---------------------------------------------------------------------------------


def test_kill_9_of_the_embedded_redis_mid_stream_loses_nothing(tmp_path, storescp_factory, small_series):
    """kill -9 of the Redis that ``run`` embeds while a forwarding worker is mid-stream toward a
    slow storescp: ``run`` starts it again on the same address and data, the ingest answers
    Success for everything sent right after the kill and after the restart, every instance
    reaches storescp (at least once), and the spool empties."""
    before, during, after = small_series(6), small_series(6), small_series(3)
    # The destination answers each store a second after writing it, so the kill lands mid-stream.
    pacs = storescp_factory(ae_title="PACS", answer_delay=1)
    data_dir = tmp_path / "data"
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, data_dir=str(data_dir))
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        url = wait_until(lambda: (data_dir / "redis.url").exists() and (data_dir / "redis.url").read_text(), 30,
                         "the embedded Redis's URL")
        _assert_all_sent(_send(router, before), len(before))
        wait_until(lambda: len(pacs.files()) >= 2, 60, "the forwarding to be under way")
        first = _child(router, "redis-server")
        assert first is not None, router.children()
        os.kill(first, signal.SIGKILL)
        assert len(pacs.files()) < len(before), "the forwarding was over before the kill: it proves nothing"
        _assert_all_sent(_send(router, during), len(during))
        second = wait_until(lambda: (pid := _child(router, "redis-server")) not in (None, first) and pid, 30,
                            "run to start the embedded Redis again")
        assert "embedded Redis exited with" in router.log_text()
        assert (data_dir / "redis.url").read_text() == url  # the address the children know
        _assert_all_sent(_send(router, after), len(after))
        wait_until(lambda: _spool_empty(router.spool), 180, "the spool to empty")
        assert _uids(pacs.files()) == _uids(before + during + after), router.log_tail(60)
        assert _child(router, "redis-server") == second


# -- kill -9 of the dashboard --------------------------------------------------------------------------------------


def _healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=5) as answer:
            return answer.status == 200 and json.load(answer) == {"alive": True}
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _take_port_from_the_dashboard(router: RouterProcess, port: int, timeout: float = 30) -> socket.socket:
    """Listen on the dashboard's port ourselves, so that the dashboards ``run`` starts
    again cannot, for as long as the test holds it: the outage lasts, whatever the
    machine's speed. One that bound it first is killed too (another ``kill -9``)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            sock.listen(1)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"could not take port {port} from the dashboard within {timeout} s") from None
            restarted = _child(router, " dashboard ")
            if restarted is not None and _healthz(port):
                os.kill(restarted, signal.SIGKILL)
            time.sleep(0.01)


def test_kill_9_of_the_dashboard_under_run_is_restarted_and_routing_goes_on(
    tmp_path, redis_url, storescp_factory, small_series
):
    """kill -9 of the dashboard ``run`` serves: while no dashboard can answer (the test holds
    its port), storescu's instances are answered Success and reach storescp; once the port
    is free, ``run`` has a new dashboard answering ``/healthz``."""
    pacs = storescp_factory(ae_title="PACS")
    dashboard_port = free_port()
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url)
    config["dashboard"] = {"host": LOOPBACK, "port": dashboard_port}
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        wait_until(lambda: _healthz(dashboard_port), 60, "the dashboard to answer /healthz")
        first = _child(router, " dashboard ")
        assert first is not None, router.children()
        os.kill(first, signal.SIGKILL)
        held = _take_port_from_the_dashboard(router, dashboard_port)
        try:
            files = small_series(10)
            _assert_all_sent(_send(router, files), len(files))
            assert _uids(pacs.wait_for_files(len(files), timeout=60)) == _uids(files)
            wait_until(lambda: _spool_empty(router.spool), 30, "the spool to empty")
            wait_until(lambda: "dashboard exited with" in router.log_text(), 30, "run to see the dashboard die")
        finally:
            held.close()
        # Each dashboard that found the port taken died young: run's back-off doubles up to 30 s.
        wait_until(lambda: _healthz(dashboard_port), 90, "a new dashboard to answer /healthz")
        second = _child(router, " dashboard ")
        assert second not in (None, first)
        more = small_series(3)
        _assert_all_sent(_send(router, more), len(more))
        assert _uids(pacs.wait_for_files(len(files) + len(more), timeout=60)) == _uids(files + more)


# -- a flaky destination -------------------------------------------------------------------------------------------

ABORTED = "ABORT initiated"
"""What storescp logs when it aborts an association as told (--abort-after, --abort-during)."""
BUDGET = {"max_attempts": 6, "backoff_seconds": [0.3, 0.6, 1.0], "jitter": 0.1}
"""Six attempts per instance: more than any instance meets here (each abort charges the
instance in flight, then the sender moves on to the next; a charged one waits at the tail)."""


def test_a_destination_that_aborts_now_and_then_gets_everything_and_nothing_is_a_dead_letter(
    tmp_path, redis_url, storescp_factory, small_series
):
    """One archive on one port, restarted in turns as a storescp that aborts at its first
    C-STORE (``--abort-after``, then ``--abort-during``) and a slow healthy one stopped
    mid-association after a few stores: every instance is acknowledged by a healthy turn at
    least once, none is a dead letter, and the spool empties."""
    files = small_series(40)
    port = free_port()
    pacs = destination(port, "PACS", retry=BUDGET, instance_retry=BUDGET)
    config = router_config(tmp_path, {"pacs": pacs}, redis_url=redis_url)
    received: dict[str, Path] = {}
    turns: list[StoreSCP] = []

    def turn(name: str, *args: str) -> StoreSCP:
        scp = storescp_factory(tmp_path / name, ae_title="PACS", port=port, extra_args=list(args))
        turns.append(scp)
        return scp

    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        flaky = turn("aborts-after", "--abort-after")
        _assert_all_sent(_send(router, files), len(files))
        for n, abort in enumerate(["--abort-during", "--abort-after", None]):
            wait_until(lambda: ABORTED in flaky.log_text(), 60, f"{flaky.out_dir.name} to abort an association")
            flaky.stop()
            # Slow (a second per progress step of a store: ~3 s an instance here), so that it
            # is stopped in the middle of the stream, not after it.
            healthy = turn(f"healthy{n}", *(["--sleep-during", "1"] if abort else []))
            if abort is None:
                break
            # Two stores, then stopped while receiving the next: a peer lost mid-association.
            already = len(received)
            wait_until(lambda: len(healthy.received().keys() - received.keys()) >= 2, 60,
                       f"{healthy.out_dir.name} to store two new instances")
            healthy.stop()
            received.update(healthy.received())
            assert already < len(received) < len(files), "the turns did not interleave with the stream"
            flaky = turn(f"aborts{n}{abort}", abort)

        def everything() -> bool:
            received.update(healthy.received())
            return received.keys() >= _uids(files)

        wait_until(everything, 120, "every instance acknowledged by a healthy turn")
        wait_until(lambda: _spool_empty(router.spool), 60, "the spool to empty")
        assert not [p for p in (router.spool / "dead").rglob("*") if p.is_file()], "a dead letter within the budget"
        listing = subprocess.run([sys.executable, "-m", "router", "queues", "-c", str(router.config_path), "--json"],
                                 capture_output=True, text=True, check=True)
        assert json.loads(listing.stdout)["dead_letter_list"] == []
        log = router.log_text()
    aborts = sum(scp.log_text().count(ABORTED) for scp in turns)
    assert aborts >= 3, "fewer aborts than turns that abort"
    assert "dead letter" not in log
    assert "retry in" in log  # the aborted instances were charged and sent again
