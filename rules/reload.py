"""Hot reload: workers pick up an edited rules file once it validates.

An administrator saving a half-finished edit must not stop routing: a
change that fails validation keeps the running configuration and reports
why (logged, and kept in :attr:`ConfigWatcher.last_error` for the
dashboard). Checking costs a few ``stat`` calls, so workers may call
:meth:`ConfigWatcher.current` before every job.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel

from rules.loader import ConfigError, load_with_sources

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Signature = tuple[tuple[str, int, int], ...]


def _signature(paths: tuple[Path, ...]) -> Signature:
    """Modification times and sizes of the files read and of their folders.

    Folders are included so that a rule file added to an ``include:`` glob
    is noticed although no file that was read has changed; a change there
    that leaves the configuration as it was (an editor's swap file, a backup
    beside ``router.yaml``) is then no reload (see :meth:`ConfigWatcher.check`).
    """
    entries = []
    for path in sorted({*paths, *(p.parent for p in paths)}):
        try:
            st = os.stat(path)
        except OSError:
            entries.append((str(path), -1, -1))
            continue
        entries.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(entries)


class ConfigWatcher(Generic[M]):
    """The current configuration, reloaded when its files change and the new version validates.

    Args:
        path: the main configuration file.
        model: the pydantic model to validate (``router.kernel.settings.Config``).
        finish: applied to each loaded model (e.g. ``lambda c: c.relative_to(base)``).
        interval: seconds between checks of the files.
    """

    def __init__(self, path: Path, model: type[M], finish: Callable[[M], M] = lambda m: m, interval: float = 2.0):
        self.path = Path(path)
        self.model = model
        self.finish = finish
        self.interval = interval
        self.last_error: ConfigError | None = None
        self.generation = 1
        loaded, sources = load_with_sources(self.path, model)  # a bad file at start is fatal
        self._config = finish(loaded)
        self._sources = sources
        self._signature = _signature(sources)
        self._checked = time.monotonic()

    def current(self) -> M:
        """The configuration to use now (the last one that validated)."""
        now = time.monotonic()
        if now - self._checked >= self.interval:
            self._checked = now
            self.check()
        return self._config

    def check(self) -> bool:
        """Reload if any file changed; True when a new configuration was taken."""
        signature = _signature(self._sources)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            loaded, sources = load_with_sources(self.path, self.model)
        except ConfigError as exc:
            self.last_error = exc
            # Problems name files, lines and keywords, never patient data.
            log.warning("config %s changed but is invalid; keeping the running rules:\n%s", self.path, exc)
            return False
        config = self.finish(loaded)
        self._sources = sources
        self._signature = _signature(sources)
        self.last_error = None
        if config == self._config:
            return False  # files touched, configuration the same: nothing to reload
        self._config = config
        self.generation += 1
        log.info("config %s reloaded (generation %s)", self.path, self.generation)
        return True
