"""Hot reload: a valid edit is taken, an invalid one keeps the running rules and says why."""

from __future__ import annotations

import os

from router.kernel.settings import Config
from rules.reload import ConfigWatcher

BASE = """\
rules:
  - name: ct
    when: {Modality: CT}
    forward: [pacs_main]
"""


def _touch_later(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_valid_edit_is_taken_invalid_edit_is_reported_and_ignored(write_config):
    """Edits that validate replace the rules; a broken edit keeps them and sets last_error."""
    path = write_config(BASE)
    watcher = ConfigWatcher(path, Config, interval=0)
    assert [r.name for r in watcher.current().rules] == ["ct"]

    write_config(BASE.replace("name: ct", "name: ct v2"))
    _touch_later(path)
    assert [r.name for r in watcher.current().rules] == ["ct v2"]
    assert watcher.generation == 2

    write_config(BASE.replace("Modality", "Modalty"))
    _touch_later(path)
    assert [r.name for r in watcher.current().rules] == ["ct v2"]
    assert watcher.last_error is not None and "Modalty" in str(watcher.last_error)

    write_config(BASE)
    _touch_later(path)
    assert [r.name for r in watcher.current().rules] == ["ct"] and watcher.last_error is None


def test_new_file_in_an_include_glob_is_noticed(write_config):
    """Adding a rule file to an included folder reloads, though no file read before changed."""
    write_config("- name: a\n  forward: [archive]\n", name="rules.d/10.yaml", with_destinations=False)
    path = write_config("include: [rules.d/*.yaml]\n")
    watcher = ConfigWatcher(path, Config, interval=0)
    added = write_config("- name: b\n  forward: [archive]\n", name="rules.d/20.yaml", with_destinations=False)
    st = os.stat(added.parent)
    os.utime(added.parent, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert [r.name for r in watcher.current().rules] == ["a", "b"]


def test_a_file_added_beside_the_config_is_no_reload(write_config, caplog):
    """Creating any file beside router.yaml (an editor's swap file, a backup)
    changes the folder but not the configuration: nothing is reloaded or logged."""
    import logging

    path = write_config(BASE)
    watcher = ConfigWatcher(path, Config, interval=0)
    (path.parent / ".router.yaml.swp").write_bytes(b"\0" * 100)
    (path.parent / "router.yaml.bak").write_text(BASE)
    st = os.stat(path.parent)
    os.utime(path.parent, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.INFO, logger="rules.reload"):
        assert not watcher.check()
        watcher.current()
    assert watcher.generation == 1
    assert "reloaded" not in caplog.text
