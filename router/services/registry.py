"""Which service answers which request: built once from the config, asked by every
association of the ingest (``router/ingest/fastscp.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import redis
from pynetdicom import sop_class as sop
from pynetdicom.presentation import PresentationContext

from router.kernel.dimse import C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, N_CREATE_RQ, N_SET_RQ
from router.kernel.operation import Operation
from router.kernel.settings import Config
from router.kernel.spool import Spool
from router.services.find import Find
from router.services.identifiers import SERVICE_SYNTAXES
from router.services.retrieve import Retrieve
from router.services.sources import Peer

log = logging.getLogger(__name__)

FIND_CLASSES = (str(sop.PatientRootQueryRetrieveInformationModelFind),
                str(sop.StudyRootQueryRetrieveInformationModelFind))
MOVE_CLASSES = (str(sop.PatientRootQueryRetrieveInformationModelMove),
                str(sop.StudyRootQueryRetrieveInformationModelMove))
GET_CLASSES = (str(sop.PatientRootQueryRetrieveInformationModelGet),
               str(sop.StudyRootQueryRetrieveInformationModelGet))
WORKLIST = str(sop.ModalityWorklistInformationFind)
MPPS = str(sop.ModalityPerformedProcedureStep)


class Services:
    """The services a config asks for: Q/R (``query_retrieve:``), worklist and MPPS.

    Args:
        config: the router's config.
        spool: where retrieved instances and held MPPS messages are kept.
        client: Redis (retrieves' correlation across hosts; MPPS order).
    """

    def __init__(self, config: Config, spool: Spool, client: redis.Redis) -> None:
        ae_title = config.router.ae_title
        self._operations: dict[tuple[str, int], Operation] = {}
        self.retrieve: Retrieve | None = None
        self.mpps = None
        qr = config.query_retrieve
        if qr is not None:
            peers = [Peer.of(name, config.destinations[name], ae_title) for name in qr.sources]
            find = Find(peers, qr.find_timeout, retrieve_ae_title=ae_title)
            self.retrieve = Retrieve(peers, qr.retrieve_timeout, ae_title, config.modalities, client, spool)
            for uid in FIND_CLASSES:
                self._operations[(uid, C_FIND_RQ)] = find
            for uid in MOVE_CLASSES:
                self._operations[(uid, C_MOVE_RQ)] = self.retrieve.move
            for uid in GET_CLASSES:
                self._operations[(uid, C_GET_RQ)] = self.retrieve.get
        worklist = config.worklist
        if worklist is not None:
            peer = Peer.of(worklist.source, config.destinations[worklist.source], ae_title)
            self._operations[(WORKLIST, C_FIND_RQ)] = Find([peer], worklist.timeout, merge=False)
        if config.mpps is not None:
            from router.services.mpps import MppsRelay

            self.mpps = MppsRelay(config, spool, client)
            self._operations[(MPPS, N_CREATE_RQ)] = self.mpps
            self._operations[(MPPS, N_SET_RQ)] = self.mpps

    @classmethod
    def of(cls, config: Config, spool: Spool, client: redis.Redis) -> Services | None:
        """The services ``config`` asks for, or None when it asks for none."""
        if config.query_retrieve is None and config.worklist is None and config.mpps is None:
            return None
        return cls(config, spool, client)

    def contexts(self) -> list[PresentationContext]:
        """The presentation contexts the ingest accepts for these services."""
        contexts = []
        for uid in dict.fromkeys(uid for uid, _ in self._operations):
            context = PresentationContext()
            context.abstract_syntax = uid
            context.transfer_syntax = list(SERVICE_SYNTAXES)
            contexts.append(context)
        return contexts

    def operation(self, abstract_syntax: str, command_field: int) -> Operation | None:
        """What answers ``command_field`` on a context of ``abstract_syntax``, if anything does."""
        return self._operations.get((abstract_syntax, command_field))

    def retrieve_for(self, originator_ae: str, message_id: int) -> str | None:
        """:meth:`Retrieve.retrieve_for`, or None without Q/R."""
        return self.retrieve.retrieve_for(originator_ae, message_id) if self.retrieve is not None else None

    def arrived(self, operation: str, path: Path) -> None:
        assert self.retrieve is not None
        self.retrieve.arrived(operation, path)

    def start(self) -> None:
        """Start delivering MPPS messages held from before."""
        if self.mpps is not None:
            self.mpps.start()

    def stop(self) -> None:
        if self.mpps is not None:
            self.mpps.stop()
