"""The spool's states on a real file system (no peer involved: it is the disk)."""

from __future__ import annotations

import os

import pytest

from router.kernel import spool as spool_module
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


@pytest.mark.parametrize("destinations", [(), ("pacs",), ("pacs", "research")],
                         ids=["to be routed", "one destination", "two destinations"])
def test_an_admission_whose_folder_fsync_fails_leaves_no_name_behind(tmp_path, monkeypatch, destinations):
    """The folder's fsync fails (EIO) after the rename: the error is raised (the sender is
    answered a failure and sends again) and no name of the instance stays behind, so the
    resend is not forwarded twice. (A replacement by write_durably keeps its new version.)
    The folder's fsync is made to fail: a real disk cannot be told to fail one fsync."""
    spool = Spool(tmp_path / "spool")
    tmp, fd = _written_temp(spool, b"instance bytes")

    def failing_fsync(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "fsync_dir", failing_fsync)
    with pytest.raises(OSError) as raised:
        spool.admit_temp(tmp, fd, destinations)
    assert raised.value.errno == 5
    assert not list(spool.incoming.iterdir()) and not list(spool.tmp.iterdir())
    assert all(not list(spool.out_dir(d).iterdir()) for d in destinations)

    record = spool.root / "record.json"
    record.write_bytes(b"old")
    with pytest.raises(OSError):
        spool.write_durably(record, b"new")
    assert record.read_bytes() == b"new"


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


# -- delivered files written over by the next instances (spool.RECYCLED_KEPT) --

def _admitted(spool: Spool, data: bytes, destinations=("pacs",)) -> str:
    tmp, fd = spool.open_temp(recycled=True)
    os.write(fd, data)
    spool.trim_temp(fd, len(data))
    return spool.admit_temp(tmp, fd, destinations)


def test_a_delivered_instance_s_file_is_written_over_by_the_next_one_cut_to_its_length(tmp_path):
    """The last copy of a delivered instance waits in free/; the next instance received
    takes its file (same inode) and holds its own bytes only, none of the longer one's."""
    spool = Spool(tmp_path)
    first = _admitted(spool, b"A" * 100_000)
    inode = os.stat(spool.out_path("pacs", first)).st_ino
    spool.remove_delivered("pacs", first)
    assert not spool.out_path("pacs", first).exists()
    assert [p.suffix for p in spool.free.iterdir()] == [".free"]
    second = _admitted(spool, b"short")
    path = spool.out_path("pacs", second)
    assert path.read_bytes() == b"short" and os.stat(path).st_ino == inode
    assert not list(spool.free.iterdir()) and not list(spool.tmp.iterdir())
    third = _admitted(spool, b"new file")  # free/ is empty: a file of its own
    assert spool.out_path("pacs", third).read_bytes() == b"new file"


def test_a_copy_another_destination_still_needs_is_deleted_not_kept(tmp_path):
    """Only an instance's last name is recycled: its other destinations' copies (hard
    links) keep their bytes."""
    spool = Spool(tmp_path)
    spool_id = _admitted(spool, b"for two", ("a", "b"))
    spool.remove_delivered("a", spool_id)
    assert not list(spool.free.iterdir())
    assert spool.out_path("b", spool_id).read_bytes() == b"for two"
    spool.remove_delivered("b", spool_id)
    assert len(list(spool.free.iterdir())) == 1


def test_free_keeps_a_bounded_number_of_files_and_no_large_ones(tmp_path, monkeypatch):
    """At most RECYCLED_KEPT files, none larger than RECYCLED_MAX_BYTES: the rest is deleted."""
    from router.kernel import spool as spool_module

    monkeypatch.setattr(spool_module, "RECYCLED_MAX_BYTES", 1000)
    spool = Spool(tmp_path)
    ids = [_admitted(spool, b"x" * 10) for _ in range(spool_module.RECYCLED_KEPT + 5)]
    large = _admitted(spool, b"y" * 1001)
    spool.remove_delivered("pacs", large)
    assert not list(spool.free.iterdir())
    for spool_id in ids:
        spool.remove_delivered("pacs", spool_id)
    assert len(list(spool.free.iterdir())) == spool_module.RECYCLED_KEPT
    assert not list(spool.out_dir("pacs").iterdir())


def test_no_room_on_the_disk_deletes_the_kept_files_first(tmp_path):
    """A spool short of space drops free/ before it refuses anything."""
    spool = Spool(tmp_path)
    for spool_id in [_admitted(spool, b"x" * 4096) for _ in range(3)]:
        spool.remove_delivered("pacs", spool_id)
    assert len(list(spool.free.iterdir())) == 3
    spool.min_free_bytes = 1 << 62
    assert not spool.has_room()
    assert not list(spool.free.iterdir())


