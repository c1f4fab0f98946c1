"""router/kernel/history.py on a real Redis: each step is one command (a script),
and what it stores reads back as the record, the journey, the index and the recent steps."""

from __future__ import annotations

import pytest

from router.kernel import history, keys


def test_steps_written_in_a_pipeline_read_back_as_record_journey_index_and_recent(connection):
    pipe = connection.pipeline(transaction=False)
    history.received(pipe, "id1", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "CT@10.0.0.1", at=1000.25)
    history.routed(pipe, "id1", ["pacs", "research"], "rules: all -> pacs, research")
    history.sent(pipe, "id1", "pacs", 0, 0.012, awaiting_commitment=False)
    assert len(pipe.command_stack) == 3, "one command per step"
    pipe.execute()

    record = history.record(connection, "id1")
    assert (record.sop_instance_uid, record.sop_class_uid, record.received_at) == (
        "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", 1000.25)
    assert record.outcome == history.FORWARDED and record.routed_at is not None
    assert record.destinations == {"pacs": "delivered", "research": "waiting"}
    assert [(s.step, s.destination, s.status) for s in record.steps] == [
        ("received", "", None), ("routed", "", None), ("sent", "pacs", 0)]
    assert record.steps[0].detail == "from CT@10.0.0.1" and record.steps[0].at == 1000.25
    # The stored shape: one field per step named "step:<when>:<kind>:<destination>", the state beside it.
    fields = {k.decode() for k in connection.hkeys(keys.instance("id1"))}
    assert {f for f in fields if f.startswith("step:")} == {
        "step:1000.25:received:", f"step:{record.steps[1].at!r}:routed:", f"step:{record.steps[2].at!r}:sent:pacs"}
    assert {"sop", "class", "from", "received", "routed", "outcome", "dest:pacs", "dest:research"} <= fields
    assert 0 < connection.ttl(keys.instance("id1")) <= history.RETENTION
    # Found by its SOP Instance UID, with its receipt time as the score.
    assert history.find(connection, "1.2.3.4") == ["id1"]
    assert connection.zscore(keys.find("1.2.3.4"), "id1") == pytest.approx(1000.25)
    assert history.lookup(connection, "1.2.3.4").spool_id == "id1"
    assert [s.step for s in history.recent(connection, 10)] == ["sent", "routed", "received"]


def test_values_of_any_text_survive_the_script(connection):
    """A detail with quotes, a backslash, a pipe and non-ASCII text is stored as given."""
    detail = 'morph failed: "PatientName" \\ | é ~ {x}'
    history.dead(connection, "id2", "research", 0xA900, detail)
    steps = history.journey(connection, "id2")
    assert [(s.step, s.destination, s.status, s.detail) for s in steps] == [("dead", "research", 0xA900, detail)]
    assert history.record(connection, "id2").destinations == {"research": "dead"}


def test_a_blank_sop_instance_uid_is_not_indexed(connection):
    history.received(connection, "id3", "  ", "1.2.3", "X@1.2.3.4")
    assert history.record(connection, "id3").received_at is not None
    assert not connection.keys(keys.find("*"))


def test_steps_gathered_are_one_command_and_read_back_the_same(connection):
    """A batch's steps (history.Steps) go in one command, flushed before what must follow them."""
    steps = history.Steps(connection.pipeline(transaction=False))
    for n in range(3):
        history.received(steps, f"b{n}", f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.2", "CT@10.0.0.1", at=2000.0 + n)
        history.routed(steps, f"b{n}", ["pacs"], "rules: all -> pacs")
    steps.rpush("not-a-step", "x")  # any other command goes to the pipeline at once
    assert len(steps.pipe.command_stack) == 1 and len(steps.steps) == 6
    steps.flush()
    assert len(steps.pipe.command_stack) == 2 and not steps.steps
    steps.execute()
    for n in range(3):
        record = history.record(connection, f"b{n}")
        assert [s.step for s in record.steps] == ["received", "routed"]
        assert (record.sop_instance_uid, record.destinations) == (f"1.2.3.{n}", {"pacs": "waiting"})
        assert history.find(connection, f"1.2.3.{n}") == [f"b{n}"]


def test_histories_are_kept_as_long_as_the_config_says(connection):
    """``router.history_days`` (history.keep_for, set by every command as it loads its
    config): the history and its identifier index expire that long after the last step."""
    try:
        history.keep_for(600)
        history.received(connection, "id9", "1.2.3.9", "1.2.840.10008.5.1.4.1.1.2", "CT@10.0.0.1")
        history.index(connection, {"1.2.3.99": {"id9": 1.0}})
        assert 0 < connection.ttl(keys.instance("id9")) <= 600
        assert 0 < connection.ttl(keys.find("1.2.3.9")) <= 600
        assert 0 < connection.ttl(keys.find("1.2.3.99")) <= 600
    finally:
        history.keep_for(history.RETENTION)
    history.received(connection, "id10", "1.2.3.10", "1.2.840.10008.5.1.4.1.1.2", "CT@10.0.0.1")
    assert connection.ttl(keys.instance("id10")) > 600
