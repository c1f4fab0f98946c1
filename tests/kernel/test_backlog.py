"""router/kernel/backlog.py on a real Redis: claims, retries, give-backs and recovery."""

from __future__ import annotations

import time

import pytest

from router.kernel import keys
from router.kernel.backlog import Backlog

NAME = keys.forward("pacs")
ME = "host-1-aaaaaa"
OTHER = "host-2-bbbbbb"


@pytest.fixture
def backlog(connection) -> Backlog:
    return Backlog(connection, NAME)


def _inflight(connection, worker_id: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in connection.hgetall(keys.inflight(NAME, worker_id)).items()}


def _alive(connection, worker_id: str) -> None:
    connection.set(keys.alive(worker_id), b"1", ex=60)


def test_claim_takes_the_oldest_ids_first_and_records_them_as_this_workers(backlog, connection):
    """claim pops from the head of the pending list and records each id, with its claim time, under the worker."""
    backlog.push(["a", "b", "c", "d", "e"])
    before = time.time()
    assert backlog.claim(ME, 3) == ["a", "b", "c"]
    claims = _inflight(connection, ME)
    assert sorted(claims) == ["a", "b", "c"]
    assert all(before <= at <= time.time() for at in claims.values())
    assert backlog.peek(10) == ["d", "e"]
    assert backlog.claim(ME, 10) == ["d", "e"]
    assert backlog.claim(ME, 10) == []


def test_claim_brings_due_retries_into_line_behind_the_waiting_and_leaves_later_ones_delayed(backlog, connection):
    """A due delayed id joins the line behind the ids already pending; one not yet due stays delayed."""
    backlog.push(["p1", "p2"])
    connection.zadd(keys.delayed(NAME), {"due": time.time() - 1, "later": time.time() + 600})
    assert backlog.claim(ME, 2) == ["p1", "p2"]
    assert backlog.peek(10) == ["due"]  # moved into line by that claim, not yet taken
    assert backlog.claim(ME, 10) == ["due"]
    assert connection.zrange(keys.delayed(NAME), 0, -1) == [b"later"]


def test_claim_takes_a_due_retry_when_nothing_else_waits(backlog, connection):
    """With an empty pending list, a due retry is claimed at once, in one call."""
    connection.zadd(keys.delayed(NAME), {"due": time.time() - 1})
    assert backlog.claim(ME, 5) == ["due"]
    assert backlog.depth() == {"pending": 0, "delayed": 0, "inflight": 1}


def test_delay_schedules_a_claimed_id_and_next_due_says_when(backlog, connection):
    """delay moves a claimed id from flight to the delayed set; next_due says when; once due it is claimed."""
    assert backlog.next_due() is None
    backlog.push(["a", "b"])
    backlog.claim(ME, 2)
    before = time.time()
    backlog.delay(ME, "a", 600)
    backlog.delay(ME, "b", 0)
    assert sorted(_inflight(connection, ME)) == []
    assert before - 1 <= backlog.next_due() <= time.time()  # "b", due now, is the earliest
    assert backlog.claim(ME, 5) == ["b"]
    assert before + 600 <= backlog.next_due() <= time.time() + 600
    assert backlog.claim(ME, 5) == []


def test_give_back_returns_ids_to_the_head_in_their_order(backlog, connection):
    """Ids given back untried go before those still waiting, in the order they were claimed."""
    backlog.push(["a", "b", "c", "d", "e"])
    claimed = backlog.claim(ME, 3)
    backlog.give_back(ME, claimed)
    assert backlog.peek(10) == ["a", "b", "c", "d", "e"]
    assert _inflight(connection, ME) == {}


def test_count_attempt_counts_per_id(backlog):
    """count_attempt returns the running total of one id; others are untouched."""
    assert backlog.attempts("a") == 0
    assert backlog.count_attempt("a") == 1
    assert backlog.count_attempt("a") == 2
    assert backlog.count_attempt("b") == 1
    assert backlog.attempts("a") == 2


