"""C-MOVE and C-GET through the router: it retrieves from the Q/R sources and passes
every instance on itself, so a source only ever needs to know the router.

How an instance travels:

1. the router sends the source a C-MOVE whose Move Destination is the router
   (the AE title it presents to that source), with a Message ID unique
   across the router's hosts (``keys.RETRIEVE_SEQUENCE``);
2. the source opens associations to the router and C-STOREs each instance,
   naming that AE title and Message ID as Move Originator (PS3.7 §9.3.1.1);
   whichever host of the router receives it finds the operation in Redis
   (``keys.retrieve_origin``), keeps the file in ``retrieved/OP/`` (never
   routed) and pushes its file name to the operation's list
   (``keys.retrieve_arrivals``) before answering the source;
3. the host running the operation takes each file from that list and sends
   the instance on — to the Move Destination resolved in ``modalities:``
   over its own association (the modality's transfer syntaxes and TLS), or,
   for a C-GET, back on the caller's association — then deletes it and
   gives the caller a pending response with true counts.

The source's final response comes only after the router answered every one
of its C-STOREs, so once it has come everything it sent is in the list.
Counts (PS3.4 C.4.2.3): completed, failed and warning are the router's
sub-operations toward the caller's destination, plus the ones the source
itself reports failed; remaining is what the source announced and the router
has not passed on yet. A C-CANCEL stops the passing on, is passed to the
source, and the caller gets Cancel with the counts so far.

``deliver`` is the seam for what a caller may be given: a morph toward
the caller (a research caller's de-identified copy) would apply there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import redis
from pydicom import Dataset
from pynetdicom import sop_class as sop

from router.kernel import keys
from router.kernel.dimse import (
    C_MOVE_RQ,
    COMPLETED,
    FAILED,
    MOVE_DESTINATION,
    REMAINING,
    STATUS,
    WARNING,
    c_request,
    c_response,
    c_store_sub_rq,
    command_ui,
    command_us,
)
from router.kernel.errors import PermanentSendError, SendError
from router.kernel.operation import Caller, DimseRequest
from router.kernel.requestor import PENDING
from router.kernel.settings import Destination, Modality
from router.kernel.spool import Spool, new_id
from router.kernel.status import Category, Status, category, describe, is_failure
from router.services.identifiers import decode, encode
from router.services.sources import Exchange, Peer
from workers.sender import Sender, read_info
from workers.transcode import transcode

log = logging.getLogger(__name__)

C_GET_RSP = 0x8010
C_MOVE_RSP = 0x8021
CANCEL_POLL = 1.0
"""Seconds between looks at the caller's C-CANCEL while no instance arrives."""

PATIENT_ROOT = {str(sop.PatientRootQueryRetrieveInformationModelFind),
                str(sop.PatientRootQueryRetrieveInformationModelMove),
                str(sop.PatientRootQueryRetrieveInformationModelGet)}
MOVE_FOR = {
    uid: str(sop.PatientRootQueryRetrieveInformationModelMove if uid in PATIENT_ROOT
             else sop.StudyRootQueryRetrieveInformationModelMove)
    for uid in (*PATIENT_ROOT, str(sop.StudyRootQueryRetrieveInformationModelFind),
                str(sop.StudyRootQueryRetrieveInformationModelMove), str(sop.StudyRootQueryRetrieveInformationModelGet))
}
"""The C-MOVE SOP class the router asks a source with, for each class a caller may retrieve with."""


class Outcome(Enum):
    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"
    STOP = "stop"  # the caller is gone: nothing more can be passed on


Deliver = Callable[[Path], tuple[Outcome, str]]
"""Pass one retrieved file on: its outcome and its SOP Instance UID ('' when unknown)."""


@dataclass
class Counts:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    missing: int = 0
    """Of the failed: files another ingest kept, not found in this spool (it is not shared)."""

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.warning


def _tally(sources: Sequence[_SourceMove], counts: Counts) -> tuple[int, int]:
    """What the sources failed themselves, and what they announced that was not passed on yet."""
    source_failed = sum(s.counts[2] for s in sources)
    return source_failed, max(0, sum(s.expected for s in sources) - counts.done - source_failed)


