"""Modalities' commitment requests on a spool that several hosts share: each host
reports its own, and the requests of a host whose heartbeat is gone are taken
over by exactly one live host (a real Redis; the spool on this disk).

The whole router, two hosts and a kill of one: tests/test_hosts_e2e.py."""

from __future__ import annotations

import threading
import time

import pytest

from router.kernel import keys
from router.kernel.commitment.from_modalities import (
    ModalityCommitments,
    Request,
    Requests,
)
from router.kernel.commitment.messages import Reference
from router.kernel.settings import RouterSettings
from router.kernel.spool import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"


def _request(n: int) -> Request:
    now = time.time()
    return Request(f"1.2.826.0.1.3680043.77.{n}", "CT_SCANNER", "127.0.0.1",
                   (Reference(CT, f"1.2.826.0.1.3680043.78.{n}"),), now, now + 3600)


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool")


def _service(spool: Spool, connection, host: str) -> ModalityCommitments:
    settings = RouterSettings(ae_title="DICOM_ROUTER", spool_dir=spool.root)
    return ModalityCommitments(settings, spool, connection, {}, host=host)


def test_a_gone_hosts_requests_are_taken_over_and_a_live_hosts_are_not(spool, redis_conn):
    """Host b takes host a's requests only once a's heartbeat is gone; a, which was
    only cut off, then drops what b took instead of reporting it twice."""
    host_a, host_b = _service(spool, redis_conn, "router-a"), _service(spool, redis_conn, "router-b")
    for n in range(3):
        request = _request(n)
        host_a.requests.save(request)
        host_a._pending[request.transaction_uid] = request
    host_a._keep_hosts(time.monotonic())  # its heartbeat
    host_b.step()
    assert not host_b._pending, "b took requests of a live host"
    assert len(list(host_a.requests.folder.glob("*.json"))) == 3

    redis_conn.delete(keys.host_alive("router-a"))
    host_b._next_adoption = 0.0
    host_b.step()
    assert sorted(host_b._pending) == sorted(_request(n).transaction_uid for n in range(3))
    assert len(list(host_b.requests.folder.glob("*.json"))) == 3
    assert not list(host_a.requests.folder.glob("*.json"))
    assert redis_conn.exists(keys.host_alive("router-b"))

    host_a.step()
    assert not host_a._pending, "a still holds requests b took over"
    assert [host for host, _ in host_b.requests.everyone()] == ["router-b"] * 3


def test_two_hosts_adopting_at_once_take_each_request_once(spool):
    """Requests of a gone host, adopted by two hosts at the same moment: each request
    ends in exactly one host's folder, and each host's list holds what it took."""
    gone = Requests(spool, "router-gone")
    for n in range(200):
        gone.save(_request(n))
    takers = [Requests(spool, "router-b"), Requests(spool, "router-c")]
    taken: dict[str, list[Request]] = {}
    start = threading.Barrier(2)

    def adopt(requests: Requests) -> None:
        start.wait()
        taken[requests.host] = requests.adopt("router-gone")

    threads = [threading.Thread(target=adopt, args=(r,)) for r in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    uids = [r.transaction_uid for found in taken.values() for r in found]
    assert len(uids) == 200 and len(set(uids)) == 200, f"{len(uids)} taken, {len(set(uids))} distinct"
    on_disk = {host: len(list((spool.root / "commitments" / "requests" / host).glob("*.json")))
               for host in ("router-b", "router-c", "router-gone")}
    assert on_disk == {"router-b": len(taken["router-b"]), "router-c": len(taken["router-c"]), "router-gone": 0}


def test_requests_an_earlier_version_kept_unsorted_become_this_hosts(spool):
    """A request file directly under commitments/requests (before folders per host) is
    loaded and moved into the loading host's folder; other hosts' folders are left alone."""
    root = spool.root / "commitments" / "requests"
    root.mkdir(parents=True, exist_ok=True)
    (root / "1.2.3.json").write_text(_request(1).to_json().replace(_request(1).transaction_uid, "1.2.3"))
    Requests(spool, "router-other").save(_request(2))
    mine = Requests(spool, "router-me")
    assert [r.transaction_uid for r in mine.load()] == ["1.2.3"]
    assert (mine.folder / "1.2.3.json").exists() and not (root / "1.2.3.json").exists()
    assert mine.other_hosts() == ["router-other"]
