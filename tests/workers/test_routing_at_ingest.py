"""workers/routing_at_ingest.py in an ingest SCP in this process, a real storescu
sending, a real Redis: what the ingest routes itself, and what it leaves to the
routing worker."""

from __future__ import annotations

import pydicom
import pytest

from router.ingest.server import IngestServer
from router.kernel import history, keys
from router.kernel.dispatch import Dispatcher
from router.kernel.settings import Config
from router.kernel.spool import Spool
from tests.peers import LOOPBACK, storescu, wait_until
from tests.router_proc import ROUTER_AE, destination, router_config
from workers.routing_at_ingest import RoutingAtIngest
from workers.runtime import DRAIN_JOB, Runtime, redis_client


@pytest.fixture
def ingest_routing(tmp_path, redis_url, monkeypatch):
    """An ingest SCP that routes at ingest, with rules: CT to pacs and archive untouched,
    MR to research de-identified; every one stopped after the test."""
    monkeypatch.setenv("DICOM_ROUTER_SECRET", "0123456789abcdef0123456789abcdef")
    raw = router_config(tmp_path, {"pacs": destination(1, "PACS"), "archive": destination(2, "ARCHIVE"),
                                   "research": destination(3, "RESEARCH")}, redis_url=redis_url,
                        rules=[{"name": "CT everywhere", "when": {"Modality": "CT"}, "forward": ["pacs", "archive"]},
                               {"name": "MR to research", "when": {"Modality": "MR"}, "forward": ["research"],
                                "morph": [{"anonymize": {"profile": "basic"}}]}])
    raw["router"].update(port=0, min_free_bytes=0)
    raw["deid"] = {"secret_env": "DICOM_ROUTER_SECRET"}
    config = Config.model_validate(raw)
    spool = Spool(config.router.spool_dir, 0)
    dispatcher = Dispatcher(redis_client(redis_url), DRAIN_JOB)
    routing = RoutingAtIngest(Runtime.build(config, redis_url))
    server = IngestServer(config.router, spool, dispatcher, None, routing)
    server.start()
    yield server
    server.stop()


def _ids(connection, backlog: str) -> list[str]:
    return [i.decode() for i in connection.lrange(keys.pending(backlog), 0, -1)]


def test_untouched_deliveries_go_straight_to_out_and_morphs_to_the_routing_worker(
        ingest_routing, connection, ct_series, tmp_path):
    ct = ct_series(3, size_kib=16)
    mr = tmp_path / "mr.dcm"
    ds = pydicom.dcmread(ct[0])
    ds.Modality, ds.SOPInstanceUID = "MR", pydicom.uid.generate_uid()
    ds.save_as(mr, enforce_file_format=True)
    assert storescu(LOOPBACK, ingest_routing.port, [*ct, mr], called_ae=ROUTER_AE).returncode == 0
    spool = ingest_routing.spool

    wait_until(lambda: len(_ids(connection, keys.forward("pacs"))) == 3 and _ids(connection, keys.ROUTE), 20,
               "the batch announced")
    routed = _ids(connection, keys.forward("pacs"))
    assert _ids(connection, keys.forward("archive")) == routed and not _ids(connection, keys.forward("research"))
    for spool_id in routed:  # in both folders before the answer, never in incoming/
        assert spool.out_path("pacs", spool_id).exists() and spool.out_path("archive", spool_id).exists()
        record = history.record(connection, spool_id)
        assert [s.step for s in record.steps] == ["received", "routed"]
        assert record.destinations == {"pacs": "waiting", "archive": "waiting"}
        assert history.find(connection, str(ds.StudyInstanceUID)).count(spool_id) == 1
    (left,) = _ids(connection, keys.ROUTE)  # the morph is the routing worker's
    assert spool.incoming_path(left).exists() and not spool.out_path("research", left).exists()
    assert [s.step for s in history.record(connection, left).steps] == ["received"]
    assert history.lookup(connection, str(ds.SOPInstanceUID)).spool_id == left  # the MR's receipt
