"""workers/probe.py: C-ECHO a held destination, against a real storescp and a closed port.

The real sender, the real Redis and a real spool: a probe of a destination
that is still down holds it one step further and tries no instance; a probe
that reaches it lifts the hold, and the drain after it delivers.
"""

from __future__ import annotations

import time

import pytest

from router.kernel import keys
from router.kernel.errors import DestinationUnavailable
from router.kernel.health import LAST_ECHO, LAST_OK, State, destination_health
from router.kernel.status import Status
from tests.peers import free_port, wait_until
from workers.forwarding import drain
from workers.maintenance import Maintenance
from workers.probe import checkup, echo, probe

DEST = "pacs"
NAME = keys.forward(DEST)
STEPS = [30, 60]  # s: the destination's back-off, far beyond any test


def config(port: int, **extra: object) -> dict:
    entry = {"ae_title": "PACS", "host": "127.0.0.1", "port": port, "connect_timeout": 2,
             "retry": {"max_attempts": 12, "backoff_seconds": STEPS, "jitter": 0}, **extra}
    return {"destinations": {DEST: entry}, "rules": [{"name": "all", "forward": [DEST]}]}


def hold_over(connection, failures: int = 1) -> None:
    """The destination held ``failures`` steps, its hold just over: a probe is due."""
    connection.hset(keys.hold(NAME), mapping={"failures": failures, "until": time.time() - 0.1})


def test_echo_of_a_real_storescp_is_answered_success(storescp_factory, make_runtime):
    """The sender's association carries a C-ECHO-RQ that DCMTK answers with Success."""
    pacs = storescp_factory(ae_title="PACS")
    runtime = make_runtime(config(pacs.port))

    answer = echo(DEST, runtime.config.destinations[DEST], "DICOM_ROUTER")

    assert answer.status == Status.SUCCESS
    wait_until(lambda: "Received Echo Request" in pacs.log_text(), 5, "storescp to log the C-ECHO")
    assert pacs.store_request_count() == 0


def test_echo_of_a_destination_refusing_associations_is_unavailable(storescp_factory, make_runtime):
    """A storescp that rejects every association makes the echo fail as the sender's C-STORE would."""
    pacs = storescp_factory(ae_title="PACS", extra_args=["--refuse"])
    runtime = make_runtime(config(pacs.port))

    with pytest.raises(DestinationUnavailable):
        echo(DEST, runtime.config.destinations[DEST], "DICOM_ROUTER")


def test_a_probe_of_a_destination_still_down_holds_it_one_step_further_and_tries_no_instance(
        make_runtime, queued, connection):
    """No listener: the probe fails, the hold grows to the next step, the echo and why it failed are recorded
    (apart from the last send error, which no probe writes), and every instance still waits untried and uncharged."""
    ids = queued(3)
    runtime = make_runtime(config(free_port()))
    hold_over(connection)
    before = time.time()

    assert probe(runtime, DEST) is False

    health = destination_health(connection, DEST)
    assert health.state is State.HELD and health.failures == 2
    assert health.held_until >= before + STEPS[1]
    assert health.last_echo_ok is False and health.last_echo >= before
    assert "cannot connect" in health.last_echo_error and health.last_error is None
    assert [i.decode() for i in connection.lrange(keys.pending(NAME), 0, -1)] == ids
    assert connection.hlen(keys.attempts(NAME)) == 0
    assert not connection.exists(keys.probe(NAME))


def test_a_destination_still_in_its_hold_or_being_probed_elsewhere_is_not_probed(
        storescp_factory, make_runtime, connection):
    """Before the hold is over, or while another process holds the probe lock, nothing connects."""
    pacs = storescp_factory(ae_title="PACS")
    runtime = make_runtime(config(pacs.port))
    connection.hset(keys.hold(NAME), mapping={"failures": 1, "until": time.time() + 30})

    assert probe(runtime, DEST) is None

    hold_over(connection)
    connection.set(keys.probe(NAME), b"another-worker", ex=10)
    assert probe(runtime, DEST) is None
    assert pacs.association_count() == 0
    assert destination_health(connection, DEST).state is State.HELD


