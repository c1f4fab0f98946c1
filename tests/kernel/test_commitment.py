"""Storage commitment messages (router/kernel/commitment/messages.py) and the transaction records
the router keeps for destinations (router/kernel/commitment/to_destinations.py), on a real spool and Redis."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from router.cli import queues
from router.kernel import history, keys
from router.kernel.commitment.messages import (
    MAX_REFERENCES,
    NO_SUCH_OBJECT_INSTANCE,
    Reference,
    Report,
    decode_report,
    decode_request,
    encode_report,
    encode_request,
)
from router.kernel.commitment.to_destinations import Transactions, apply_report
from router.kernel.dispatch import Dispatcher
from router.kernel.spool import Spool
from workers.runtime import DRAIN_JOB

CT = "1.2.840.10008.5.1.4.1.1.2"
REFS = [Reference(CT, f"1.2.3.{n}") for n in range(3)]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_request_and_report_round_trip_in_both_syntaxes(syntax):
    """What the router encodes, it (and so a peer following PS3.4 J.3) reads back the same."""
    assert decode_request(encode_request("2.25.1", REFS, syntax), syntax) == ("2.25.1", REFS)
    report = Report("2.25.1", REFS[:2], [(REFS[2], NO_SUCH_OBJECT_INSTANCE)])
    assert decode_report(encode_report(report, syntax), syntax) == report
    assert report.event_type == 2 and Report("2.25.1", REFS, []).event_type == 1
    # What the ingest accepts (leading zeros, 64 hex characters), the codec accepts too.
    odd = [Reference(CT, "1.2.840.0123.04"), Reference(CT, "dccc9599" * 8)]
    assert decode_request(encode_request("2.25.01", odd, syntax), syntax) == ("2.25.01", odd)


def test_unreadable_or_oversized_messages_are_refused_with_a_reason():
    """Garbage, a syntax not used for commitment, or more references than any real request
    carries are ValueErrors (the caller answers a failure), never a crash."""
    for garbage in (b"\xff\xff\xff", b"\x08\x00\x95\x11", b"\x08\x00\x95\x11\x04\x00\x00\x001.2\x01"):
        with pytest.raises(ValueError):
            decode_report(garbage, ImplicitVRLittleEndian)
    with pytest.raises(ValueError, match="transfer syntax"):
        decode_report(encode_report(Report("2.25.1", REFS, []), ImplicitVRLittleEndian), "1.2.840.10008.1.2.2")
    for bad in ("../../etc/x", "1.2\\3", "1.2\x013", "1" * 65, ""):
        with pytest.raises(ValueError, match="UID"):
            decode_request(encode_request("2.25.1", [Reference(CT, bad)], ExplicitVRLittleEndian),
                           ExplicitVRLittleEndian)
    many = [Reference(CT, f"1.2.{n}") for n in range(MAX_REFERENCES + 1)]
    with pytest.raises(ValueError, match="references"):
        decode_request(encode_request("2.25.1", many, ExplicitVRLittleEndian), ExplicitVRLittleEndian)


def _stored(spool: Spool, destination: str, n: int) -> list[tuple[str, Reference]]:
    """``n`` instances stored at ``destination`` and waiting for commitment."""
    refs = []
    for index in range(n):
        spool_id = spool.receive(b"instance %d" % index)
        spool.assign(spool_id, destination)
        spool.remove_routed(spool_id)
        spool.move_to_awaiting_commitment(destination, spool_id)
        refs.append((spool_id, Reference(CT, f"1.2.3.{index}")))
    return refs


def test_a_report_lets_committed_copies_go_and_sends_the_failed_again(tmp_path, redis_conn):
    """Committed: the spool copy is deleted. Failed, or not mentioned: back in out/ and in
    the destination's backlog. The transaction record is gone either way."""
    spool = Spool(tmp_path)
    book = Transactions(spool)
    refs = _stored(spool, "pacs", 3)
    tx = book.open("pacs", refs, timeout=60)
    assert book.find(tx.uid, ["other", "pacs"]) == tx
    report = Report(tx.uid, [refs[0][1]], [(refs[1][1], NO_SUCH_OBJECT_INSTANCE)])  # refs[2] not mentioned
    settled = apply_report(book, Dispatcher(redis_conn, DRAIN_JOB), ["pacs"], report)
    assert settled.committed == [refs[0][0]]
    assert settled.failed == [(refs[1][0], NO_SUCH_OBJECT_INSTANCE), (refs[2][0], 0)]
    assert spool.ids_awaiting_commitment("pacs") == []
    assert spool.ids_in(spool.out_dir("pacs")) == sorted([refs[1][0], refs[2][0]])
    assert [i.decode() for i in redis_conn.lrange(keys.pending(keys.forward("pacs")), 0, -1)] == \
        [refs[1][0], refs[2][0]]
    assert book.of("pacs") == []
    assert history.record(redis_conn, refs[0][0]).destinations == {"pacs": history.Delivery.DELIVERED}
    assert apply_report(book, Dispatcher(redis_conn, DRAIN_JOB), ["pacs"], report) is None  # settled once only


