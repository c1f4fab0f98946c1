"""The ingest SCP: accept associations, spool every C-STORE durably, queue it.

Two engines behind one shape (:class:`IngestEngine`) —
:mod:`router.ingest.server` (the default, a lean data path: ``fastscp`` and
``reader``) and :mod:`router.ingest.pynetdicom_scp` (stock pynetdicom) —
sharing association acceptance, the C-STORE handler (``store``), the
structural check of datasets, and the gate toward Redis. Built on
:mod:`router.kernel`; never on the workers.
"""

from __future__ import annotations

from typing import Protocol


class IngestEngine(Protocol):
    """What serving needs from an engine (``server.FastIngestServer``,
    ``pynetdicom_scp.IngestServer``): both are built from the router's
    settings, spool and dispatcher, and answer C-STORE through one
    :class:`router.ingest.store.StoreHandler`."""

    @property
    def port(self) -> int:
        """The port it listens on (the configured one, or the one chosen for port 0)."""
        ...

    @property
    def open_associations(self) -> int:
        """Associations being served now (published as a gauge, ``router.kernel.telemetry``)."""
        ...

    def start(self) -> None:
        """Bind and serve in a background thread; OSError when it cannot listen."""
        ...

    def stop(self) -> None:
        """Stop listening and end the associations still open (their partial files go)."""
        ...
