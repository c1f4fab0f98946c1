"""Robust at the edge: crashed processes, hostile peers, configs that would fail later.

The router runs as real processes (``dicom-router run`` / ``ingest``); DCMTK
is the modality; a raw-socket peer (``tests/rawpeer.py``) plays the broken one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pydicom
import pytest
import yaml

from router.kernel.spool import HOST
from router.supervisor import start_time
from tests.peers import LOOPBACK, free_port, storescu, wait_for_port, wait_until
from tests.rawpeer import associate, store_pdus
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def test_a_partial_file_of_an_ingest_killed_mid_instance_goes_when_the_ingest_restarts(
    tmp_path, redis_url, ct_series
):
    """kill -9 of the ingest halfway through an instance leaves a partial file;
    the next ingest removes it at once (its writer is gone), not an hour later."""
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url)
    ingest = RouterProcess(tmp_path, config, "ingest", name="ingest1").start()
    pdus = store_pdus(ct_series(1, size_kib=512)[0])
    sock = associate(ingest.port, [(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)])
    sock.sendall(b"".join(pdus[: len(pdus) // 2]))
    tmp = ingest.spool / "tmp"
    wait_until(lambda: list(tmp.iterdir()), 10, "the partial file")
    ingest.kill()
    sock.close()
    assert len(list(tmp.iterdir())) == 1
    with RouterProcess(tmp_path, config, "ingest", name="ingest2"):
        wait_until(lambda: not list(tmp.iterdir()), 10, "the partial file to be swept")
        assert not list((ingest.spool / "incoming").iterdir())


def _ingest_pid(router: RouterProcess) -> int:
    return next(pid for pid, cmd in router.children().items() if " ingest " in cmd)


def _pid_alive(pid: int) -> bool:

    return start_time(pid) is not None


def test_run_stops_every_child_on_sigterm_without_killing_one(tmp_path, redis_url, redis_conn, storescp_factory,
                                                              ct_series):
    """After delivering to storescp, with every worker idle again (each has run jobs
    and holds its command channel), SIGTERM to `run` stops each child by itself: none
    is still there at the supervisor's grace to be killed (rq 3.0's command-channel
    thread with redis-py 8 held an idle worker up to 60 s)."""
    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url)
    router = RouterProcess(tmp_path, config, log_level="INFO").start()
    try:
        files = ct_series(3, size_kib=16)
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 3, router.log_tail()
        pacs.wait_for_files(3, timeout=30)

        def workers_idle() -> bool:
            names = redis_conn.smembers("rq:workers")
            states = [redis_conn.hget(name, "state") for name in names]
            return len(states) == 2 and all(state == b"idle" for state in states)

        wait_until(workers_idle, 60, "both workers idle, waiting for their next job")
    finally:
        router.stop(grace=60)
    log = router.log_text()
    assert "router.supervisor: stopped" in log, log[-2000:]
    assert "did not stop" not in log, log[-2000:]


def test_kill_9_of_run_takes_its_children_along_and_a_new_run_starts_cleanly(
    tmp_path, redis_url, storescp_factory, ct_series
):
    """kill -9 of `dicom-router run` alone (not its process group, as docker
    or a careless operator would) leaves no ingest or worker behind; the
    next run binds the same port and delivers."""


    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url,
                           port=free_port())
    first = RouterProcess(tmp_path, config, name="run1").start()
    try:
        # The supervisor's port is the ingest's: the workers may be a moment behind it.
        children = list(wait_until(lambda: len(found := first.children()) >= 3 and found, 10, "three children"))
        assert len(children) == 3
        os.kill(first.pid, signal.SIGKILL)
        # Each child gets SIGTERM (PR_SET_PDEATHSIG); a worker finishes the drain
        # pass it is in (workers/jobs.py BUDGET, 10 s at most) before it exits, and a
        # loaded machine (two suites at once) adds to that: 30 s is the bound.
        wait_until(lambda: not any(_pid_alive(pid) for pid in children), 30, "the children to die with run")
    finally:
        first.kill()
    with RouterProcess(tmp_path, config, name="run2") as second:
        files = ct_series(3, size_kib=16)
        sent = storescu(LOOPBACK, second.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 3, second.log_tail()
        pacs.wait_for_files(3, timeout=30)


def test_run_stops_what_an_earlier_run_left_running_before_it_binds(tmp_path, redis_url):
    """An ingest left running by an earlier run (recorded in run.HOSTNAME.pids) holds the
    port; the next run stops it first instead of failing "cannot listen"."""

    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url,
                           port=free_port(), data_dir=str(tmp_path / "data"))
    leftover = RouterProcess(tmp_path, config, "ingest", name="leftover").start()
    try:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"run.{HOST}.pids").write_text(f"{leftover.pid} {start_time(leftover.pid)}\n")
        with RouterProcess(tmp_path, config, name="run") as router:
            wait_until(lambda: "left running by an earlier run" in router.log_text(), 10, "the leftover to be named")
            wait_until(lambda: not leftover.running(), 10, "the leftover to stop")
            wait_until(lambda: "listening on" in router.log_text(), 30, "the new ingest to listen")
            assert "cannot listen" not in router.log_text()
    finally:
        leftover.kill()


def test_the_ingest_comes_back_at_once_while_workers_crash_loop_without_redis(
    tmp_path, redis_factory
):
    """Redis gone: the workers crash-loop with growing back-off, yet an ingest
    killed meanwhile is listening again within seconds, and SIGTERM then stops
    everything promptly with no child started after the stop."""


    redis_server = redis_factory()
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_server.url,
                           port=free_port())
    router = RouterProcess(tmp_path, config).start()
    try:
        redis_server.stop()
        wait_until(lambda: router.log_text().count("exited with") >= 4, 60, "the workers to crash-loop")
        os.kill(_ingest_pid(router), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: "started ingest" in router.log_text().rsplit("ingest exited", 1)[-1], 10,
              "the ingest to be restarted")
        wait_for_port(LOOPBACK, router.port, timeout=10)
        assert time.monotonic() - killed < 10  # a fresh interpreter's start on a busy machine; the workers wait longer
        stopping = time.monotonic()
        os.kill(router.pid, signal.SIGTERM)
        wait_until(lambda: not router.running(), 20, "run to stop")
        assert time.monotonic() - stopping < 10
        after_stop = router.log_text().split("stopping", 1)[1]
        assert "started " not in after_stop, after_stop
    finally:
        router.kill()


def test_run_on_one_machine_generates_the_secret_its_rules_need_once_and_keeps_it(
    tmp_path, storescp_factory, ct_series, monkeypatch
):
    """`run` with the embedded Redis, an anonymize rule and no secret configured
    generates one in its data directory (mode 0600), de-identifies with it, and
    finds the same one after a restart (pseudonyms stay stable)."""


    research = storescp_factory(ae_title="RESEARCH")
    config = router_config(
        tmp_path, {"research": destination(research.port, "RESEARCH")},
        rules=[{"name": "research copy", "morph": [{"anonymize": {"profile": "basic"}}], "forward": ["research"]}],
        data_dir=str(tmp_path / "data"),
    )
    secret_file = tmp_path / "data" / "deid-secret"
    monkeypatch.delenv("DICOM_ROUTER_SECRET", raising=False)
    with RouterProcess(tmp_path, config, name="run1") as router:
        files = ct_series(1, size_kib=8)
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert "Received Store Response (Success)" in sent.stdout
        received = pydicom.dcmread(research.wait_for_files(1, timeout=30)[0])
        assert received.PatientName != "Test^Patient"
        assert received.SOPInstanceUID != pydicom.dcmread(files[0]).SOPInstanceUID
    assert secret_file.stat().st_mode & 0o777 == 0o600
    first = secret_file.read_text()
    with RouterProcess(tmp_path, config, name="run2"):
        assert secret_file.read_text() == first


def test_a_hung_destination_is_detected_at_store_timeout_and_held_not_paid_per_instance(
    tmp_path, redis_url, storescp_factory, ct_series
):
    """A storescp that stops answering (it sleeps while it receives) is
    detected after store_timeout, not the 60 s DIMSE timeout, and held: the
    other instances are not each sent on a new association to wait again."""
    hung = storescp_factory(ae_title="HUNG", extra_args=["--sleep-during", "30"])
    pacs = destination(hung.port, "HUNG", store_timeout=1,
                       retry={"max_attempts": 12, "backoff_seconds": [60], "jitter": 0.0})
    config = router_config(tmp_path, {"hung": pacs}, redis_url=redis_url)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        
        files = ct_series(5, size_kib=8)
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == len(files)
        started = time.monotonic()
        wait_until(lambda: "holding the destination" in router.log_text(), 15, "the destination to be held")
        assert time.monotonic() - started < 12  # store_timeout 1 s, not the peer's 30 s sleep
        assert "no answer within 1 s" in router.log_text()
        time.sleep(2)
        assert hung.store_request_count() == 1  # held: the others wait, not one association each
        assert len(list((router.spool / "out" / "hung").glob("*.dcm"))) == len(files)
        assert not list((router.spool / "dead").rglob("*.dcm"))


class _OneAssociationSCP:
    """A storage SCP that takes one association at a time and refuses more with
    A-ASSOCIATE-RJ rejected-transient, local limit exceeded: pynetdicom's own
    limit (``maximum_associations``), a real implementation of that answer.

    It answers no C-STORE until it has refused an association (or ``patience``
    seconds have passed): on a busy machine the first association could
    otherwise carry everything before a helper even tries, proving nothing.
    """

    def __init__(self, patience: float = 20.0) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.stored: set[str] = set()
        self.refused = threading.Event()
        self.patience = patience
        self.ae = AE(ae_title="ONE")
        self.ae.maximum_associations = 1
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store),
                                                         (evt.EVT_REJECTED, lambda event: self.refused.set())])

    def _store(self, event) -> int:
        if not self.refused.wait(self.patience):
            self.patience = 0  # waited once in vain: the test fails on "no helper tried", promptly
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def test_a_destination_taking_fewer_associations_than_max_associations_is_not_held(
    tmp_path, redis_url, small_series
):
    """max_associations: 3 toward a peer that takes one association: the helper
    associations it refuses step aside for a while, the first carries on, and
    the destination is never held.

    The peer answers nothing until it has refused a helper. The whole series
    is received and routed before the three forwarding workers start, so that
    the backlog is deep (helpers are called in only then) however slow the
    machine is."""

    peer = _OneAssociationSCP()
    try:
        pacs = destination(peer.port, "ONE", max_associations=3,
                           retry={"max_attempts": 12, "backoff_seconds": [60], "jitter": 0.0})
        config = router_config(tmp_path, {"one": pacs}, redis_url=redis_url)
        files = small_series(300)
        with RouterProcess(tmp_path, config, command="ingest", name="ingest") as ingest, \
                RouterProcess(tmp_path, config, command="worker", args=["--queue", "route"], name="route"):
            sent = storescu(LOOPBACK, ingest.port, files, called_ae=ROUTER_AE)
            assert sent.stdout.count("Received Store Response (Success)") == len(files)
            out = ingest.spool / "out" / "one"
            wait_until(lambda: out.is_dir() and len(list(out.glob("*.dcm"))) == len(files), 60, "the series routed")
            workers = [RouterProcess(tmp_path, config, command="worker", args=["--queue", "one"], name=f"one{n}",
                                     log_level="INFO") for n in range(3)]
            try:
                for worker in workers:
                    worker.start()
                wait_until(lambda: len(peer.stored) == len(files), 60, "every instance at the peer")
            finally:
                for worker in workers:
                    worker.stop()
            log = "".join(worker.log_text() for worker in workers)
            assert "refused for now" in log, "no helper association was tried: nothing proven"
            assert "holding" not in log
    finally:
        peer.stop()


def test_a_morph_failing_for_one_destination_is_its_dead_letter_and_the_others_go_on(
    tmp_path, redis_url, storescp_factory, ct_series
):
    """A morph that fails for one destination makes the instance that
    destination's dead letter — marked unmorphed, not quarantined — while the
    other destination receives it at once; once the rule is mended, `retry`
    morphs it again and never sends the instance as it was received."""


    archive = storescp_factory(ae_title="ARCHIVE")
    research = storescp_factory(ae_title="RESEARCH")
    broken = [{"set": {"InstitutionName": "Research Site 1"}}, {"set": {"Rows": "{PatientID}"}}]
    rules = [
        {"name": "archive", "forward": ["archive"]},
        {"name": "research copy", "morph": broken, "forward": ["research"]},
    ]
    config = router_config(tmp_path, {"archive": destination(archive.port, "ARCHIVE"),
                                      "research": destination(research.port, "RESEARCH")},
                           rules=rules, redis_url=redis_url)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        files = ct_series(2, size_kib=8)
        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 2
        archive.wait_for_files(2, timeout=30)
        dead = wait_until(lambda: len(letters := list((router.spool / "dead" / "research").glob("*.json"))) == 2
                     and letters, 30, "two dead letters for research")
        for record in map(json.loads, (p.read_text() for p in dead)):
            assert record["unmorphed"] and record["reason"].startswith("morph failed")
        assert not list((router.spool / "quarantine").iterdir())
        assert "quarantined" not in router.log_text()
        assert research.files() == []

        mended = yaml.safe_load(router.config_path.read_text())
        mended["rules"][1]["morph"] = broken[:1]
        router.config_path.write_text(yaml.safe_dump(mended))
        retried = subprocess.run([sys.executable, "-m", "router", "retry", "-c", str(router.config_path), "research"],
                                 capture_output=True, text=True, timeout=60)
        assert retried.returncode == 0, retried.stderr
        assert "re-queued 2" in retried.stdout
        for path in research.wait_for_files(2, timeout=30):
            assert pydicom.dcmread(path).InstitutionName == "Research Site 1"
