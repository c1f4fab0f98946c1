"""Prometheus metrics (router/metrics.py) of a real router process, parsed with
prometheus_client's own parser: the figures are exact, and a worker's restart
loses none of them (the counters live in Redis, not in a process)."""

from __future__ import annotations

import os
import signal

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from router.kernel.settings import load_config
from router.kernel.spool import Spool
from router.metrics import exposition
from tests.peers import LOOPBACK, free_port, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e


def _scrape(router: RouterProcess, redis_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample, by (name, sorted labels)."""
    config = load_config(router.config_path)
    text = exposition(config, redis.Redis.from_url(redis_url), Spool(config.router.spool_dir)).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_exactly_and_survive_a_worker_restart(tmp_path, redis_url, storescp_factory, small_series):
    """5 instances from one modality, a kill -9 of the forwarding worker, 3 from another:
    received per calling AE, forwarded per destination and the send histogram say exactly
    that; a destination that is down shows its queue, its oldest wait and that it is down."""
    pacs = storescp_factory()
    down_port = free_port()
    config = router_config(tmp_path, {"pacs": destination(pacs.port), "down": destination(down_port, "DOWN")},
                           redis_url=redis_url)
    files = small_series(8)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
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
        assert samples[("dicom_router_rule_hits_total", (("rule", "everything everywhere"),))] == 8
        assert samples[("dicom_router_redis_up", ())] == 1
        assert samples[("dicom_router_spool_bytes", ())] > 0  # the 8 copies waiting for "down"
        assert ("dicom_router_associations_open", (("direction", "in"),)) in samples


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
