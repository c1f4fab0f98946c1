"""workers/reconcile.py on a real Redis and a real spool: the spool is the
truth, and Redis is made to agree with it again."""

from __future__ import annotations

import logging

from router.kernel import keys
from workers.reconcile import reconcile


def _routed_to(spool, ids: list[str], *destinations: str) -> None:
    """Route ``ids`` by hand as the routing worker does: links into out/, incoming dropped."""
    for spool_id in ids:
        for destination in destinations:
            spool.assign(spool_id, destination)
        spool.remove_routed(spool_id)


def _pending(connection, name: str) -> list[str]:
    return [i.decode() for i in connection.lrange(keys.pending(name), 0, -1)]


def test_reconcile_queues_again_what_the_spool_holds_after_redis_forgot_it(spool, dispatcher, connection, incoming):
    """After a FLUSHDB, every file in incoming/ and out/DEST/ is pushed to its backlog again, and a drain job queued."""
    waiting = incoming(2)
    both, archive_only = incoming(2), incoming(1)
    _routed_to(spool, both, "pacs", "archive")
    _routed_to(spool, archive_only, "archive")
    dispatcher.submit(keys.ROUTE, waiting)
    dispatcher.submit(keys.forward("pacs"), both)
    dispatcher.submit(keys.forward("archive"), both + archive_only)
    connection.flushdb()

    requeued = reconcile(spool, dispatcher, ["pacs", "archive"], grace=0)

    assert requeued == {keys.ROUTE: 2, keys.forward("pacs"): 2, keys.forward("archive"): 3}
    assert _pending(connection, keys.ROUTE) == sorted(waiting)
    assert _pending(connection, keys.forward("pacs")) == sorted(both)
    assert _pending(connection, keys.forward("archive")) == sorted(both + archive_only)
    for name in requeued:
        assert dispatcher.queue(name).count == 1, name


def test_reconcile_does_not_queue_twice_what_redis_knows_in_any_state(spool, dispatcher, connection, incoming):
    """Ids pending, delayed or claimed by a live worker are known: nothing is pushed, nothing kicked."""
    ids = incoming(3)
    _routed_to(spool, ids, "pacs")
    name = keys.forward("pacs")
    backlog = dispatcher.backlog(name)
    backlog.push(ids)
    connection.set(keys.alive("w-live"), b"1", ex=60)
    backlog.claim("w-live", 2)
    backlog.delay("w-live", ids[1], 600)

    assert reconcile(spool, dispatcher, ["pacs"], grace=0) == {}
    assert backlog.depth() == {"pending": 1, "delayed": 1, "inflight": 1}
    assert dispatcher.queue(name).count == 0


def test_reconcile_queues_only_the_files_redis_lost(spool, dispatcher, connection, incoming):
    """With some ids known and some lost, only the lost ones are pushed, behind the known."""
    known, lost = incoming(2), incoming(2)
    dispatcher.backlog(keys.ROUTE).push(known)

    assert reconcile(spool, dispatcher, [], grace=0) == {keys.ROUTE: 2}
    assert _pending(connection, keys.ROUTE) == known + lost


def test_reconcile_gives_back_the_claims_of_a_dead_worker(spool, dispatcher, connection, incoming):
    """Ids a worker without a heartbeat claimed go back to pending once, counted as released, not pushed twice."""
    ids = incoming(2)
    dispatcher.backlog(keys.ROUTE).push(ids)
    dispatcher.backlog(keys.ROUTE).claim("w-dead", 2)

    assert reconcile(spool, dispatcher, [], grace=0) == {keys.ROUTE: 2}
    assert _pending(connection, keys.ROUTE) == ids
    assert dispatcher.queue(keys.ROUTE).count == 1


def test_reconcile_leaves_files_younger_than_the_grace_to_their_writer(spool, dispatcher, connection, incoming):
    """A file just written may be waiting for its own push: within the grace it is not queued."""
    incoming(2)
    assert reconcile(spool, dispatcher, [], grace=60) == {}
    assert connection.llen(keys.pending(keys.ROUTE)) == 0


def test_reconcile_leaves_the_files_of_a_destination_no_longer_configured(spool, dispatcher, connection, incoming,
                                                                           caplog):
    """out/ files of a destination the config dropped stay on disk, unqueued, with a warning."""
    ids = incoming(2)
    _routed_to(spool, ids, "gone")
    with caplog.at_level(logging.WARNING, logger="workers.reconcile"):
        assert reconcile(spool, dispatcher, ["pacs"], grace=0) == {}
    assert "2 instances wait for gone, which is no longer configured" in caplog.text
    assert connection.llen(keys.pending(keys.forward("gone"))) == 0
    assert spool.ids_in(spool.out_dir("gone")) == sorted(ids)


def test_reconcile_records_receipts_redis_never_heard_of(spool, dispatcher, connection, incoming):
    """Instances the ingest made durable while Redis was unreachable get their receipt
    recorded and counted from their file meta, so a commitment request for them is
    answered truly; a record that exists is left as it is, and nothing is counted twice."""
    from pydicom.filereader import read_file_meta_info

    from router.kernel import history, telemetry

    lost = incoming(2)
    known = incoming(1)
    history.received(connection, known[0], "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "CT_X@10.0.0.1")
    reconcile(spool, dispatcher, [], grace=0)
    reconcile(spool, dispatcher, [], grace=0)

    uid = str(read_file_meta_info(spool.incoming_path(lost[0])).MediaStorageSOPInstanceUID)
    record = history.lookup(connection, uid)
    assert record is not None and record.spool_id == lost[0]
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert history.record(connection, known[0]).sop_instance_uid == "1.2.3.4"  # left as it was
    counted = telemetry.counters(connection, []).received
    assert counted == {"CT_SCANNER_1": 2}
    assert [s.step for s in history.journey(connection, lost[1])] == ["received"]
