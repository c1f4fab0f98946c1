"""Robust at the edge: crashed processes, hostile peers, configs that would fail later.

The router runs as real processes (``dicom-router run`` / ``ingest``); DCMTK
is the modality; a raw-socket peer (``tests/rawpeer.py``) plays the broken one.
"""

from __future__ import annotations

import time

import pytest

from tests.peers import free_port
from tests.rawpeer import associate, store_pdus
from tests.router_proc import RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return found


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
    _wait(lambda: list(tmp.iterdir()), 10, "the partial file")
    ingest.kill()
    sock.close()
    assert len(list(tmp.iterdir())) == 1
    with RouterProcess(tmp_path, config, "ingest", name="ingest2"):
        _wait(lambda: not list(tmp.iterdir()), 10, "the partial file to be swept")
        assert not list((ingest.spool / "incoming").iterdir())


def _ingest_pid(router: RouterProcess) -> int:
    return next(pid for pid, cmd in router.children().items() if " ingest " in cmd)


def _pid_alive(pid: int) -> bool:
    from router.supervisor import start_time

    return start_time(pid) is not None


def test_kill_9_of_run_takes_its_children_along_and_a_new_run_starts_cleanly(
    tmp_path, redis_url, storescp_factory, ct_series
):
    """kill -9 of `dicom-router run` alone (not its process group, as docker
    or a careless operator would) leaves no ingest or worker behind; the
    next run binds the same port and delivers."""
    import os
    import signal

    from tests.peers import LOOPBACK, storescu
    from tests.router_proc import ROUTER_AE

    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")}, redis_url=redis_url,
                           port=free_port())
    first = RouterProcess(tmp_path, config, name="run1").start()
    try:
        children = list(first.children())
        assert len(children) == 3
        os.kill(first.pid, signal.SIGKILL)
        _wait(lambda: not any(_pid_alive(pid) for pid in children), 10, "the children to die with run")
    finally:
        first.kill()
    with RouterProcess(tmp_path, config, name="run2") as second:
        files = ct_series(3, size_kib=16)
        sent = storescu(LOOPBACK, second.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == 3, second.log_tail()
        pacs.wait_for_files(3, timeout=30)


def test_run_stops_what_an_earlier_run_left_running_before_it_binds(tmp_path, redis_url):
    """An ingest left running by an earlier run (recorded in run.pids) holds the
    port; the next run stops it first instead of failing "cannot listen"."""
    from router.supervisor import start_time

    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url,
                           port=free_port(), data_dir=str(tmp_path / "data"))
    leftover = RouterProcess(tmp_path, config, "ingest", name="leftover").start()
    try:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "run.pids").write_text(f"{leftover.pid} {start_time(leftover.pid)}\n")
        with RouterProcess(tmp_path, config, name="run") as router:
            _wait(lambda: "left running by an earlier run" in router.log_text(), 10, "the leftover to be named")
            _wait(lambda: not leftover.running(), 10, "the leftover to stop")
            _wait(lambda: "listening on" in router.log_text(), 30, "the new ingest to listen")
            assert "cannot listen" not in router.log_text()
    finally:
        leftover.kill()


def test_the_ingest_comes_back_at_once_while_workers_crash_loop_without_redis(
    tmp_path, redis_factory
):
    """Redis gone: the workers crash-loop with growing back-off, yet an ingest
    killed meanwhile is listening again within seconds, and SIGTERM then stops
    everything promptly with no child started after the stop."""
    import os
    import signal

    from tests.peers import LOOPBACK, wait_for_port

    redis_server = redis_factory()
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_server.url,
                           port=free_port())
    router = RouterProcess(tmp_path, config).start()
    try:
        redis_server.stop()
        _wait(lambda: router.log_text().count("exited with") >= 4, 60, "the workers to crash-loop")
        os.kill(_ingest_pid(router), signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: "started ingest" in router.log_text().rsplit("ingest exited", 1)[-1], 10,
              "the ingest to be restarted")
        wait_for_port(LOOPBACK, router.port, timeout=10)
        assert time.monotonic() - killed < 5
        stopping = time.monotonic()
        os.kill(router.pid, signal.SIGTERM)
        _wait(lambda: not router.running(), 20, "run to stop")
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
    import pydicom

    from tests.peers import LOOPBACK, storescu
    from tests.router_proc import ROUTER_AE

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
