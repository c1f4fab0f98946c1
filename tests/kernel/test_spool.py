"""The spool's states on a real file system (no peer involved: it is the disk)."""

from __future__ import annotations

import os

import pytest

from router.kernel.errors import SpoolFull
from router.kernel.spool import Spool


def test_received_instance_is_whole_and_only_in_incoming(tmp_path):
    """receive() leaves one complete file in incoming/ and nothing in tmp/."""
    spool = Spool(tmp_path)
    spool_id = spool.receive(b"meta", memoryview(b"body" * 1000))
    assert spool.incoming_path(spool_id).read_bytes() == b"meta" + b"body" * 1000
    assert list(spool.tmp.iterdir()) == []
    assert spool.ids_in(spool.incoming) == [spool_id]


def test_ids_sort_in_arrival_order(tmp_path):
    """Spool ids are time-ordered, so recovery re-queues oldest first."""
    spool = Spool(tmp_path)
    ids = [spool.receive(b"x") for _ in range(20)]
    assert spool.ids_in(spool.incoming) == ids


def test_fan_out_shares_bytes_until_the_last_destination_acknowledges(tmp_path):
    """Hard links keep the bytes on disk while any destination still needs them."""
    spool = Spool(tmp_path)
    spool_id = spool.receive(b"data")
    a = spool.assign(spool_id, "a")
    b = spool.assign(spool_id, "b")
    assert spool.assign(spool_id, "a") == a  # re-routing after a crash is harmless
    spool.sync_out({"a", "b"})
    spool.remove_routed(spool_id)
    assert os.stat(a).st_ino == os.stat(b).st_ino
    spool.remove_delivered("a", spool_id)
    assert b.read_bytes() == b"data"
    spool.remove_delivered("b", spool_id)
    assert not b.exists()


def test_dead_letter_keeps_reason_and_can_be_resurrected(tmp_path):
    """A buried copy is listed with its reason and goes back to out/ on retry."""
    spool = Spool(tmp_path)
    spool_id = spool.receive(b"data")
    spool.assign(spool_id, "pacs")
    spool.remove_routed(spool_id)
    spool.bury("pacs", spool_id, "status 0xA900", 1)
    (letter,) = spool.dead_letters()
    assert (letter.destination, letter.spool_id, letter.reason) == ("pacs", spool_id, "status 0xA900")
    spool.resurrect(letter)
    assert spool.out_path("pacs", spool_id).read_bytes() == b"data"
    assert list(spool.dead_letters()) == []


def test_quarantine_keeps_bytes_with_reason(tmp_path):
    """Undecodable bytes and unrouted instances are kept, with why."""
    spool = Spool(tmp_path)
    tmp, fd = spool.open_temp()
    os.write(fd, b"abc")
    qid = spool.quarantine_temp(tmp, fd, "truncated")
    spool_id = spool.receive(b"data")
    spool.quarantine(spool_id, "unrouted")
    assert dict(spool.quarantine_reasons()) == {qid: "truncated", spool_id: "unrouted"}
    assert not spool.incoming_path(spool_id).exists()


def test_low_disk_space_refuses_without_leaving_anything(tmp_path):
    """Below min_free_bytes, receive() raises SpoolFull and writes nothing."""
    spool = Spool(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(SpoolFull):
        spool.receive(b"data")
    assert spool.ids_in(spool.incoming) == [] and list(spool.tmp.iterdir()) == []


def test_partial_files_go_once_their_writer_is_gone_not_an_hour_later(tmp_path):
    """sweep_tmp removes a partial file whose writing process (a real one, here)
    has exited; the partials of a live process and of another host stay."""
    import subprocess
    import sys

    spool = Spool(tmp_path)
    subprocess.run([sys.executable, "-c", (
        "import os, sys; from router.kernel.spool import Spool; "
        "path, fd = Spool(sys.argv[1]).open_temp(); os.write(fd, b'half an instance')"
    ), str(tmp_path)], check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    orphan = next(spool.tmp.iterdir())
    mine, fd = spool.open_temp()
    os.close(fd)
    elsewhere = spool.tmp / "0000~another-host~1~abcd.part"
    elsewhere.write_bytes(b"x")
    assert spool.sweep_tmp() == 1
    assert not orphan.exists() and mine.exists() and elsewhere.exists()


def _written_temp(spool: Spool, data: bytes) -> tuple:
    tmp, fd = spool.open_temp()
    os.write(fd, data)
    return tmp, fd


def test_an_instance_routed_at_ingest_is_admitted_straight_into_each_destinations_folder(tmp_path):
    """admit_temp with destinations (router.route_at_ingest): one file, a name in each
    out/ folder, none in incoming/, the temp name gone."""
    spool = Spool(tmp_path / "spool")
    tmp, fd = _written_temp(spool, b"instance bytes")
    spool_id = spool.admit_temp(tmp, fd, ("pacs", "research"))
    a, b = spool.out_path("pacs", spool_id), spool.out_path("research", spool_id)
    assert a.read_bytes() == b.read_bytes() == b"instance bytes"
    assert os.stat(a).st_ino == os.stat(b).st_ino  # hard links: the bytes once
    assert not tmp.exists() and not spool.incoming_path(spool_id).exists()
    assert not list(spool.tmp.iterdir())


def test_an_instance_that_cannot_reach_every_destination_folder_is_nowhere(tmp_path):
    """All or nothing: when one destination's name cannot be made, the others are
    taken back and the temp file goes (the peer is answered a failure and sends again)."""
    spool = Spool(tmp_path / "spool")
    (spool.root / "out" / "broken").write_text("a file where the folder should be")
    tmp, fd = _written_temp(spool, b"instance bytes")
    with pytest.raises(OSError):
        spool.admit_temp(tmp, fd, ("pacs", "broken"))
    assert not list(spool.out_dir("pacs").iterdir())
    assert not tmp.exists() and not list(spool.tmp.iterdir()) and not list(spool.incoming.iterdir())


def test_an_instance_moved_or_linked_just_now_is_new_where_it_is_whatever_its_bytes_age(tmp_path):
    """The reconciler's grace (``ids_in(older_than=)``) counts from when an instance came into
    a folder: written an hour ago, renamed back into incoming/ or linked into out/ just now,
    it is not listed yet; listed once nothing changed it for that long."""
    spool = Spool(tmp_path / "spool")
    spool_id = spool.receive(b"x" * 64)
    hour_ago = os.stat(spool.incoming_path(spool_id)).st_mtime - 3600
    os.utime(spool.incoming_path(spool_id), (hour_ago, hour_ago))
    spool.assign(spool_id, "pacs")
    assert spool.ids_in(spool.incoming, older_than=5) == []
    assert spool.ids_in(spool.out_dir("pacs"), older_than=5) == []
    assert spool.ids_in(spool.out_dir("pacs")) == [spool_id]
    assert spool.ids_in(spool.out_dir("pacs"), older_than=-1) == [spool_id]
