"""The MPPS hold (router/services/mpps_hold.py): messages kept per destination on a
tmp spool, in order, and the Redis lock that lets one host deliver them (the
session's real Redis)."""

from __future__ import annotations

import json
import time

import pytest

from router.kernel.dimse import N_CREATE_RQ, N_SET_RQ
from router.kernel.errors import SpoolFull
from router.kernel.spool import Spool, new_id
from router.services.identifiers import decode, encode
from router.services.mpps_hold import DeliveryLock, HeldMessage, MppsHold, sop_instance_of
from tests.mpps_peer import MPPS, in_progress

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def message(uid: str, command: int = N_CREATE_RQ, dataset: bytes | None = b"") -> HeldMessage:
    data = encode(in_progress(), EXPLICIT_LE) if dataset == b"" else dataset
    return HeldMessage(new_id(), command, MPPS, uid, EXPLICIT_LE, data, "MODALITY@127.0.0.1", time.time())


@pytest.fixture
def hold(tmp_path) -> MppsHold:
    return MppsHold(Spool(tmp_path / "spool"))


def test_a_held_message_reads_back_as_it_was_written(hold):
    """Command, UIDs, data set bytes (or none) and source survive the file."""
    for original in (message("1.2.3"), message("1.2.4", N_SET_RQ, dataset=None)):
        path = hold.hold("ris", original)
        assert hold.read(path) == original
        assert sop_instance_of(path) == original.sop_instance


def test_held_messages_come_out_oldest_first_per_destination(hold):
    """A destination's messages list in the order they were held, whatever their UIDs;
    another destination's are its own."""
    held = [message(uid) for uid in ("1.2.9", "1.2.1", "1.2.5", "1.2.1")]
    for item in held:
        hold.hold("pacs", item)
    hold.hold("ris", message("1.2.7"))
    assert [hold.read(p).message_id for p in hold.waiting("pacs")] == [m.message_id for m in held]
    assert [sop_instance_of(p) for p in hold.waiting("ris")] == ["1.2.7"]
    assert hold.count("pacs") == 4 and hold.waiting("nobody") == []


def test_holds_for_names_the_procedure_steps_a_destination_still_holds(hold):
    """Only an exact SOP Instance UID matches (1.2.3 is not 1.2.33 nor 2.3), per destination."""
    path = hold.hold("pacs", message("1.2.33"))
    assert hold.holds_for("pacs", "1.2.33")
    assert not hold.holds_for("pacs", "1.2.3") and not hold.holds_for("pacs", "2.33")
    assert not hold.holds_for("ris", "1.2.33")
    hold.remove_delivered(path)
    assert not hold.holds_for("pacs", "1.2.33") and hold.waiting("pacs") == []


def test_a_refused_message_is_set_aside_with_why(hold):
    """Out of the held folder, into refused/DEST/ with its reason and status."""
    path = hold.hold("pacs", message("1.2.3"))
    target = hold.set_aside(path, "pacs", "0x0110 Processing Failure", 0x0110)
    assert not path.exists() and target.exists()
    assert json.loads(target.with_suffix(".json").read_text())["status"] == 0x0110
    assert hold.refused_count("pacs") == 1 and hold.count("pacs") == 0


def test_a_full_spool_keeps_nothing(tmp_path):
    """Below min_free_bytes the hold refuses: SpoolFull, no file."""
    hold = MppsHold(Spool(tmp_path / "spool", min_free_bytes=1 << 60))
    with pytest.raises(SpoolFull):
        hold.hold("pacs", message("1.2.3"))
    assert hold.waiting("pacs") == []


def test_a_data_set_is_re_encoded_only_for_another_syntax():
    """The held bytes go as they came in their own syntax; another gets the same data set re-encoded."""
    held = message("1.2.3")
    assert held.dataset_in(EXPLICIT_LE) is held.dataset
    again = decode(held.dataset_in(IMPLICIT_LE), IMPLICIT_LE)
    assert again.PerformedProcedureStepID == "PPS-ACC1"
    assert message("1.2.4", dataset=None).dataset_in(IMPLICIT_LE) is None


def test_one_delivery_lock_per_destination_at_a_time(redis_conn):
    """A second holder is refused until the first frees it; only the holder extends or frees it."""
    first, second = DeliveryLock(redis_conn, "pacs", 30), DeliveryLock(redis_conn, "pacs", 30)
    other = DeliveryLock(redis_conn, "ris", 30)
    assert first.acquire() and other.acquire()
    assert not second.acquire()
    assert not second.extend()
    second.release()  # not its own: no effect
    assert first.extend() and not second.acquire()
    first.release()
    assert second.acquire()


def test_a_dead_holders_lock_expires(redis_conn):
    """A host that died holding the lock frees it by expiry."""
    first, second = DeliveryLock(redis_conn, "pacs", 1), DeliveryLock(redis_conn, "pacs", 1)
    assert first.acquire()
    deadline = time.monotonic() + 10
    while not second.acquire():
        assert time.monotonic() < deadline, "the lock never expired"
        time.sleep(0.1)


def test_a_held_folder_removed_by_hand_is_made_again(hold):
    """An operator who emptied mpps/held/DEST (folder and all) does not make the next hold fail."""
    path = hold.hold("pacs", message("1.2.3"))
    path.unlink()
    path.parent.rmdir()
    hold.hold("pacs", message("1.2.4"))
    assert [sop_instance_of(p) for p in hold.waiting("pacs")] == ["1.2.4"]
