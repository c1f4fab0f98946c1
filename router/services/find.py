"""C-FIND through the router: Query/Retrieve (asked of every ``query_retrieve.sources``,
the answers merged) and Modality Worklist (relayed to ``worklist.source``).

Each source is asked on an association of its own, all at once, and every
answer goes to the caller as soon as it arrives (a pending response), once
per unique key of the query's level (PS3.4 C.4.1: PatientID, StudyInstanceUID,
SeriesInstanceUID, SOPInstanceUID): a study two archives hold is answered
once. A C-CANCEL from the caller is passed on to every source still
answering, and the caller gets Cancel (0xFE00) at once. A source that cannot
be reached or fails leaves the others' answers standing; when none
answers, the caller gets a failure with the reason in Error Comment, never
a wait longer than the sources' connect and answer timeouts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset

from router.kernel.dimse import C_FIND_RQ, STATUS, c_request, c_response, command_us
from router.kernel.errors import SendError
from router.kernel.operation import Caller, DimseRequest
from router.kernel.requestor import PENDING
from router.kernel.status import Status, describe, is_failure
from router.services.identifiers import decode, encode
from router.services.sources import Exchange, Peer

log = logging.getLogger(__name__)

C_FIND_RSP = 0x8020
UNIQUE_KEYS = {
    "PATIENT": ("PatientID", "IssuerOfPatientID"),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("SeriesInstanceUID",),
    "IMAGE": ("SOPInstanceUID",),
}
"""The keys that name one answer at each level (PS3.4 C.2.2.1, C.3); a Patient is its
ID within its issuer."""
CANCEL_POLL = 0.2
"""Seconds between looks at the caller's C-CANCEL while no answer comes."""


def unique_key(level: str, answer: Dataset) -> tuple[str, ...] | None:
    """What makes ``answer`` one entity at ``level``, or None when it does not say (kept)."""
    names = UNIQUE_KEYS.get(level.strip().upper())
    if names is None:
        return None
    values = tuple(str(answer.get(name, "") or "").strip() for name in names)
    return values if values[0] else None


@dataclass(frozen=True)
class _Answer:
    peer: str
    dataset: Dataset | None  # None: this source is done
    status: int
    why: str = ""


class Find:
    """A C-FIND answered from ``peers``.

    Args:
        peers: who is asked, in the config's order.
        timeout: seconds a peer may take between two answers.
        merge: one answer per unique key (Query/Retrieve); off for a worklist
            (its items have no unique key of a level).
        retrieve_ae_title: the router's AE title, put in each answer's Retrieve AE
            Title (0008,0054) that has one: what the caller found it retrieves from the
            router, not from a source it may not reach. None: answers as they came.
    """

    def __init__(self, peers: Sequence[Peer], timeout: float, merge: bool = True,
                 retrieve_ae_title: str | None = None) -> None:
        self.peers = list(peers)
        self.timeout = timeout
        self.merge = merge
        self.retrieve_ae_title = retrieve_ae_title

    def __call__(self, caller: Caller, request: DimseRequest) -> None:
        sop_class = request.sop_class
        try:
            identifier = decode(request.dataset, request.transfer_syntax)
        except ValueError as exc:
            log.warning("C-FIND from %s: unreadable identifier: %s", caller.calling_ae, exc)
            caller.respond(request.context_id, c_response(C_FIND_RSP, request.message_id, Status.UNABLE_TO_PROCESS,
                                                          sop_class, comment="unreadable identifier"))
            return
        level = str(identifier.get("QueryRetrieveLevel", "") or "")
        answers: queue.Queue[_Answer] = queue.Queue()
        exchanges = [Exchange() for _ in self.peers]
        for peer, exchange in zip(self.peers, exchanges, strict=True):
            threading.Thread(target=self._ask, args=(peer, sop_class, identifier, answers, exchange),
                             name=f"c-find-{peer.name}", daemon=True).start()
        seen: set[tuple[str, ...]] = set()
        failures: list[_Answer] = []
        done = sent = 0
        while done < len(self.peers):
            if request.cancelled.is_set() or caller.gone:
                break
            try:
                answer = answers.get(timeout=CANCEL_POLL)
            except queue.Empty:
                continue
            if answer.dataset is None:
                done += 1
                if answer.status not in (Status.SUCCESS, Status.CANCEL):
                    failures.append(answer)
                continue
            if self.retrieve_ae_title is not None and "RetrieveAETitle" in answer.dataset:
                answer.dataset.RetrieveAETitle = self.retrieve_ae_title
            key = unique_key(level, answer.dataset) if self.merge else None
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            pending = c_response(C_FIND_RSP, request.message_id, answer.status, sop_class, has_dataset=True)
            if not caller.respond(request.context_id, pending, encode(answer.dataset, request.transfer_syntax)):
                break
            sent += 1
        for exchange in exchanges:
            exchange.cancel()  # sources still answering are told to stop
        if caller.gone:
            log.info("C-FIND from %s: the caller left after %d answer(s)", caller.calling_ae, sent)
            return
        if request.cancelled.is_set():
            status, comment = Status.CANCEL, ""
        elif failures and len(failures) == len(self.peers):
            first = failures[0]
            status = first.status if is_failure(first.status) else Status.UNABLE_TO_PROCESS
            comment = "; ".join(f"{f.peer}: {f.why}" for f in failures)
        else:
            status, comment = Status.SUCCESS, ""
        for failure in failures:
            log.warning("C-FIND from %s: source %s: %s", caller.calling_ae, failure.peer, failure.why)
        log.info("C-FIND from %s (%s): %d answer(s) from %d source(s), %s", caller.calling_ae, level or "?", sent,
                 len(self.peers), describe(status))
        caller.respond(request.context_id, c_response(C_FIND_RSP, request.message_id, status, sop_class,
                                                      comment=comment))

    def _ask(self, peer: Peer, sop_class: str, identifier: Dataset, answers: queue.Queue[_Answer],
             exchange: Exchange) -> None:
        """Ask ``peer``; every answer, then its end, goes to ``answers``."""
        try:
            assoc, context_id, ts = peer.associate(sop_class, self.timeout)
        except SendError as exc:
            answers.put(_Answer(peer.name, None, Status.UNABLE_TO_PROCESS, str(exc)))
            return
        final = Status.UNABLE_TO_PROCESS
        why = ""
        try:
            message_id = assoc.next_message_id()
            for response in assoc.responses(context_id, c_request(C_FIND_RQ, message_id, sop_class), message_id,
                                            encode(identifier, ts), self.timeout):
                exchange.started(assoc, context_id, message_id)
                exchange.answered()
                status = command_us(response, STATUS)
                if status in PENDING:
                    if -1 in response and not exchange.wanted.is_set():
                        try:
                            answers.put(_Answer(peer.name, decode(response[-1], ts), status))
                        except ValueError as exc:
                            log.warning("C-FIND: %s sent an unreadable answer: %s", peer.name, exc)
                    continue
                exchange.finished()
                final = Status.PROCESSING_FAILURE if status is None else status
                if final not in (Status.SUCCESS, Status.CANCEL):
                    why = describe(final)
            assoc.release()
        except (SendError, OSError) as exc:
            final, why = Status.UNABLE_TO_PROCESS, str(exc)
            assoc.abort()
        answers.put(_Answer(peer.name, None, final, why))
