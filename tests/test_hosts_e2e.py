"""Several hosts, one Redis, one spool: a host killed whole loses nothing.

Each host is a ``dicom-router run`` in namespaces of its own, made by the
test with ``unshare``: its own hostname (UTS), its own PIDs (a PID namespace
whose first process takes every other with it when it dies, as a machine
that loses power does), its own loopback address (127.0.0.2, 127.0.0.3).
Both hosts share the test's Redis and one spool directory, as hosts sharing
an NFS export would; DCMTK's storescu sends to both, DCMTK's storescp is
the archive.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from router.kernel import keys
from tests import data
from tests.peers import free_port, store_outcomes, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

# Set the hostname inside the new UTS namespace, then become the router.
_BECOME_HOST = ("import os, socket, sys; socket.sethostname(sys.argv[1]); "
                "os.execv(sys.executable, [sys.executable, '-m', 'router', *sys.argv[2:]])")


class Host(RouterProcess):
    """``dicom-router run`` as a host of its own: hostname, PID namespace, address.

    ``kill()`` (SIGKILL to the process group, as every server here) kills
    the namespace's first process; the kernel then kills every process left
    in the namespace, whatever group it put itself in.
    """

    def __init__(self, workdir: Path, config: dict, hostname: str) -> None:
        self.hostname = hostname
        super().__init__(workdir, config, "run", name=hostname, log_level="INFO")

    def _command(self) -> list[str]:
        return ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
                sys.executable, "-c", _BECOME_HOST, self.hostname,
                "run", "-c", str(self.config_path), "--log-level", self.log_level]

    @property
    def address(self) -> str:
        return self.config["router"]["host"]


def _host_config(workdir: Path, spool: Path, address: str, port: int, pacs_port: int, redis_url: str) -> dict:
    """One host's config: its own address, the shared spool, and the data directory
    beside it shared too (the default), as on one NFS export."""
    return router_config(workdir, {"pacs": destination(pacs_port, "PACS", max_associations=1)},
                         redis_url=redis_url, host=address, port=port, spool_dir=str(spool))


class Sender(threading.Thread):
    """storescu runs to one host, one after the other, on a thread.

    Args:
        batches: one storescu run (one association) each.
        until_refused: after the batches, send new ones it makes, one run each, until a
            run is not answered Success for everything (its host died).
    """

    def __init__(self, host: Host, batches: list[list[Path]], calling_ae: str,
                 until_refused: Callable[[], list[Path]] | None = None) -> None:
        super().__init__(name=f"storescu-{host.hostname}-{calling_ae}", daemon=True)
        self.host, self.batches, self.calling_ae, self.until_refused = host, batches, calling_ae, until_refused
        self.acknowledged: set[str] = set()
        self.refused: list[str] = []
        self.sent = 0

    def run(self) -> None:
        batches = iter(self.batches)
        for _ in range(1000):
            batch = next(batches, None) or (self.until_refused() if self.until_refused else None)
            if batch is None:
                return
            result = storescu(self.host.address, self.host.port, batch, called_ae=ROUTER_AE,
                              calling_ae=self.calling_ae, timeout=600)
            self.sent += len(batch)
            for path, outcome in store_outcomes(result.stdout, batch).items():
                if outcome.stored:
                    self.acknowledged.add(data.sop_instance_uid(path))
                else:
                    self.refused.append(f"{Path(path).name}: {outcome.reason}")
            if self.refused and self.until_refused:
                return


def _claims_of(client: redis.Redis, hostname: str) -> int:
    """Spool ids that forwarding workers of ``hostname`` hold claimed now."""
    held = 0
    for key in client.scan_iter(keys.inflight_pattern(keys.forward("pacs")), count=100):
        worker_id = key.decode().rsplit(":", 1)[1]
        if worker_id.startswith(f"{hostname}-"):
            held += client.hlen(key)
    return held


def _forwarding_worker_of(host: Host) -> int:
    """The PID (as this machine sees it) of the host's forwarding worker for "pacs"."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != host.proc.pid:
                continue
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if b"worker" in words and b"pacs" in words:
            return int(entry.name)
    raise AssertionError(f"no forwarding worker in {host.hostname}'s process group")


def _spool_left(spool: Path) -> dict[str, int]:
    return {state: sum(1 for _ in (spool / state).rglob("*.dcm"))
            for state in ("incoming", "out") if (spool / state).exists()}


