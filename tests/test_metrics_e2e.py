"""Prometheus metrics (router/metrics.py) of a real router process, parsed with
prometheus_client's own parser: the figures are exact, and a worker's restart
loses none of them (the counters live in Redis, not in a process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.kernel.spool import Spool
from router.metrics import exposition
from tests import data
from tests.peers import LOOPBACK, free_port, storescu, wait_for_port, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e


def _get(router: RouterProcess, path: str) -> str:
    """The body of ``path`` on the router's dashboard."""
    port = router.config["dashboard"]["port"]
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://{LOOPBACK}:{port}{path}", timeout=10).read().decode()


def _scrape(router: RouterProcess, redis_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the dashboard's ``/metrics``, by (name, sorted labels)."""
    text = _get(router, "/metrics")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_exactly_and_survive_a_worker_restart(tmp_path, redis_url, storescp_factory, small_series):
    """5 instances from one modality, a kill -9 of the forwarding worker, 3 from another:
    received per calling AE, forwarded per destination and the send histogram say exactly
    that; a destination that is down shows its queue, its oldest wait, that it is down and its
    refused connection as a failed send, which the dashboard's overview counts alike."""
    pacs = storescp_factory()
    down_port = free_port()
    config = router_config(tmp_path, {"pacs": destination(pacs.port), "down": destination(down_port, "DOWN")},
                           redis_url=redis_url)
    dashboard_port = free_port()
    config["dashboard"] = {"host": LOOPBACK, "port": dashboard_port}
    files = small_series(8)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        wait_for_port(LOOPBACK, dashboard_port, timeout=30, proc=router.proc)
        storescu(LOOPBACK, router.port, files[:5], called_ae=ROUTER_AE, calling_ae="CT_ONE", check=True)
        pacs.wait_for_files(5)
        wait_until(lambda: _scrape(router, redis_url)[
            ("dicom_router_instances_forwarded_total", (("destination", "pacs"),))] == 5, 30, "5 forwarded")
        worker = next(pid for pid, cmd in router.children().items() if "--queue pacs" in cmd)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: any("--queue pacs" in cmd and pid != worker for pid, cmd in router.children().items()),
                   30, "the forwarding worker restarted")
        storescu(LOOPBACK, router.port, files[5:], called_ae=ROUTER_AE, calling_ae="MR_TWO", check=True)
        pacs.wait_for_files(8)
        samples = wait_until(lambda: (s := _scrape(router, redis_url))[
            ("dicom_router_instances_forwarded_total", (("destination", "pacs"),))] == 8 and s, 30, "8 forwarded")
        assert samples[("dicom_router_instances_received_total", (("calling_ae", "CT_ONE"),))] == 5
        assert samples[("dicom_router_instances_received_total", (("calling_ae", "MR_TWO"),))] == 3
        assert samples[("dicom_router_instances_forwarded_total", (("destination", "down"),))] == 0
        assert samples[("dicom_router_send_duration_seconds_count", (("destination", "pacs"),))] == 8
        assert samples[("dicom_router_send_duration_seconds_bucket", (("destination", "pacs"), ("le", "+Inf")))] == 8
        assert samples[("dicom_router_queue_depth", (("queue", "pacs"),))] == 0
        assert samples[("dicom_router_queue_depth", (("queue", "down"),))] == 8
        assert samples[("dicom_router_queue_oldest_age_seconds", (("queue", "down"),))] > 0
        assert samples[("dicom_router_destination_up", (("destination", "down"),))] == 0
        assert samples[("dicom_router_destination_up", (("destination", "pacs"),))] == 1
        unreachable = samples[("dicom_router_instances_failed_total",
                               (("destination", "down"), ("status_class", "unreachable")))]
        assert unreachable >= 1
        failed = sum(value for (name, _), value in samples.items() if name == "dicom_router_instances_failed_total")
        overview = json.loads(_get(router, "/api/overview"))
        assert overview["totals"]["failed"] == failed and overview["unavailable"] == ["down"], overview
        assert samples[("dicom_router_rule_hits_total", (("rule", "everything everywhere"),))] == 8
        assert samples[("dicom_router_redis_up", ())] == 1
        assert samples[("dicom_router_spool_bytes", ())] > 0  # the 8 copies waiting for "down"
        assert ("dicom_router_associations_open", (("direction", "in"),)) in samples
        # The CLI finds each instance's journey by its SOP Instance UID.
        uid = data.sop_instance_uid(files[6])
        shown = subprocess.run([sys.executable, "-m", "router", "journey", "-c", str(router.config_path), uid, "--json"],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        (instance,) = json.loads(shown.stdout)
        steps = [(s["step"], s["destination"]) for s in instance["journey"]]
        assert steps == [("received", ""), ("routed", ""), ("sent", "pacs")]
        assert instance["journey"][0]["detail"].startswith("from MR_TWO@")
        table = subprocess.run([sys.executable, "-m", "router", "journey", "-c", str(router.config_path), uid],
                               capture_output=True, text=True, timeout=60)
        assert table.returncode == 0 and "0x0000 Success" in table.stdout and "routed" in table.stdout


def test_the_grafana_dashboard_asks_only_for_metrics_the_router_exposes(tmp_path, redis_conn):
    """Every metric name in deploy/grafana/dicom-router.json is one /metrics serves (a
    renamed metric would leave a panel silently empty)."""
    import json
    import re
    from pathlib import Path

    from router.kernel.settings import Config, Destination

    board = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "dicom-router.json").read_text())
    wanted = {name for panel in board["panels"] for target in panel["targets"]
              for name in re.findall(r"dicom_router_\w+", target["expr"])}
    config = Config(destinations={"pacs": Destination(ae_title="P", host="127.0.0.1", port=104,
                                                      storage_commitment=True)})
    served = set()
    for family in text_string_to_metric_families(exposition(config, redis_conn, Spool(tmp_path)).decode()):
        served.update(sample.name for sample in family.samples)
        served.add(family.name + ("_total" if family.type == "counter" else ""))  # families without samples yet
    assert wanted and wanted <= served, sorted(wanted - served)


def test_associations_open_counts_an_inbound_association_while_it_is_held(tmp_path, redis_url, storescp_factory):
    """A real pynetdicom peer holds an association to the ingest open:
    ``dicom_router_associations_open{direction="in"}`` reads 1, then 0 once it is
    released, and no other direction appears (the process name holds colons)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    pacs = storescp_factory()
    config = router_config(tmp_path, {"pacs": destination(pacs.port)}, redis_url=redis_url)
    dashboard_port = free_port()
    config["dashboard"] = {"host": LOOPBACK, "port": dashboard_port}
    open_in = ("dicom_router_associations_open", (("direction", "in"),))
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        wait_for_port(LOOPBACK, dashboard_port, timeout=30, proc=router.proc)
        ae = AE("HOLDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate(LOOPBACK, router.port, ae_title=ROUTER_AE)
        try:
            assert assoc.is_established
            samples = wait_until(lambda: (s := _scrape(router, redis_url)).get(open_in) == 1 and s, 60,
                                 "one association in")
        finally:
            assoc.release()
        directions = {dict(labels)["direction"] for name, labels in samples if name == open_in[0]}
        assert directions <= {"in", "out"}, directions
        wait_until(lambda: _scrape(router, redis_url).get(open_in) == 0, 60, "no association in")
