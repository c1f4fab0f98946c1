"""router/kernel/dispatch.py on a real Redis: one drain job per burst, and kicks
that a dead worker cannot strand."""

from __future__ import annotations

import time

from rq.utils import import_attribute

from router.kernel import keys
from router.kernel.dispatch import QUEUED, RUNNING
from workers import jobs
from workers.runtime import DRAIN_JOB

NAME = keys.forward("pacs")


def _jobs(dispatcher, name: str = NAME) -> list[tuple[str, tuple]]:
    return [(job.func_name, tuple(job.args)) for job in dispatcher.queue(name).get_jobs()]


def _queued_at(seconds_ago: float) -> bytes:
    return QUEUED + repr(time.time() - seconds_ago).encode()


def test_submit_pushes_and_queues_one_drain_job_while_the_kick_is_held(dispatcher, connection):
    """Submits in a burst append every id but queue a single drain job, whose kick is marked queued."""
    dispatcher.submit(keys.ROUTE, ["a", "b"])
    dispatcher.submit(keys.ROUTE, ["c"])
    dispatcher.submit(keys.ROUTE, ["d"])
    assert dispatcher.backlog(keys.ROUTE).peek(10) == ["a", "b", "c", "d"]
    assert _jobs(dispatcher, keys.ROUTE) == [(DRAIN_JOB, (keys.ROUTE, 0))]
    assert connection.get(keys.kick(keys.ROUTE)).startswith(QUEUED)


def test_kick_leaves_a_kick_held_by_a_live_worker(dispatcher, connection):
    """A kick held by a running job whose worker still beats is not taken: no second job."""
    connection.set(keys.alive("w-live"), b"1", ex=60)
    dispatcher.keep_kick(NAME, "w-live")
    dispatcher.kick(NAME)
    assert _jobs(dispatcher) == []
    assert connection.get(keys.kick(NAME)) == RUNNING + b"w-live"


def test_kick_takes_over_a_kick_held_by_a_dead_worker(dispatcher, connection):
    """A kick marked running by a worker whose alive key is gone is taken over and a drain job queued."""
    dispatcher.keep_kick(NAME, "w-dead")
    dispatcher.kick(NAME)
    assert _jobs(dispatcher) == [(DRAIN_JOB, (NAME, 0))]
    assert connection.get(keys.kick(NAME)).startswith(QUEUED)


def test_kick_takes_over_a_queued_kick_whose_job_left_the_queue_and_never_ran(dispatcher, connection):
    """A kick queued longer than LOST_AFTER ago, with its rq queue empty, was lost with its worker: taken over."""
    connection.set(keys.kick(NAME), _queued_at(60))
    dispatcher.kick(NAME)
    assert _jobs(dispatcher) == [(DRAIN_JOB, (NAME, 0))]
    assert float(connection.get(keys.kick(NAME))[len(QUEUED):]) > time.time() - 5


def test_kick_leaves_a_queued_kick_whose_job_still_waits_in_the_queue(dispatcher, connection):
    """However old the queued mark, a drain job still in the rq queue means the kick is not lost."""
    dispatcher.submit(NAME, ["a"])
    connection.set(keys.kick(NAME), _queued_at(60))
    dispatcher.kick(NAME)
    assert _jobs(dispatcher) == [(DRAIN_JOB, (NAME, 0))]


def test_kick_leaves_a_freshly_queued_kick_even_with_an_empty_queue(dispatcher, connection, monkeypatch):
    """Within LOST_AFTER of being queued, a kick whose job a worker just took is not taken over."""
    monkeypatch.setattr("router.kernel.dispatch.LOST_AFTER", 600.0)
    connection.set(keys.kick(NAME), _queued_at(60))
    dispatcher.kick(NAME)
    assert _jobs(dispatcher) == []


def test_kick_of_a_helper_slot_queues_a_job_for_that_slot(dispatcher, connection):
    """kick(name, slot) holds that slot's own key and queues a drain job naming the slot."""
    connection.set(keys.alive("w-lead"), b"1", ex=60)
    dispatcher.keep_kick(NAME, "w-lead", slot=0)
    dispatcher.kick(NAME, 1)
    assert _jobs(dispatcher) == [(DRAIN_JOB, (NAME, 1))]
    assert connection.get(keys.kick(NAME, 1)).startswith(QUEUED)
    assert connection.get(keys.kick(NAME)) == RUNNING + b"w-lead"


def test_release_kick_with_look_again_kicks_again_when_ids_wait(dispatcher, connection):
    """A job letting go while ids were pushed behind it queues a new drain job for them."""
    dispatcher.keep_kick(NAME, "w-1")
    dispatcher.backlog(NAME).push(["late"])
    dispatcher.release_kick(NAME, look_again=True)
    assert _jobs(dispatcher) == [(DRAIN_JOB, (NAME, 0))]
    assert connection.get(keys.kick(NAME)).startswith(QUEUED)


def test_release_kick_lets_go_without_a_job_when_nothing_waits_or_it_must_not_look(dispatcher, connection):
    """Nothing pending, or look_again=False (a held destination), leaves no kick and no job."""
    dispatcher.keep_kick(NAME, "w-1")
    dispatcher.release_kick(NAME, look_again=True)
    assert connection.get(keys.kick(NAME)) is None
    dispatcher.keep_kick(NAME, "w-1")
    dispatcher.backlog(NAME).push(["waiting"])
    dispatcher.release_kick(NAME, look_again=False)
    assert connection.get(keys.kick(NAME)) is None
    assert _jobs(dispatcher) == []


def test_the_drain_job_the_workers_name_is_the_one_rq_runs():
    """The path every dispatcher is given imports as the workers' drain job function."""
    assert import_attribute(DRAIN_JOB) is jobs.drain
