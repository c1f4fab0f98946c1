"""Fixtures for the ingest's tests in this process: SCPs on the test's spool and the session's Redis."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import redis

from router.ingest.server import IngestServer
from router.kernel.commitment.from_modalities import ModalityCommitments
from router.kernel.commitment.service import CommitmentService
from router.kernel.dispatch import Dispatcher
from router.kernel.settings import Modality, RouterSettings
from router.kernel.spool import Spool
from tests.peers import LOOPBACK
from workers.runtime import DRAIN_JOB

ROUTER_AE = "DICOM_ROUTER"


@pytest.fixture
def start_ingest(tmp_path: Path, redis_url: str):
    """``start_ingest(modalities=None, **RouterSettings fields)``: an
    ingest SCP in this process, on port 0 of loopback; every one stopped after the test.

    With ``modalities`` (AE title -> port on loopback, may be empty) it also
    serves storage commitment requests, reporting to those modalities.
    """
    started: list[IngestServer] = []
    clients: list[redis.Redis] = []

    def make(modalities: Mapping[str, int] | None = None, **overrides) -> IngestServer:
        fields = {"ae_title": ROUTER_AE, "host": LOOPBACK, "port": 0, "spool_dir": tmp_path / "spool",
                  "min_free_bytes": 0, "network_timeout": 10}
        fields.update(overrides)
        settings = RouterSettings(**fields)
        client = redis.Redis.from_url(redis_url)
        clients.append(client)
        spool = Spool(settings.spool_dir, settings.min_free_bytes)
        dispatcher = Dispatcher(client, DRAIN_JOB)
        service = None
        if modalities is not None:
            known = {ae: Modality(host=LOOPBACK, port=port) for ae, port in modalities.items()}
            service = CommitmentService(spool, dispatcher, [], ModalityCommitments(settings, spool, client, known))
        scp = IngestServer(settings, spool, dispatcher, service)
        scp.start()
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()
    for client in clients:
        client.close()