def test_a_host_killed_whole_loses_nothing(tmp_path, redis_url, storescp_factory, ct_series):
    """Two hosts receive and forward; one is killed whole (every process at once)
    while it holds claimed instances and its modalities are mid-association.
    Every instance either host acknowledged reaches the archive, the survivor
    answers Success throughout, nothing stays in the spool, and the dead host,
    started again under its name, rejoins and delivers."""
    spool = tmp_path / "shared-spool"
    # The senders to host A keep sending until it dies, so its forwarding worker claims
    # batch after batch: the archive need not be slow.
    pacs = storescp_factory(ae_title="PACS", fork=True)
    port = free_port()
    host_a = Host(tmp_path / "host-a", _host_config(tmp_path / "host-a", spool, "127.0.0.2", port, pacs.port,
                                                   redis_url), "router-a")
    host_b = Host(tmp_path / "host-b", _host_config(tmp_path / "host-b", spool, "127.0.0.3", port, pacs.port,
                                                   redis_url), "router-b")
    client = redis.Redis.from_url(redis_url)
    # Host A alone first: its worker is then the one draining the archive's backlog
    # (one drain at a time per destination), and keeps it while the backlog lasts.
    with host_a:
        senders_a = [Sender(host_a, [files[:20], files[20:]], f"CT_A{n}",
                            until_refused=lambda: ct_series(20, size_kib=64))
                     for n, files in enumerate(ct_series(40, size_kib=64) for _ in range(2))]
        for sender in senders_a:
            sender.start()
        wait_until(lambda: _claims_of(client, host_a.hostname), 120, "host A's forwarding worker to hold claims")
        with host_b:
            # The data directory is shared too: each host keeps its children's PIDs in a file of its own.
            wait_until(lambda: {p.name for p in (tmp_path / "redis").glob("run.*.pids")}
                       == {"run.router-a.pids", "run.router-b.pids"}, 30, "each host's PID file in the shared data dir")
            senders_b = [Sender(host_b, [files[:20], files[20:]], f"CT_B{n}")
                         for n, files in enumerate(ct_series(40, size_kib=64) for _ in range(2))]
            for sender in senders_b:
                sender.start()
            wait_until(lambda: any(s.acknowledged for s in senders_b), 120, "host B to acknowledge instances")
            # Killed while its worker holds claims: the worker is frozen (SIGSTOP) at a moment
            # it holds some, then the whole host goes (SIGKILL takes stopped processes too).
            worker = _forwarding_worker_of(host_a)

            def frozen_holding_claims() -> int:
                os.kill(worker, signal.SIGSTOP)
                if held := _claims_of(client, host_a.hostname):
                    return held
                os.kill(worker, signal.SIGCONT)
                return 0

            held = wait_until(frozen_holding_claims, 120, "host A's forwarding worker frozen holding claims")
            host_a.kill()
            for sender in senders_a + senders_b:
                sender.join(timeout=600)
                assert not sender.is_alive(), f"{sender.name} still sending after 600 s"

            acknowledged_a = set().union(*(s.acknowledged for s in senders_a))
            sent_a = sum(s.sent for s in senders_a)
            assert all(s.refused for s in senders_a), "a sender to host A never met its death"
            acknowledged_b = set().union(*(s.acknowledged for s in senders_b))
            refused_b = [line for s in senders_b for line in s.refused]
            assert not refused_b, f"the survivor refused {len(refused_b)} of 80 instances: {refused_b[:5]}"

            # The survivor still serves after the kill.
            late = Sender(host_b, [ct_series(20, size_kib=64)], "CT_B_LATE")
            late.run()
            assert not late.refused, f"the survivor refused after the kill: {late.refused[:5]}"

            wanted = acknowledged_a | acknowledged_b | late.acknowledged

            def delivered() -> set[str]:
                # By file name (storescp's MODALITY.UID): a copy sent twice (at least once)
                # may be being rewritten while it is looked at.
                return {path.name.split(".", 1)[1] for path in pacs.files()}

            try:
                wait_until(lambda: wanted <= delivered(), 240, "every acknowledged instance at the archive")
            except AssertionError:
                missing = wanted - delivered()
                raise AssertionError(
                    f"{len(missing)} of {len(wanted)} acknowledged instances never reached the archive "
                    f"(host A acknowledged {len(acknowledged_a)} of {sent_a} sent and held {held} claims when "
                    f"killed; host B {len(acknowledged_b)} + {len(late.acknowledged)}); spool: {_spool_left(spool)}"
                    f"\nhost B's log:\n{host_b.log_tail(40)}") from None
            wait_until(lambda: not any(_spool_left(spool).values()), 120, "the spool to empty")
            # What A claimed is given back once its workers' heartbeats expire (15 s), even what
            # A had delivered and removed from the spool before it died.
            wait_until(lambda: not _claims_of(client, host_a.hostname), 120, "host A's claims released")
            # Host B's reconciler released them, and logs it right after.
            wait_until(lambda: any(int(n) for n in re.findall(r"(\d+) released from dead workers",
                                                               host_b.log_text())), 30,
                       "host B's log saying it released host A's claims")

            # Host A comes back under its name and takes its share again.
            host_a.start()
            back = Sender(host_a, [ct_series(20, size_kib=64)], "CT_A_AGAIN")
            back.run()
            assert not back.refused, f"the host that came back refused: {back.refused[:5]}"
            wanted |= back.acknowledged
            wait_until(lambda: wanted <= delivered(), 120, "what the returning host acknowledged at the archive")
            wait_until(lambda: not any(_spool_left(spool).values()), 120, "the spool to empty again")
            print(f"host A acknowledged {len(acknowledged_a)} of {sent_a} sent before the kill and held {held} "
                  f"claims; host B {len(acknowledged_b)} + {len(late.acknowledged)}; {len(wanted)} delivered; "
                  f"the archive saw {pacs.store_request_count()} C-STOREs")


