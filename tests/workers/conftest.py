"""Fixtures for the workers' unit tests: spool files as the ingest writes them,
and a :class:`workers.runtime.Runtime` built on the suite's real Redis and a
real spool (``connection``, ``dispatcher``, ``spool``: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_file_meta_info

from router.kernel import filemeta, keys
from router.kernel.dispatch import Dispatcher
from router.kernel.filemeta import Origin
from router.kernel.settings import Config
from router.kernel.spool import Spool
from tests import data
from workers.runtime import Runtime

ROUTER_AE = "DICOM_ROUTER"
MODALITY = Origin("CT_SCANNER_1", ROUTER_AE, "127.0.0.1", 40404)


def spool_file(spool: Spool, path: Path, origin: Origin = MODALITY) -> str:
    """Store the DICOM file at ``path`` in ``spool``'s ``incoming/`` as the ingest
    does: the router's own file meta (with the association's facts), then the
    dataset as received. Returns the spool id."""
    meta = read_file_meta_info(path)
    head = filemeta.encode(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                           str(meta.TransferSyntaxUID), origin, ROUTER_AE)
    return spool.receive(head, data.dataset_bytes_after_meta(path))


@pytest.fixture
def incoming(spool: Spool, small_series) -> Callable[[int], list[str]]:
    """``incoming(n, **ct_series kwargs)``: spool ids of ``n`` new small CT instances in ``incoming/``."""

    def make(n: int, **kwargs: Any) -> list[str]:
        return [spool_file(spool, path) for path in small_series(n, **kwargs)]

    return make


@pytest.fixture
def make_runtime(tmp_path: Path, connection, dispatcher, spool):
    """``make_runtime(config_dict, sender_factory=None)``: a Runtime on the test's
    Redis and spool (``router.spool_dir`` is set to the spool's)."""

    def make(config: dict[str, Any], sender_factory: Callable | None = None) -> Runtime:
        config = {**config, "router": {**config.get("router", {}), "ae_title": ROUTER_AE,
                                       "spool_dir": str(spool.root), "min_free_bytes": 0}}
        extra = {"sender_factory": sender_factory} if sender_factory else {}
        return Runtime(config=Config.model_validate(config), redis=connection, spool=spool,
                       dispatcher=dispatcher, **extra)

    return make


@pytest.fixture
def queued(spool: Spool, dispatcher: Dispatcher, incoming) -> Callable[..., list[str]]:
    """``queued(n, destination="pacs")``: spool ids of n instances routed to the
    destination and waiting in its backlog."""

    def make(n: int, destination: str = "pacs") -> list[str]:
        ids = incoming(n)
        for spool_id in ids:
            spool.assign(spool_id, destination)
            spool.remove_routed(spool_id)
        dispatcher.backlog(keys.forward(destination)).push(ids)
        return ids

    return make