def test_ack_forgets_the_claim_and_the_attempts(backlog, connection):
    """An acknowledged id is gone from flight and its attempt count with it; other ids keep theirs."""
    backlog.push(["a", "b"])
    backlog.claim(ME, 2)
    backlog.count_attempt("a")
    backlog.count_attempt("b")
    backlog.ack(ME, ["a"])
    assert list(_inflight(connection, ME)) == ["b"]
    assert backlog.attempts("a") == 0
    assert backlog.attempts("b") == 1
    assert backlog.known() == {"b"}


def test_release_own_gives_back_this_workers_leftovers_only(backlog, connection):
    """release_own returns what this worker claimed, in order, and leaves another worker's claims alone."""
    backlog.push(["a", "b", "c", "d"])
    backlog.claim(ME, 2)
    backlog.claim(OTHER, 1)
    assert backlog.release_own(ME) == 2
    assert backlog.peek(10) == ["a", "b", "d"]
    assert list(_inflight(connection, OTHER)) == ["c"]


def test_release_abandoned_gives_back_the_claims_of_a_worker_whose_heartbeat_is_gone(backlog, connection):
    """A worker without an alive key has all its claims given back; a live worker keeps its fresh ones."""
    _alive(connection, OTHER)
    backlog.push(["a", "b", "c"])
    backlog.claim(ME, 2)  # ME has no heartbeat: dead
    backlog.claim(OTHER, 1)
    assert backlog.release_abandoned() == 2
    assert backlog.peek(10) == ["a", "b"]
    assert _inflight(connection, ME) == {}
    assert list(_inflight(connection, OTHER)) == ["c"]


def test_release_abandoned_takes_from_a_live_worker_only_claims_older_than_the_lease(backlog, connection):
    """A live worker's claim held longer than the lease is given back; its younger claims stay."""
    _alive(connection, OTHER)
    backlog.push(["old", "young"])
    backlog.claim(OTHER, 2)
    connection.hset(keys.inflight(NAME, OTHER), "old", time.time() - 120)
    assert backlog.release_abandoned(lease=60) == 1
    assert backlog.peek(10) == ["old"]
    assert list(_inflight(connection, OTHER)) == ["young"]


def test_depth_counts_pending_delayed_and_in_flight_of_every_worker(backlog, connection):
    """depth sums in-flight ids over all workers, besides pending and delayed."""
    assert backlog.depth() == {"pending": 0, "delayed": 0, "inflight": 0}
    backlog.push(["a", "b", "c", "d", "e"])
    backlog.claim(ME, 2)
    backlog.claim(OTHER, 1)
    backlog.delay(ME, "a", 600)
    assert backlog.depth() == {"pending": 2, "delayed": 1, "inflight": 2}


def test_known_is_every_id_in_every_state_of_this_backlog_only(backlog, connection):
    """known holds pending, delayed and in-flight ids of all workers, and nothing of another backlog."""
    backlog.push(["a", "b", "c", "d"])
    backlog.claim(ME, 1)
    backlog.claim(OTHER, 1)
    backlog.claim(ME, 1)
    backlog.delay(ME, "c", 600)
    Backlog(connection, keys.ROUTE).push(["elsewhere"])
    assert backlog.known() == {"a", "b", "c", "d"}


def test_wait_for_work_sees_pending_ids_and_due_retries_but_not_later_ones(backlog, connection):
    """wait_for_work is True for a pending id or a due retry, False for a retry still ahead."""
    connection.zadd(keys.delayed(NAME), {"later": time.time() + 600})
    assert backlog.wait_for_work(0) is False
    connection.zadd(keys.delayed(NAME), {"due": time.time() - 1})
    assert backlog.wait_for_work(0) is True
    connection.zrem(keys.delayed(NAME), "due")
    backlog.push(["a"])
    assert backlog.wait_for_work(0) is True
