"""Destination health end to end: a destination that is down is probed with C-ECHO, not with instances.

The router runs as real processes on the session's Redis; the destination
is a port nobody listens on, then a real DCMTK storescp started on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import redis
import yaml

from router.kernel import keys
from router.kernel.health import State, destination_health
from tests import data
from tests.peers import LOOPBACK, free_port, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

FAST_BACKOFF = {"max_attempts": 3, "backoff_seconds": [1, 2], "jitter": 0}


def _row(router: RouterProcess, destination: str) -> dict:
    """The destination's entry of `queues --json`."""
    listing = subprocess.run([sys.executable, "-m", "router", "queues", "-c", str(router.config_path), "--json"],
                             capture_output=True, text=True, check=True)
    return next(row for row in json.loads(listing.stdout)["destinations"] if row["name"] == destination)


def test_a_down_destination_is_probed_with_c_echo_and_gets_everything_once_a_probe_reaches_it(
        tmp_path, redis_url, storescp_factory, ct_series):
    """While the destination is down its instances wait untried and each back-off step ends in a C-ECHO;
    once storescp listens on its port, the next probe reaches it, the hold ends and every instance arrives;
    `queues` shows it held with the error, then up."""
    files = ct_series(5, size_kib=16)
    port = free_port()
    pacs_entry = destination(port, "PACS", retry=FAST_BACKOFF, connect_timeout=2)
    config = router_config(tmp_path, {"pacs": pacs_entry}, redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    try:
        with RouterProcess(tmp_path, config, log_level="INFO") as router:
            sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
            assert sent.stdout.count("Received Store Response (Success)") == len(files), sent.stdout[-2000:]

            # Held by the first drain, then two failed probes: 1 s, then 2 s steps.
            wait_until(lambda: destination_health(connection, "pacs").failures >= 3, 30, "two failed probes")
            # A probe counts its failure, then logs it.
            wait_until(lambda: router.log_text().count("probe pacs: pacs: cannot connect") >= 2, 10,
                       "the second probe's log line")
            health = destination_health(connection, "pacs")
            assert health.state is State.HELD and health.held_until is not None
            assert health.last_echo_ok is False and "cannot connect" in health.last_error
            log = router.log_text()
            # One drain met it down; every later try was a probe, no instance was claimed again or charged.
            assert log.count("forward pacs: pacs: cannot connect") == 1, log[-3000:]
            assert log.count("probe pacs: pacs: cannot connect") >= 2, log[-3000:]
            assert connection.hlen(keys.attempts(keys.forward("pacs"))) == 0
            assert len(list((router.spool / "out" / "pacs").glob("*.dcm"))) == len(files)
            row = _row(router, "pacs")
            assert row["state"] == "held" and "cannot connect" in row["last_error"], row

            pacs = storescp_factory(ae_title="PACS", port=port)
            received = pacs.wait_for_files(len(files), timeout=30)
            assert {data.sop_instance_uid(f) for f in received} == {data.sop_instance_uid(f) for f in files}
            scp_log = pacs.log_text()
            # The probe's association came first and carried only the C-ECHO.
            assert scp_log.index("Received Echo Request") < scp_log.index("Received Store Request")
            wait_until(lambda: not list((router.spool / "out" / "pacs").glob("*.dcm")), 30, "the spool to empty")
            # A batch's files leave the spool before its acknowledgement ends the hold.
            health = wait_until(lambda: (h := destination_health(connection, "pacs")).failures == 0 and h, 10,
                                "the hold ended")
            assert health.state is State.UP and health.last_echo_ok is True
            wait_until(lambda: "hold lifted" in router.log_text(), 10, "the probe's log line")
            row = _row(router, "pacs")
            assert row["state"] == "up" and row["held_until"] is None, row
    finally:
        connection.close()


def test_the_echo_command_c_echoes_over_the_senders_association_and_fails_on_a_closed_port(
        tmp_path, storescp_factory):
    """`dicom-router echo DEST` succeeds against storescp (which logs the C-ECHO),
    and exits 1 naming why when nobody listens."""
    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS"),
                                      "gone": destination(free_port(), "GONE", connect_timeout=2)})
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "router", "echo", "-c", str(path)]

    reached = subprocess.run([*cli, "pacs"], capture_output=True, text=True)
    gone = subprocess.run([*cli, "gone"], capture_output=True, text=True)

    assert reached.returncode == 0 and "pacs: C-ECHO success" in reached.stdout, reached.stderr
    wait_until(lambda: "Received Echo Request" in pacs.log_text(), 5, "storescp to log the C-ECHO")
    assert gone.returncode == 1 and "cannot connect" in gone.stderr, gone.stderr


def test_an_idle_destination_that_goes_away_is_shown_down_without_any_instance_sent(
        tmp_path, redis_url, storescp_factory):
    """Nothing is sent: the periodic C-ECHO alone shows the destination up, then down with
    why once its storescp is stopped (`queues` and the dashboard's /metrics), and up again
    once a storescp listens on its port."""
    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS", echo_interval_seconds=1,
                                                          connect_timeout=2)}, redis_url=redis_url)
    config["dashboard"] = {"host": LOOPBACK, "port": free_port()}
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        wait_until(lambda: _row(router, "pacs")["state"] == "up", 20, "the first periodic C-ECHO")
        assert _row(router, "pacs")["last_echo_ok"] is True
        pacs.stop()
        row = wait_until(lambda: (r := _row(router, "pacs"))["state"] == "down" and r, 20, "a C-ECHO that fails")
        # Refused, or reset by a storescp on its way out: either way its address and why.
        assert f"{LOOPBACK}:{pacs.port}" in row["last_echo_error"] and row["held_until"] is None, row
        assert row["last_error"] is None, row  # no instance was sent: no send error
        metrics = urllib.request.urlopen(f"http://{LOOPBACK}:{config['dashboard']['port']}/metrics", timeout=10)
        assert 'dicom_router_destination_up{destination="pacs"} 0.0' in metrics.read().decode()
        storescp_factory(ae_title="PACS", port=pacs.port)
        wait_until(lambda: _row(router, "pacs")["state"] == "up", 20, "a C-ECHO that reaches it again")
        assert "health pacs: pacs: " in router.log_text()