class _SourceMove(threading.Thread):
    """The router's C-MOVE to one source, read on a thread of its own while the
    operation passes the arriving instances on."""

    def __init__(self, peer: Peer, sop_class: str, identifier: Dataset, message_id: int, timeout: float,
                 wake: Callable[[], None]) -> None:
        super().__init__(name=f"c-move-{peer.name}", daemon=True)
        self.peer = peer
        self.sop_class = sop_class
        self.identifier = identifier
        self.message_id = message_id
        self.timeout = timeout
        self.wake = wake
        self.counts = (0, 0, 0, 0)  # remaining, completed, failed, warning: the source's latest
        self._expected = 0
        self.announced = False
        """Whether a response came (so ``counts`` says how many it will send)."""
        self.final: int | None = None
        self.why = ""
        self.exchange = Exchange()
        self.done = threading.Event()
        """Set once the source's final response came (or it failed): everything it sent has arrived."""

    @property
    def expected(self) -> int:
        """How many sub-operations the source announced: the most any of its responses
        accounted for (a final response, after a cancel, may leave the remaining out)."""
        return self._expected

    def run(self) -> None:
        try:
            self._move()
        finally:
            self.done.set()
            self.wake()

    def _move(self) -> None:
        try:
            assoc, context_id, ts = self.peer.associate(self.sop_class, self.timeout)
        except SendError as exc:
            self.final, self.why = Status.UNABLE_TO_PERFORM_SUB_OPERATIONS, str(exc)
            return
        command = c_request(C_MOVE_RQ, self.message_id, self.sop_class,
                            move_destination=self.peer.calling_ae_title.encode("ascii"))
        try:
            for response in assoc.responses(context_id, command, self.message_id, encode(self.identifier, ts),
                                            self.timeout):
                self.exchange.started(assoc, context_id, self.message_id)
                self.exchange.answered()
                status = command_us(response, STATUS)
                self.counts = tuple(command_us(response, element) or 0  # type: ignore[assignment]
                                    for element in (REMAINING, COMPLETED, FAILED, WARNING))
                self._expected = max(self._expected, sum(self.counts))
                self.announced = True
                if status in PENDING:
                    continue
                self.exchange.finished()
                self.final = Status.PROCESSING_FAILURE if status is None else status
                if category(self.final) is Category.PERMANENT and self.final != Status.CANCEL:
                    comment = command_ui(response, 0x0902)
                    self.why = describe(self.final) + (f" ({comment})" if comment else "")
            assoc.release()
        except (SendError, OSError) as exc:
            self.final, self.why = Status.UNABLE_TO_PERFORM_SUB_OPERATIONS, str(exc)
            assoc.abort()


