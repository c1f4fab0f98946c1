"""workers/routing.py ``drain``/``route_one`` on a real Redis and a real spool:
rules decide, the spool fans out, the forward backlogs are fed."""

from __future__ import annotations

import os

import pytest
from pydicom import dcmread

from router.kernel import history, keys
from router.kernel.status import Status
from workers.routing import drain, route_one

DESTINATIONS = {
    "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104},
    "research": {"ae_title": "RESEARCH", "host": "127.0.0.1", "port": 105},
}
UNMORPHABLE = [{"set": {"InstitutionName": "Research Site 1"}}, {"set": {"Rows": "{PatientID}"}}]
"""Rows is US: the template's text (PatientID "PID0001") cannot be one."""


def config(rules: list[dict], unrouted: object = "keep") -> dict:
    return {"destinations": DESTINATIONS, "rules": rules, "unrouted": unrouted}


@pytest.fixture
def received(incoming, dispatcher):
    """``received(n)``: spool ids of n instances in incoming/, submitted to the route backlog as the ingest does."""

    def make(n: int) -> list[str]:
        ids = incoming(n)
        dispatcher.submit(keys.ROUTE, ids)
        return ids

    return make


def pending(connection, name: str) -> list[str]:
    return [i.decode() for i in connection.lrange(keys.pending(name), 0, -1)]


def test_an_instance_two_rules_choose_is_linked_into_both_out_folders_and_queued_for_both(
        make_runtime, received, spool, connection):
    """Each matching rule's destination gets a hard link to the received file, the id in its backlog, a drain job."""
    runtime = make_runtime(config([
        {"name": "CT to archive", "when": {"Modality": "CT"}, "forward": ["archive"]},
        {"name": "scanner to research", "when": {"CallingAETitle": "CT_SCANNER_1"}, "forward": ["research"]},
    ]))
    ids = received(2)
    original = {i: spool.incoming_path(i).read_bytes() for i in ids}

    assert drain(runtime) == 2

    for spool_id in ids:
        archive, research = spool.out_path("archive", spool_id), spool.out_path("research", spool_id)
        assert os.path.samefile(archive, research) and archive.stat().st_nlink == 2
        assert archive.read_bytes() == original[spool_id]
        assert not spool.incoming_path(spool_id).exists()
    for destination in DESTINATIONS:
        assert pending(connection, keys.forward(destination)) == ids
        assert runtime.dispatcher.queue(keys.forward(destination)).count == 1
    assert runtime.dispatcher.backlog(keys.ROUTE).known() == set()


def test_a_morphing_rule_gives_its_destination_its_own_copy_and_the_other_the_received_bytes(
        make_runtime, incoming, spool):
    """A morph writes a separate file for its destination; the untouched destination keeps a link to the original."""
    runtime = make_runtime(config([
        {"name": "archive", "forward": ["archive"]},
        {"name": "research", "morph": [{"set": {"InstitutionName": "Research Site 1"}}], "forward": ["research"]},
    ]))
    [spool_id] = incoming(1)
    original = spool.incoming_path(spool_id).read_bytes()

    assert route_one(runtime, spool_id) == ["archive", "research"]

    archive, research = spool.out_path("archive", spool_id), spool.out_path("research", spool_id)
    assert archive.read_bytes() == original
    assert not os.path.samefile(archive, research)
    assert dcmread(research).InstitutionName == "Research Site 1"
    assert dcmread(archive).InstitutionName == "Test Hospital"


def test_unrouted_keep_quarantines_the_instance_with_its_reason(make_runtime, received, spool, connection):
    """No rule matching under unrouted: keep moves the instance to quarantine, reason recorded, nothing forwarded."""
    runtime = make_runtime(config([{"name": "MR only", "when": {"Modality": "MR"}, "forward": ["archive"]}]))
    [spool_id] = received(1)

    assert drain(runtime) == 1

    assert spool.quarantine_reasons() == [(spool_id, "unrouted: no rule matched")]
    assert (spool.quarantine_dir / f"{spool_id}.dcm").exists()
    assert not spool.incoming_path(spool_id).exists()
    assert spool.ids_in(spool.out_dir("archive")) == []
    assert connection.llen(keys.pending(keys.forward("archive"))) == 0


def test_unrouted_drop_drops_the_instance(make_runtime, received, spool, connection):
    """No rule matching under unrouted: drop deletes the instance: no quarantine, no out/ copy, no backlog entry."""
    runtime = make_runtime(config([{"name": "MR only", "when": {"Modality": "MR"}, "forward": ["archive"]}], "drop"))
    [spool_id] = received(1)

    assert drain(runtime) == 1

    assert not spool.incoming_path(spool_id).exists()
    assert spool.quarantine_reasons() == []
    assert spool.ids_in(spool.out_dir("archive")) == []
    assert connection.llen(keys.pending(keys.forward("archive"))) == 0


