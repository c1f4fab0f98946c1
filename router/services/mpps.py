"""The router as MPPS SCP (Modality Performed Procedure Step, PS3.4 Annex F.7):
each N-CREATE and N-SET relayed to every ``mpps.forward`` destination, in the
order received per SOP Instance UID (docs/mpps.md).

While the modality waits, the message goes to each destination at once,
unless that destination still holds earlier messages of the same procedure
step: then it is held behind them. A destination that cannot be reached (no
association, or no answer in ``mpps.timeout``) has the message held for it,
durably, before the modality hears anything (``router/services/mpps_hold.py``);
the :class:`~router.services.mpps_delivery.MppsDeliverer` sends it later, in
order. What the modality hears:

* a destination answered a failure: that status, with an Error Comment naming it;
* else the first destination's answer that came while it waited (its
  Attribute List included, encoded for the modality's context);
* else (every one held) Success, once every copy is on disk;
* the spool full: 0xA700 (Out of Resources), never Success.

An N-CREATE without an Affected SOP Instance UID gets one here (PS3.7
§10.1.5.1.2 lets the SCP choose it); it goes upstream and back in the N-CREATE-RSP.
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from router.kernel.dimse import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    N_CREATE_RQ,
    REQUESTED_SOP_CLASS_UID,
    REQUESTED_SOP_INSTANCE_UID,
    RESPONSE_BIT,
    command_ui,
    n_set_create_response,
)
from router.kernel.errors import DestinationUnavailable, PermanentSendError, SpoolFull, TransientSendError
from router.kernel.operation import Caller, DimseRequest
from router.kernel.settings import Config
from router.kernel.spool import Spool, new_id
from router.kernel.status import Status, describe
from router.kernel.uids import uid_problem
from router.services import mpps_journey as journey
from router.services.identifiers import decode, encode
from router.services.mpps_delivery import MppsDeliverer, UpstreamAnswer, Verdict, exchange, verdict_of
from router.services.mpps_hold import HeldMessage, MppsHold
from router.services.sources import Peer

log = logging.getLogger(__name__)

UNDEFINED_LENGTH = 0xFFFFFFFF  # a sequence or item delimited instead (PS3.5 §7.5)


@dataclass(frozen=True)
class _Outcome:
    """What became of a message with one destination while the modality waited."""

    destination: str
    answer: UpstreamAnswer | None = None
    """It answered (taken or refused)."""
    held: bool = False
    refusal: str = ""
    """Why it was refused without an answer (it does not take MPPS at all)."""
    not_kept: str = ""
    """Why it could not be held (the spool is full)."""


@dataclass(frozen=True)
class _Reply:
    status: int
    sop_instance: str = ""
    dataset: bytes | None = None
    comment: str = ""


class MppsRelay:
    """The MPPS operation the ingest calls for each N-CREATE-RQ and N-SET-RQ
    (``router/services/registry.py``), and the delivery of what it holds.

    Args:
        config: the router's config (``mpps:``, its destinations, the router's AE title).
        spool: where messages are held.
        client: Redis (the delivery lock across hosts, journeys, counters).
    """

    def __init__(self, config: Config, spool: Spool, client: redis.Redis) -> None:
        settings = config.mpps
        assert settings is not None
        self.peers = [Peer.of(name, config.destinations[name], config.router.ae_title) for name in settings.forward]
        self.timeout = settings.timeout
        self.client = client
        self.hold = MppsHold(spool)
        self.deliverer = MppsDeliverer(self.peers, self.hold, client, settings.retry, settings.timeout)
        self._pool = ThreadPoolExecutor(max_workers=4 * len(self.peers), thread_name_prefix="mpps-relay")

    def start(self) -> None:
        """Deliver what was held before (the files say what), and what is held from now on."""
        self.deliverer.start()

    def stop(self) -> None:
        self.deliverer.stop()
        self._pool.shutdown(wait=False)

    def __call__(self, caller: Caller, request: DimseRequest) -> None:
        """Relay ``request`` and send the modality exactly one answer."""
        try:
            reply = self._relay(caller, request)
        except Exception:  # noqa: BLE001 - the modality must hear something; a bug is logged whole
            log.exception("MPPS %s from %s failed", journey.command_name(request.command_field), caller.calling_ae)
            reply = _Reply(Status.PROCESSING_FAILURE, comment="the router failed to relay it")
        command = n_set_create_response(request.command_field | RESPONSE_BIT, request.message_id, reply.status,
                                        request.abstract_syntax, reply.sop_instance, reply.dataset is not None,
                                        reply.comment)
        if not caller.respond(request.context_id, command, reply.dataset):
            log.info("MPPS %s %s: the answer to %s was not sent: association gone",
                     journey.command_name(request.command_field), reply.sop_instance, caller.calling_ae)

    def _relay(self, caller: Caller, request: DimseRequest) -> _Reply:
        what = journey.command_name(request.command_field)
        if request.command_field == N_CREATE_RQ:
            sop_class = command_ui(request.command, AFFECTED_SOP_CLASS_UID) or request.abstract_syntax
            uid = command_ui(request.command, AFFECTED_SOP_INSTANCE_UID)
            if not uid:
                uid = str(generate_uid())
                log.info("MPPS N-CREATE from %s without Affected SOP Instance UID: the router gives it %s",
                         caller.calling_ae, uid)
        else:
            sop_class = command_ui(request.command, REQUESTED_SOP_CLASS_UID) or request.abstract_syntax
            uid = command_ui(request.command, REQUESTED_SOP_INSTANCE_UID)
        problem = uid_problem("SOP Instance UID", uid)
        if problem is not None:
            log.warning("MPPS %s from %s refused: %s", what, caller.calling_ae, problem)
            return _Reply(Status.INVALID_OBJECT_INSTANCE, comment=problem)
        if sop_class != request.abstract_syntax:
            log.warning("MPPS %s %s from %s refused: SOP class %s on a context of %s", what, uid, caller.calling_ae,
                        sop_class, request.abstract_syntax)
            return _Reply(Status.SOP_CLASS_NOT_SUPPORTED, uid, comment="SOP class differs from the context's")
        dataset = request.dataset or None
        if dataset is not None and not _whole(dataset, request.transfer_syntax):
            log.warning("MPPS %s %s from %s refused: its data set (%d bytes) is not a whole data set in %s", what,
                        uid, caller.calling_ae, len(dataset), request.transfer_syntax)
            return _Reply(Status.PROCESSING_FAILURE, uid, comment="data set unreadable")
        message = HeldMessage(new_id(), request.command_field, sop_class, uid, request.transfer_syntax, dataset,
                              f"{caller.calling_ae}@{caller.peer_ip}", time.time())
        journey.received(self.client, message, [peer.name for peer in self.peers])
        outcomes = list(self._pool.map(lambda peer: self._relay_to(peer, message), self.peers))
        reply = self._reply(message, outcomes, request.transfer_syntax)
        log.info("MPPS %s %s from %s: %s; answered %s", what, uid, caller.calling_ae,
                 ", ".join(_told(outcome) for outcome in outcomes), describe(reply.status))
        return reply

    def _relay_to(self, peer: Peer, message: HeldMessage) -> _Outcome:
        """``message`` to one destination now, or held for it."""
        if self.hold.holds_for(peer.name, message.sop_instance):
            return self._keep(peer, message, "earlier messages of its SOP Instance are held for it")
        try:
            assoc, context_id, syntax = peer.associate(message.sop_class, self.timeout)
        except DestinationUnavailable as exc:
            return self._keep(peer, message, f"not reachable: {exc}")
        except PermanentSendError as exc:
            journey.refused(self.client, message.message_id, peer.name, None, str(exc))
            return _Outcome(peer.name, refusal=f"{peer.name} does not take MPPS")
        try:
            answer = exchange(assoc, context_id, syntax, message, self.timeout)
        except PermanentSendError as exc:
            journey.refused(self.client, message.message_id, peer.name, None, str(exc))
            return _Outcome(peer.name, refusal=f"not re-encoded for {peer.name}")
        except TransientSendError as exc:
            return self._keep(peer, message, f"no answer: {exc}")
        finally:
            assoc.release()
        if verdict_of(message.command_field, answer.status, from_hold=False) == Verdict.TAKEN:
            journey.answered(self.client, message.message_id, peer.name, answer.status, answer.seconds, live=True)
        else:
            journey.refused(self.client, message.message_id, peer.name, answer.status,
                            "refused while the modality waited: it was told")
        return _Outcome(peer.name, answer=answer)

    def _keep(self, peer: Peer, message: HeldMessage, reason: str) -> _Outcome:
        """Hold ``message`` for ``peer``: durable before the modality hears Success."""
        try:
            self.hold.hold(peer.name, message)
        except (SpoolFull, OSError) as exc:
            log.error("MPPS %s %s not held for %s (%s): %s", journey.command_name(message.command_field),
                      message.sop_instance, peer.name, reason, exc)
            journey.refused(self.client, message.message_id, peer.name, Status.OUT_OF_RESOURCES,
                            f"{reason}; not held: {exc}")
            why = "spool full" if isinstance(exc, SpoolFull) else "spool write failed"
            return _Outcome(peer.name, not_kept=f"{why}: not held for {peer.name}")
        journey.held(self.client, message.message_id, peer.name, f"{reason}; held, delivered later in order")
        self.deliverer.wake()
        return _Outcome(peer.name, held=True)

    def _reply(self, message: HeldMessage, outcomes: list[_Outcome], caller_syntax: str) -> _Reply:
        uid = message.sop_instance
        for outcome in outcomes:
            if outcome.not_kept:
                return _Reply(Status.OUT_OF_RESOURCES, uid, comment=outcome.not_kept)
        for outcome in outcomes:
            if outcome.refusal:
                return _Reply(Status.PROCESSING_FAILURE, uid, comment=outcome.refusal)
            answer = outcome.answer
            if answer is not None and verdict_of(message.command_field, answer.status, False) != Verdict.TAKEN:
                why = answer.comment or describe(answer.status)
                return _Reply(answer.status, uid, comment=f"{outcome.destination}: {why}")
        first = next((outcome.answer for outcome in outcomes if outcome.answer is not None), None)
        if first is None:
            return _Reply(Status.SUCCESS, uid)
        return _Reply(first.status, uid, _for_caller(first, caller_syntax))


def _whole(data: bytes, transfer_syntax: str) -> bool:
    """Whether ``data`` is a whole data set in ``transfer_syntax``.

    pydicom reads what it can: a value cut short is taken as it is, and explicit
    VR that is not there is read as implicit. So each element, in every item of
    every sequence too, must hold the length its header gives (PS3.5 §7.1) and be
    in the syntax's VR encoding; nothing is a data set of no element.
    """
    implicit = UID(transfer_syntax).is_implicit_VR
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of what is checked here
            dataset = decode(data, transfer_syntax)
            return len(dataset) > 0 and _lengths_hold(dataset, implicit)
    except Exception:  # noqa: BLE001 - pydicom raises many types for garbage
        return False


def _lengths_hold(dataset: Dataset, implicit: bool) -> bool:
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if isinstance(raw, RawDataElement):
            if raw.is_implicit_VR != implicit:
                return False
            if raw.length != UNDEFINED_LENGTH and len(raw.value or b"") != raw.length:
                return False
        element = dataset[tag]
        if element.VR == "SQ" and not all(_lengths_hold(item, implicit) for item in element.value):
            return False
    return True


def _for_caller(answer: UpstreamAnswer, caller_syntax: str) -> bytes | None:
    """A destination's Attribute List encoded for the modality's context (left out if unreadable)."""
    if answer.dataset is None or answer.transfer_syntax == caller_syntax:
        return answer.dataset
    try:
        return encode(decode(answer.dataset, answer.transfer_syntax), caller_syntax)
    except ValueError:
        log.warning("MPPS answer's Attribute List (%d bytes) unreadable in %s: left out", len(answer.dataset),
                    answer.transfer_syntax)
        return None


def _told(outcome: _Outcome) -> str:
    """One destination's outcome for the log line (statuses, never the data set)."""
    if outcome.answer is not None:
        return f"{outcome.destination} {describe(outcome.answer.status)}"
    if outcome.held:
        return f"{outcome.destination} held"
    return f"{outcome.destination} {outcome.refusal or outcome.not_kept}"