class Retrieve:
    """C-MOVE and C-GET answered from ``peers``.

    Args:
        peers: the Q/R sources, in the config's order: an operation takes what
            the first source that has anything sends.
        timeout: seconds a source may take between two of its answers.
        ae_title: the router's AE title (it calls a Move Destination with it).
        modalities: where a Move Destination is (``modalities:``).
        client: Redis, shared by the router's hosts.
        spool: where retrieved instances are kept until passed on.
        store_timeout: seconds a C-GET caller may take to answer one C-STORE.
    """

    def __init__(self, peers: Sequence[Peer], timeout: float, ae_title: str, modalities: Mapping[str, Modality],
                 client: redis.Redis, spool: Spool, store_timeout: float = 60.0) -> None:
        self.peers = list(peers)
        self.ae_title = ae_title
        self.timeout = timeout
        self.modalities = dict(modalities)
        self.redis = client
        self.spool = spool
        self.store_timeout = store_timeout
        self.our_titles = frozenset(peer.calling_ae_title for peer in self.peers)

    # -- the ingest's side: sub-operations arriving from a source --

    def retrieve_for(self, originator_ae: str, message_id: int) -> str | None:
        """The operation a C-STORE naming this Move Originator serves: its id; '' when it
        names the router but no operation running (ended, cancelled); None when it is not
        the router's (an ordinary instance).

        Raises:
            redis.RedisError: Redis cannot say.
        """
        if originator_ae not in self.our_titles:
            return None
        operation = self.redis.get(keys.retrieve_origin(originator_ae, message_id))
        return operation.decode() if operation else ""

    def arrived(self, operation: str, path: Path) -> None:
        """An instance for ``operation`` is durable at ``path``: pass it to the operation.

        Raises:
            redis.RedisError: not passed (the caller answers the source a failure).
        """
        key = keys.retrieve_arrivals(operation)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, path.name)  # its name only: hosts may mount the shared spool at other paths
        pipe.expire(key, int(max(3600, 4 * self.timeout)))
        pipe.execute()

    # -- the operations --

    def move(self, caller: Caller, request: DimseRequest) -> None:
        """C-MOVE: every instance to the Move Destination, by the router itself."""
        target = command_ui(request.command, MOVE_DESTINATION).strip()
        modality = self.modalities.get(target)
        if modality is None:
            log.warning("C-MOVE from %s: Move Destination %r is not in modalities:", caller.calling_ae, target)
            caller.respond(request.context_id, c_response(C_MOVE_RSP, request.message_id,
                                                          Status.MOVE_DESTINATION_UNKNOWN, request.sop_class,
                                                          counts=(-1, 0, 0, 0),
                                                          comment=f"Move Destination {target} unknown"))
            return
        destination = Destination(ae_title=target, host=modality.host, port=modality.port, tls=modality.tls,
                                  transfer_syntaxes=modality.transfer_syntaxes)
        sender = Sender(f"C-MOVE to {target}", destination, self.ae_title)
        sender.move_originator = (caller.calling_ae, request.message_id)

        def deliver(path: Path) -> tuple[Outcome, str]:
            try:
                sent = sender.send(path)
            except SendError as exc:
                log.warning("C-MOVE for %s to %s: %s", caller.calling_ae, target, exc)
                return Outcome.FAILED, exc.sop_instance_uid or ""
            warned = category(sent.status) is Category.WARNING
            return (Outcome.WARNING if warned else Outcome.COMPLETED), sent.sop_instance_uid

        try:
            self._retrieve(caller, request, C_MOVE_RSP, deliver, f"to {target}")
        finally:
            sender.close()

    def get(self, caller: Caller, request: DimseRequest) -> None:
        """C-GET: every instance back on the caller's own association."""

        def deliver(path: Path) -> tuple[Outcome, str]:
            return self._store_on_caller(caller, path)

        self._retrieve(caller, request, C_GET_RSP, deliver, "on its association")

    def _store_on_caller(self, caller: Caller, path: Path) -> tuple[Outcome, str]:
        """A C-GET's sub-operation: C-STORE ``path`` on the caller's association, in its
        own transfer syntax when the caller took it, else transcoded to one it took."""
        with open(path, "rb", buffering=0) as fp:
            try:
                info = read_info(fp, path)
            except PermanentSendError as exc:
                log.warning("C-GET for %s: %s", caller.calling_ae, exc)
                return Outcome.FAILED, ""
            contexts = caller.storage_contexts(info.sop_class)
            if not contexts:
                log.warning("C-GET for %s: it took no context for SOP class %s (with the SCP role)",
                            caller.calling_ae, info.sop_class)
                return Outcome.FAILED, info.sop_instance
            chosen = next(((cid, ts) for cid, ts in contexts if ts == info.transfer_syntax), None)
            dataset: tuple | bytes
            if chosen is not None:
                fp.seek(info.offset)
                dataset = (fp, info.stamp[1] - info.offset)
            else:
                dataset = b""
                for cid, ts in contexts:
                    try:
                        dataset, chosen = transcode(path, info.transfer_syntax, ts), (cid, ts)
                        break
                    except PermanentSendError as exc:
                        log.info("C-GET for %s: %s not transcoded to %s: %s", caller.calling_ae,
                                 info.sop_instance, ts, exc)
                if chosen is None:
                    return Outcome.FAILED, info.sop_instance
            context_id, _ = chosen
            message_id = caller.next_message_id()
            status = caller.send_store(context_id, c_store_sub_rq(message_id, info.sop_class, info.sop_instance),
                                       message_id, dataset, self.store_timeout)
        if status is None:
            return Outcome.STOP, info.sop_instance
        kind = category(status)
        if kind is Category.SUCCESS:
            return Outcome.COMPLETED, info.sop_instance
        if kind is Category.WARNING:
            return Outcome.WARNING, info.sop_instance
        log.warning("C-GET for %s: %s refused: %s", caller.calling_ae, info.sop_instance, describe(status))
        return Outcome.FAILED, info.sop_instance

    def _retrieve(self, caller: Caller, request: DimseRequest, response_field: int, deliver: Deliver,
                  where: str) -> None:
        sop_class = request.sop_class
        try:
            identifier = decode(request.dataset, request.transfer_syntax)
        except ValueError as exc:
            log.warning("retrieve from %s: unreadable identifier: %s", caller.calling_ae, exc)
            caller.respond(request.context_id, c_response(response_field, request.message_id,
                                                          Status.UNABLE_TO_PROCESS, sop_class,
                                                          comment="unreadable identifier"))
            return
        move_class = MOVE_FOR.get(request.abstract_syntax, str(sop.StudyRootQueryRetrieveInformationModelMove))
        operation = new_id()
        counts = Counts()
        sources: list[_SourceMove] = []
        cancelled = False
        try:
            for peer in self.peers:
                source = self._start(peer, move_class, identifier, operation)
                sources.append(source)
                cancelled = self._pass_on(caller, request, response_field, deliver, operation, source, sources,
                                          counts)
                if cancelled or caller.gone or source.counts[1] + source.counts[3] or counts.done:
                    break  # this source had it (or the caller stopped): no other is asked
        finally:
            for source in sources:
                source.exchange.cancel()  # a source still sending is told to stop
                self.redis.delete(keys.retrieve_origin(source.peer.calling_ae_title, source.message_id))
            self.redis.delete(keys.retrieve_arrivals(operation))
            self.spool.sweep_retrieved(operation)
        if caller.gone:
            log.info("retrieve for %s: the caller left after %d instance(s)", caller.calling_ae, counts.done)
            return
        source_failed, remaining = _tally(sources, counts)
        failed = counts.failed + source_failed
        if not cancelled:
            failed += remaining  # announced by a source that then failed or broke off: never coming
        comment = ""
        if cancelled:
            status = Status.CANCEL
        elif counts.done == 0 and failed == 0 and any(s.why for s in sources) and all(s.why for s in sources):
            first = next(s for s in sources if s.why)
            status = (first.final if first.final is not None and is_failure(first.final)
                      else Status.UNABLE_TO_PERFORM_SUB_OPERATIONS)
            comment = "; ".join(f"{s.peer.name}: {s.why}" for s in sources if s.why)
        elif failed == 0 and counts.warning == 0:
            status = Status.SUCCESS
        elif counts.completed == 0 and counts.warning == 0:
            status = Status.UNABLE_TO_PERFORM_SUB_OPERATIONS
        else:
            status = Status.SUB_OPERATIONS_WARNING
        if not comment and status != Status.SUCCESS:
            comment = "; ".join(f"{s.peer.name}: {s.why}" for s in sources if s.why)
        dataset = None
        if counts.failed_uids and status != Status.SUCCESS:
            failed_list = Dataset()
            failed_list.FailedSOPInstanceUIDList = counts.failed_uids
            dataset = encode(failed_list, request.transfer_syntax)
        said = ("0xB000 Warning: sub-operations complete, one or more failures or warnings"
                if status == Status.SUB_OPERATIONS_WARNING else describe(status))
        log.info("retrieve for %s %s: %d completed, %d failed, %d warning: %s", caller.calling_ae, where,
                 counts.completed, failed, counts.warning, said)
        caller.respond(request.context_id,
                       c_response(response_field, request.message_id, status, sop_class,
                                  has_dataset=dataset is not None, comment=comment,
                                  counts=(remaining if cancelled else -1, counts.completed, failed, counts.warning)),
                       dataset)

    def _start(self, peer: Peer, sop_class: str, identifier: Dataset, operation: str) -> _SourceMove:
        """Start the C-MOVE to ``peer``, its Message ID registered first so that no
        sub-operation can arrive before it is known."""
        message_id = int(self.redis.incr(keys.RETRIEVE_SEQUENCE)) % 0xFFFF + 1
        self.redis.set(keys.retrieve_origin(peer.calling_ae_title, message_id), operation,
                       ex=int(max(3600, 4 * self.timeout)))
        arrivals = keys.retrieve_arrivals(operation)
        source = _SourceMove(peer, sop_class, identifier, message_id, self.timeout,
                             wake=lambda: self.redis.rpush(arrivals, ""))
        source.start()
        return source

    def _pass_on(self, caller: Caller, request: DimseRequest, response_field: int, deliver: Deliver, operation: str,
                 source: _SourceMove, sources: list[_SourceMove], counts: Counts) -> bool:
        """Pass on what ``source`` sends until it is done; True when the caller cancelled."""
        arrivals = keys.retrieve_arrivals(operation)
        while True:
            if caller.gone:
                return False
            if request.cancelled.is_set():
                return True
            item = self.redis.blpop([arrivals], timeout=CANCEL_POLL)
            if item is None or not item[1]:
                if source.done.is_set() and not self.redis.llen(arrivals):
                    return False  # the source's final response came: everything it sent was passed on
                continue
            name = Path(item[1].decode()).name  # never a path outside the operation's folder
            path = self.spool.retrieved_dir(operation) / name
            try:
                outcome, uid = deliver(path)
            except FileNotFoundError:
                # Another host took it into a spool that is not this one's: a failed sub-operation.
                if not counts.missing:
                    log.warning("retrieve for %s: %s, kept by the ingest that received it, is not in this "
                                "spool (%s): every host on one Redis must share router.spool_dir",
                                caller.calling_ae, name, self.spool.retrieved_dir(operation))
                counts.missing += 1
                outcome, uid = Outcome.FAILED, ""
            path.unlink(missing_ok=True)
            if outcome is Outcome.STOP:
                return False
            if outcome is Outcome.COMPLETED:
                counts.completed += 1
            elif outcome is Outcome.WARNING:
                counts.warning += 1
            else:
                counts.failed += 1
                if uid:
                    counts.failed_uids.append(uid)
            if not source.announced:
                continue  # how many are coming is not known yet: no count that is not true
            source_failed, remaining = _tally(sources, counts)
            caller.respond(request.context_id,
                           c_response(response_field, request.message_id, Status.PENDING, request.sop_class,
                                      counts=(remaining, counts.completed, counts.failed + source_failed,
                                              counts.warning)))