def test_a_committed_reference_of_another_class_is_not_trusted(tmp_path, redis_conn):
    """A report that names our instance under another SOP class did not commit what we sent."""
    spool = Spool(tmp_path)
    book = Transactions(spool)
    refs = _stored(spool, "pacs", 1)
    tx = book.open("pacs", refs, timeout=60)
    wrong = Reference("1.2.840.10008.5.1.4.1.1.4", refs[0][1].sop_instance)
    settled = apply_report(book, Dispatcher(redis_conn, DRAIN_JOB), ["pacs"], Report(tx.uid, [wrong], []))
    assert settled.committed == [] and spool.ids_in(spool.out_dir("pacs")) == [refs[0][0]]


def test_reissue_covers_only_what_still_waits_and_counts_the_request(tmp_path):
    """Asked again after a timeout: a new Transaction UID, the next request number, and only
    the copies still waiting (another report may have settled some meanwhile)."""
    spool = Spool(tmp_path)
    book = Transactions(spool)
    refs = _stored(spool, "pacs", 3)
    tx = book.open("pacs", refs, timeout=60)
    spool.remove_committed("pacs", refs[0][0])
    fresh = book.reissue(tx, timeout=60)
    assert fresh.uid != tx.uid and fresh.request == 2
    assert [spool_id for spool_id, _ in fresh.refs] == [refs[1][0], refs[2][0]]
    assert book.of("pacs") == [fresh]
    later = book.postpone(fresh, time.time() + 5)
    assert book.of("pacs") == [later] and later.uid == fresh.uid


def test_stored_copies_without_a_transaction_are_found_once_they_settle(tmp_path):
    """A crash between the C-STORE and recording the transaction leaves copies no record
    covers; they are orphans once older than the grace period, never while being recorded."""
    spool = Spool(tmp_path)
    book = Transactions(spool)
    refs = _stored(spool, "pacs", 3)
    book.open("pacs", refs[:1], timeout=60)
    assert book.orphans("pacs", older_than=60) == []
    assert sorted(book.orphans("pacs", older_than=0)) == sorted(i for i, _ in refs[1:])


def test_an_unreadable_record_is_dropped_and_its_copies_become_orphans(tmp_path):
    """A record a crash left half-written names nothing; its copies are asked for again."""
    spool = Spool(tmp_path)
    book = Transactions(spool)
    refs = _stored(spool, "pacs", 2)
    tx = book.open("pacs", refs, timeout=60)
    (spool.commitment_dir("pacs") / "tx" / f"{tx.uid}.json").write_text("{")
    assert book.of("pacs") == []
    assert sorted(book.orphans("pacs", older_than=0)) == sorted(i for i, _ in refs)


def test_queues_shows_what_waits_for_commitment(tmp_path, redis_url):
    """`dicom-router queues` lists, per committing destination, the copies not yet committed
    and each open transaction with its instances and when its report is due."""
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    refs = _stored(spool, "pacs", 2)
    tx = Transactions(spool).open("pacs", refs, timeout=300)
    config = tmp_path / "router.yaml"
    config.write_text(f"""\
router: {{spool_dir: {spool_dir}, redis_url: "{redis_url}"}}
destinations:
  pacs: {{ae_title: PACS, host: 127.0.0.1, port: 104, storage_commitment: {{timeout_seconds: 300}}}}
rules: []
""")
    result = CliRunner().invoke(queues, ["-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "storage commitment pacs: 2 stored, not yet committed; 1 open transaction(s)" in result.output
    assert tx.uid in result.output and "request 1" in result.output and "report due in" in result.output
    assert refs[0][1].sop_instance in result.output