def test_a_morph_failing_for_one_destination_is_its_unmorphed_dead_letter_while_the_other_is_routed(
        make_runtime, received, spool, connection):
    """The failing destination gets an unmorphed dead letter (the received bytes, unqueued); the other its copy."""
    runtime = make_runtime(config([
        {"name": "archive", "forward": ["archive"]},
        {"name": "research copy", "morph": UNMORPHABLE, "forward": ["research"]},
    ]))
    [spool_id] = received(1)
    original = spool.incoming_path(spool_id).read_bytes()
    uid = dcmread(spool.incoming_path(spool_id)).SOPInstanceUID

    assert drain(runtime) == 1

    assert spool.out_path("archive", spool_id).read_bytes() == original
    assert pending(connection, keys.forward("archive")) == [spool_id]
    assert not spool.out_path("research", spool_id).exists()
    assert connection.llen(keys.pending(keys.forward("research"))) == 0
    [letter] = spool.dead_letters("research")
    assert letter.unmorphed and letter.spool_id == spool_id and letter.sop_instance_uid == uid
    assert letter.reason == "morph failed: 'PID0001' is not a valid US value"
    assert letter.path.read_bytes() == original
    assert spool.quarantine_reasons() == [] and not spool.incoming_path(spool_id).exists()


def test_an_unreadable_file_is_quarantined_with_the_reason(make_runtime, spool, received, dispatcher, connection):
    """A spool file that is not DICOM goes to quarantine as unreadable; the readable one beside it is routed."""
    runtime = make_runtime(config([{"name": "all", "forward": ["archive"]}]))
    broken = spool.receive(b"not a DICOM file at all")
    dispatcher.submit(keys.ROUTE, [broken])
    [fine] = received(1)

    assert drain(runtime) == 2

    [(spool_id, reason)] = spool.quarantine_reasons()
    assert spool_id == broken and reason.startswith("unreadable: ")
    assert pending(connection, keys.forward("archive")) == [fine]


def test_route_one_of_an_id_already_routed_does_nothing(make_runtime, incoming, spool):
    """A duplicate queue entry (after recovery) finds no incoming file and hands the instance to no one again."""
    runtime = make_runtime(config([{"name": "all", "forward": ["archive"]}]))
    [spool_id] = incoming(1)
    assert route_one(runtime, spool_id) == ["archive"]
    spool.remove_routed(spool_id)

    assert route_one(runtime, spool_id) == []
    assert spool.ids_in(spool.out_dir("archive")) == [spool_id]


def test_an_id_queued_twice_in_one_batch_is_routed_once(make_runtime, received, dispatcher, connection):
    """An operator's re-route and the reconciler may both queue one id (the rename keeps
    the file's old time, so the reconciler's grace does not cover it): one route, one
    "routed" step, one entry in the destination's backlog."""
    runtime = make_runtime(config([{"name": "all", "forward": ["archive"]}]))
    [spool_id] = received(1)
    dispatcher.backlog(keys.ROUTE).push([spool_id])

    assert drain(runtime) == 1

    assert pending(connection, keys.forward("archive")) == [spool_id]
    assert [s.step for s in history.journey(connection, spool_id)].count("routed") == 1
    assert runtime.dispatcher.backlog(keys.ROUTE).known() == set()


def test_a_delivery_made_the_instant_the_forward_backlog_is_told_is_not_undone_by_routing(
        make_runtime, received, connection, monkeypatch):
    """A forwarding worker may deliver as soon as an id is in its backlog. Routing records
    "routed, waiting" before it tells the backlog, so that worker's "delivered" stands
    (in commitment ``delivered`` mode a "waiting" left behind would be reported failed).

    No peer: the order is between two Redis writes, on a real Redis. The forwarding
    worker is stood in for by a wrapper that records "delivered" the instant the
    backlog is told, the worst case a real worker on a real wire can only sometimes hit."""
    runtime = make_runtime(config([{"name": "all", "forward": ["archive"]}]))
    ids = received(3)
    for n, spool_id in enumerate(ids):
        history.received(connection, spool_id, f"1.2.826.0.1.3680043.8.498.{n + 1}", "1.2.840.10008.5.1.4.1.1.2",
                        "CT_SCANNER_1@127.0.0.1")
    tell = runtime.dispatcher.submit_all

    def told_and_delivered_at_once(batches):
        tell(batches)
        for spool_id in batches[keys.forward("archive")]:
            history.sent(connection, spool_id, "archive", Status.SUCCESS, 0.01, awaiting_commitment=False)

    monkeypatch.setattr(runtime.dispatcher, "submit_all", told_and_delivered_at_once)

    assert drain(runtime) == 3

    for spool_id in ids:
        assert history.record(connection, spool_id).destinations == {"archive": history.Delivery.DELIVERED}