def test_a_killed_hosts_commitment_requests_are_reported_by_the_survivor(tmp_path, redis_url, storescp_factory,
                                                                         orthanc_factory, small_series):
    """Orthanc, as a modality, sends to host A and asks it for storage commitment
    (``delivered`` mode, the archive down: the report waits). Host A is killed
    whole; host B takes the request over once A's heartbeat is gone, and reports
    it on a new association once the archive has the instances."""
    spool = tmp_path / "shared-spool"
    pacs_port, port = free_port(), free_port()
    orthanc = orthanc_factory(ae_title="ORTHANC_MOD", modalities={"router": [ROUTER_AE, "127.0.0.2", port]})
    ids = [orthanc.post("/instances", f.read_bytes())["ID"] for f in small_series(3)]
    configs = {}
    for name, address in (("host-a", "127.0.0.2"), ("host-b", "127.0.0.3")):
        configs[name] = _host_config(tmp_path / name, spool, address, port, pacs_port, redis_url)
        configs[name]["router"]["commitment"] = {"mode": "delivered", "timeout_seconds": 600}
        configs[name]["modalities"] = {"ORTHANC_MOD": {"host": "127.0.0.1", "port": orthanc.dicom_port}}
        # Held while down, never a dead letter.
        configs[name]["destinations"]["pacs"]["retry"] = {"max_attempts": 1000, "backoff_seconds": [0.5, 1.0],
                                                         "jitter": 0.1}
    host_a = Host(tmp_path / "host-a", configs["host-a"], "router-a")
    host_b = Host(tmp_path / "host-b", configs["host-b"], "router-b")
    requests = spool / "commitments" / "requests"
    with host_a, host_b:
        answer = orthanc.post("/modalities/router/store", {"Resources": ids, "StorageCommitment": True})
        transaction = answer["StorageCommitmentTransactionUID"]
        wait_until(lambda: (requests / "router-a" / f"{transaction}.json").exists(), 30,
                   "host A's record of the request")
        host_a.kill()
        assert orthanc.rest(f"/storage-commitment/{transaction}")["Status"] == "Pending"
        wait_until(lambda: (requests / "router-b" / f"{transaction}.json").exists(), 90,
                   "host B to take the request over once A's heartbeat is gone")
        # The log line follows the rename at once.
        wait_until(lambda: "took over 1 request(s) of host router-a" in host_b.log_text(), 30,
                   "host B's log saying it took the request over")
        pacs = storescp_factory(ae_title="PACS", port=pacs_port)
        state = wait_until(lambda: (s := orthanc.rest(f"/storage-commitment/{transaction}"))["Status"] != "Pending"
                           and s, 120, "Orthanc's commitment report from host B")
        assert state["Status"] == "Success", state
        assert len(state["Success"]) == 3 and not state["Failures"], state
        assert len(pacs.wait_for_files(3)) == 3
        wait_until(lambda: not list(requests.rglob("*.json")), 30, "the request record removed")
