"""The spool's storage is tried at start: what it cannot do refuses the start, naming it.

Real storage each time: a plain directory, a FAT file system (which has no
hard links) mounted through FUSE with fusefat, a read-only tmpfs and a full
one. The commands run as an operator runs them, in a subprocess.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from router.kernel.settings import load_config_located
from router.preflight import SPOOL_PROBE, probe_spool, spool_problem
from tests.peers import wait_until

CONFIG = """\
router:
  host: 127.0.0.1
  spool_dir: {spool}
  port: 0
  min_free_bytes: 0
  redis_url: redis://127.0.0.1:1/0
  data_dir: ./data
destinations:
  pacs: {{ae_title: PACS, host: 127.0.0.1, port: 104}}
rules:
  - {{name: all, forward: [pacs]}}
"""
SPOOL_DIR_LINE = 3


def _config(tmp_path: Path, spool: Path) -> Path:
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.format(spool=spool))
    return config


def _dicom_router(command: str, config: Path) -> subprocess.CompletedProcess:
    """``dicom-router COMMAND -c CONFIG``, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "router", command, "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def _everything_in(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _mount(*args: str) -> None:
    mounted = subprocess.run(["mount", *args], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here (needs root): {mounted.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of the test's own; unmounted at the end."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount))
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def fat(tmp_path):
    """A FAT file system (no hard links: link() answers EPERM) in an image file,
    mounted read-write with fusefat; no loop device nor vfat module needed."""
    if not (shutil.which("mkfs.vfat") and shutil.which("fusefat")):
        pytest.skip("needs mkfs.vfat and fusefat (Debian: dosfstools, fusefat)")
    image = tmp_path / "fat.img"
    with open(image, "wb") as out:
        out.truncate(16 << 20)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    mount = tmp_path / "fat"
    mount.mkdir()
    # In the foreground (-f): the test holds the file system's process and ends it itself.
    fusefat = subprocess.Popen(["fusefat", "-f", "-o", "rw+", str(image), str(mount)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: os.path.ismount(mount) or fusefat.poll() is not None, 10, "the FAT volume to be mounted")
        if not os.path.ismount(mount):
            pytest.skip(f"cannot mount with FUSE here: {fusefat.communicate()[1].strip()}")
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        try:
            fusefat.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fusefat.kill()
            fusefat.wait()


def test_a_plain_directory_passes_and_keeps_nothing_of_the_probe(tmp_path):
    """A spool on a local file system passes `check` and a serving command's probe,
    made spool or not made yet, and the probe leaves no file behind."""
    spool = tmp_path / "spool"
    (spool / "tmp").mkdir(parents=True)
    before = _everything_in(tmp_path)
    assert probe_spool(spool / "tmp") is None
    assert _everything_in(tmp_path) == before
    config = _config(tmp_path, spool)
    result = _dicom_router("check", config)
    assert result.returncode == 0, result.stderr
    assert _everything_in(spool) == {spool / "tmp"}

    # Not made yet: tried in tmp_path, where it will be made, and not made by the probe.
    config, loaded = load_config_located(_config(tmp_path, tmp_path / "fresh" / "spool"))
    before = _everything_in(tmp_path)
    assert spool_problem(config, loaded, serving=True) is None
    assert _everything_in(tmp_path) == before


def test_hosts_starting_together_on_one_spool_never_collide(tmp_path):
    """Six processes probing one spool folder 30 times each, all at once: every
    probe passes and the folder is empty afterwards (names carry host, PID, token)."""
    folder = tmp_path / "spool" / "tmp"
    folder.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from router.preflight import probe_spool
        faults = [str(f) for f in (probe_spool(Path({str(folder)!r})) for _ in range(30)) if f]
        print("\\n".join(faults))
        sys.exit(1 if faults else 0)
    """)
    probes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
              for _ in range(6)]
    for probe in probes:
        out, _ = probe.communicate(timeout=60)
        assert probe.returncode == 0, out
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["check", "ingest", "worker", "run"])
def test_a_spool_on_fat_without_hard_links_is_refused_naming_the_link_its_path_and_eperm(tmp_path, fat, command):
    """FAT cannot hard-link: every command refuses to start (exit 1) at the spool_dir
    line, naming the hard link, the file it tried to make and EPERM; the probe's
    file is gone again."""
    spool = fat / "spool"
    (spool / "tmp").mkdir(parents=True)
    config = _config(tmp_path, spool)

    result = _dicom_router(command, config)

    assert result.returncode == 1, result.stderr
    assert f"{config}:{SPOOL_DIR_LINE}:" in result.stderr
    assert f"hard link failed on the spool's storage ({spool / 'tmp'}/{SPOOL_PROBE}-" in result.stderr
    assert "EPERM (Operation not permitted)" in result.stderr
    assert "Spool storage: what it must provide" in result.stderr
    assert list((spool / "tmp").iterdir()) == []


def test_a_spool_not_made_yet_is_tried_where_it_will_be_made_by_a_serving_command_only(tmp_path, fat):
    """A spool_dir that does not exist on FAT: `ingest` tries the FAT volume it will be
    made on and refuses; `check`, maybe on a host without the spool, tries nothing."""
    config = _config(tmp_path, fat / "not" / "yet")

    assert _dicom_router("ingest", config).returncode == 1
    checked = _dicom_router("check", config)
    assert checked.returncode == 0, checked.stderr
    assert list(fat.iterdir()) == []


def test_a_read_only_spool_is_refused_naming_the_create_its_path_and_erofs(tmp_path, tmpfs):
    """A spool whose file system is mounted read-only: refused at the first operation, the create."""
    spool = tmpfs / "spool"
    (spool / "tmp").mkdir(parents=True)
    _mount("-o", "remount,ro", str(tmpfs))
    config = _config(tmp_path, spool)

    for command in ("check", "ingest"):
        result = _dicom_router(command, config)
        assert result.returncode == 1, result.stderr
        assert f"{config}:{SPOOL_DIR_LINE}:" in result.stderr
        assert f"create failed on the spool's storage ({spool / 'tmp'}/{SPOOL_PROBE}-" in result.stderr
        assert "EROFS (Read-only file system)" in result.stderr


def test_a_full_spool_does_not_stop_a_start(tmp_path, tmpfs):
    """A spool with no byte left passes the probe: the ingest answers 0xA700 while
    full, and the workers that empty it must be able to start."""
    filler = tmpfs / "filler"
    with open(filler, "wb") as out:
        with pytest.raises(OSError) as full:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
    assert full.value.errno == errno.ENOSPC
    assert probe_spool(tmpfs) is None
    assert list(tmpfs.iterdir()) == [filler]