def test_a_probe_that_reaches_the_destination_lifts_the_hold_and_the_drain_delivers(
        storescp_factory, make_runtime, queued, spool, connection):
    """storescp answers the C-ECHO: the hold is lifted (state up), the drain sends every instance and ends the hold."""
    pacs = storescp_factory(ae_title="PACS")
    queued(3)
    runtime = make_runtime(config(pacs.port))
    hold_over(connection, failures=2)

    assert probe(runtime, DEST) is True

    health = destination_health(connection, DEST)
    assert health.state is State.UP and health.held_until is None and health.last_echo_ok is True
    assert health.failures == 2  # kept until an instance is acknowledged
    assert pacs.store_request_count() == 0
    assert drain(runtime, DEST) == (3, False)
    runtime.close()
    assert len(pacs.wait_for_files(3, timeout=10)) == 3
    assert not connection.exists(keys.hold(NAME)) and spool.ids_in(spool.out_dir(DEST)) == []
    assert destination_health(connection, DEST).failures == 0


def test_the_maintenance_thread_probes_a_held_destination_and_wakes_its_backlog(
        storescp_factory, make_runtime, queued, connection):
    """A tick meeting a hold that is over probes it on a thread of its own and, once reached, kicks a drain job."""
    pacs = storescp_factory(ae_title="PACS")
    queued(2)
    runtime = make_runtime(config(pacs.port))
    hold_over(connection)
    maintenance = Maintenance(runtime, [NAME])

    maintenance.wake_if_due(NAME)

    wait_until(lambda: connection.exists(keys.kick(NAME)), 10, "a drain job for the backlog")
    assert destination_health(connection, DEST).state is State.UP
    assert "Received Echo Request" in pacs.log_text()


def test_an_idle_destination_is_echoed_each_interval_and_shown_down_then_up_again(
        storescp_factory, make_runtime, connection):
    """The periodic C-ECHO of a destination nothing is sent to: storescp answers (up);
    stopped, it is shown down with why, and not held (no instance is waiting on it);
    started again on its port, it is up at the next echo."""
    pacs = storescp_factory(ae_title="PACS")
    runtime = make_runtime(config(pacs.port, echo_interval_seconds=60))

    def interval_passed() -> None:
        """As if the last echo was an interval ago (no test waits a minute)."""
        connection.hset(keys.health(NAME), LAST_ECHO, time.time() - 61)

    assert destination_health(connection, DEST).state is State.UNKNOWN

    assert checkup(runtime, DEST) is True
    assert destination_health(connection, DEST).state is State.UP
    assert checkup(runtime, DEST) is None  # echoed within its interval: not due
    wait_until(lambda: "Received Echo Request" in pacs.log_text(), 5, "storescp to log the C-ECHO")

    pacs.stop()
    interval_passed()
    assert checkup(runtime, DEST) is False
    health = destination_health(connection, DEST)
    assert health.state is State.DOWN and health.last_echo_ok is False and health.held_until is None
    assert "cannot connect" in health.last_echo_error and health.last_error is None
    assert not connection.exists(keys.hold(NAME)) and not connection.exists(keys.probe(NAME))

    storescp_factory(ae_title="PACS", port=pacs.port)
    interval_passed()
    assert checkup(runtime, DEST) is True
    assert destination_health(connection, DEST).state is State.UP


def test_no_periodic_echo_while_held_acknowledging_or_switched_off(storescp_factory, make_runtime, connection):
    """A held destination is left to its probes, one that acknowledged an instance within the
    interval needs no echo, and ``echo_interval_seconds: 0`` switches the echo off."""
    pacs = storescp_factory(ae_title="PACS")
    runtime = make_runtime(config(pacs.port, echo_interval_seconds=30))
    connection.hset(keys.hold(NAME), mapping={"failures": 1, "until": time.time() + 30})
    assert checkup(runtime, DEST) is None
    connection.delete(keys.hold(NAME))
    connection.hset(keys.health(NAME), mapping={LAST_OK: time.time()})
    assert checkup(runtime, DEST) is None
    assert checkup(make_runtime(config(pacs.port, echo_interval_seconds=0)), DEST) is None
    assert pacs.association_count() == 0


def test_the_maintenance_thread_echoes_an_idle_destination_one_interval_after_it_started(
        storescp_factory, make_runtime, connection):
    """No association at the start of a worker; the first periodic echo one interval later."""
    pacs = storescp_factory(ae_title="PACS")
    # 5 s: the look 0.5 s in is well inside the interval, however loaded the machine.
    runtime = make_runtime(config(pacs.port, echo_interval_seconds=5))
    maintenance = Maintenance(runtime, [NAME])

    maintenance.wake_if_due(NAME)
    time.sleep(0.5)
    assert pacs.association_count() == 0 and destination_health(connection, DEST).state is State.UNKNOWN
    wait_until(lambda: maintenance.wake_if_due(NAME) or destination_health(connection, DEST).state is State.UP,
               20, "the periodic C-ECHO")
    assert "Received Echo Request" in pacs.log_text()