def test_each_kept_file_is_taken_by_one_writer_only(tmp_path):
    """Writers of several processes (a Spool each, here on threads) race for free/: the
    rename is the claim, so no file is handed to two of them."""
    import threading

    from router.kernel import spool as spool_module

    spool = Spool(tmp_path)
    for spool_id in [_admitted(spool, b"x" * 4096) for _ in range(spool_module.RECYCLED_KEPT)]:
        spool.remove_delivered("pacs", spool_id)
    kept = {os.stat(p).st_ino for p in spool.free.iterdir()}
    taken: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        mine = Spool(tmp_path)
        for _ in range(20):
            tmp, fd = mine.open_temp(recycled=True)
            with lock:
                taken.append(os.fstat(fd).st_ino)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recycled = [ino for ino in taken if ino in kept]
    assert sorted(recycled) == sorted(kept)  # every kept file taken, each once
    assert len(set(taken)) == len(taken) == 80


def test_room_is_looked_at_again_soon_and_at_every_instance_once_it_runs_short(tmp_path, monkeypatch):
    """has_room() is asked per instance: with plenty free it looks at the file system at
    most every ROOM_RECHECK s; once less than ROOM_MARGIN x min_free_bytes is free, every time.
    statvfs and the clock are faked: a real disk cannot be made to hold a chosen free space
    between two calls (a real full disk is tests/test_pipeline_e2e.py's, on a small tmpfs)."""
    from router.kernel import spool as spool_module

    looks = []
    free = [10 * 1024 * 1024]

    class Stat:
        f_frsize = 1

        @property
        def f_bavail(self):
            return free[0]

    monkeypatch.setattr(spool_module.os, "statvfs", lambda path: looks.append(path) or Stat())
    now = [1000.0]
    monkeypatch.setattr(spool_module.time, "monotonic", lambda: now[0])
    spool = Spool(tmp_path, min_free_bytes=1024 * 1024)
    assert spool.has_room() and spool.has_room() and len(looks) == 1
    now[0] += spool_module.ROOM_RECHECK
    free[0] = 3 * 1024 * 1024  # under the margin: looked at every time from now on
    assert spool.has_room() and spool.has_room() and len(looks) == 3
    free[0] = 1024 * 1024 - 1
    assert not spool.has_room()


def test_ids_drawn_in_a_forked_child_differ_from_the_parents(tmp_path):
    """Spool ids and temp names take their random part from a generator seeded once per
    process: a forked child (the supervisor's, a test's) reseeds, never repeating the parent."""
    import os as _os

    from router.kernel.spool import new_id

    read, write = _os.pipe()
    pid = _os.fork()
    if pid == 0:  # the child: its next ids, then out
        _os.close(read)
        _os.write(write, ",".join(new_id().split("-")[1] for _ in range(50)).encode())
        _os._exit(0)
    _os.close(write)
    mine = {new_id().split("-")[1] for _ in range(50)}
    with _os.fdopen(read) as pipe:
        theirs = set(pipe.read().split(","))
    _os.waitpid(pid, 0)
    assert len(theirs) == 50 and not mine & theirs


def test_delivered_copies_still_go_when_free_is_gone(tmp_path):
    """An operator who deletes free/ under a running router loses nothing and keeps
    nothing: delivered copies are deleted as before (none stays in out/ to be sent
    again), and the ingest creates files of its own."""
    import shutil

    spool = Spool(tmp_path)
    ids = [_admitted(spool, b"x" * 4096) for _ in range(3)]
    shutil.rmtree(spool.free)
    for spool_id in ids:
        spool.remove_delivered("pacs", spool_id)
    assert not list(spool.out_dir("pacs").iterdir())
    again = _admitted(spool, b"new")
    assert spool.out_path("pacs", again).read_bytes() == b"new"


def test_an_instance_delivered_while_the_reconciler_lists_its_folder_is_skipped(tmp_path, monkeypatch):
    """ids_in(older_than=) looks at each listed file's change time: a file a forwarder
    delivers (renames into free/) between the listing and that look is skipped, not an
    error that ends the reconciliation before it logs what it released. The interleaving
    is forced (the listing taken whole, then one file delivered); the files are real."""
    from router.kernel import spool as spool_module

    spool = Spool(tmp_path)
    kept, gone = sorted(_admitted(spool, b"x" * 64) for _ in range(2))
    real_scandir = os.scandir

    class Listed:
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = list(entries)
            spool.remove_delivered("pacs", gone)  # delivered after the listing

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(spool_module.os, "scandir", Listed)
    assert spool.ids_in(spool.out_dir("pacs"), older_than=-1) == [kept]
