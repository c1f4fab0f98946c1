"""The ingest SCP: accept associations, spool every C-STORE durably, queue it.

A C-STORE is answered Success only once the instance is fsynced in the spool
(docs/guarantees.md, G1); handing it to Redis comes after and may fail without
losing anything, because the reconciler re-queues whatever sits in the
spool (docs/guarantees.md, G3). The peer's bytes are spooled as they came, never decoded.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from router.ingest import acceptance
from router.ingest.commitment import CommitmentService, commitment_context
from router.ingest.commitment_scp import ModalityCommitments
from router.ingest.redis_gate import RedisGate, queue_for_routing
from router.ingest.store import Store, StoreHandler
from router.ingest.verification import echo_status
from router.kernel import filemeta
from router.kernel.commitment import STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE, Report, decode_report, report_dataset
from router.kernel.dimse import configure_pynetdicom
from router.kernel.dispatch import Dispatcher
from router.kernel.implementation import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from router.kernel.settings import RouterSettings
from router.kernel.spool import Spool
from router.kernel.status import Status
from router.kernel.syntaxes import VERIFICATION_SYNTAXES

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, no reason given
# (PS3.8 §9.3.4): a caller outside the allowed networks.
_REJECT_NETWORK = (0x01, 0x01, 0x01)


class _GuardedACSE(ACSE):
    """pynetdicom's ACSE, refusing callers from networks not allowed."""

    allows: Callable[[str], bool] = staticmethod(lambda address: True)

    def _negotiate_as_acceptor(self) -> None:
        address = self.assoc.requestor.address
        if not self.allows(address):
            log.warning("refused association from %s: address not in router.accept.networks", address)
            self.send_reject(*_REJECT_NETWORK)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        # Take the first transfer syntax DICOM defines that the peer proposed,
        # as the fast engine does (router/ingest/acceptance.py).
        request = self.requestor.primitive
        request.presentation_context_definition_list = acceptance.defined_syntaxes_only(
            request.presentation_context_definition_list)
        super()._negotiate_as_acceptor()


class _RequestHandler(RequestHandler):
    """Sets TCP_NODELAY and the network guard on every accepted connection."""

    def _create_association(self):  # noqa: ANN202 - pynetdicom's own signature
        # Without TCP_NODELAY every C-STORE-RSP waits for a delayed ACK:
        # ~45 ms per instance against DCMTK (docs/measurements.md).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc = super()._create_association()
        acse = _GuardedACSE(assoc)
        acse.allows = self.server.allows_address  # type: ignore[attr-defined]
        assoc.acse = acse
        return assoc


class _Server(ThreadedAssociationServer):
    allows_address: Callable[[str], bool]


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: the answer the fast engine gives too (:mod:`router.ingest.verification`)."""
    return echo_status()


def handle_store(event: evt.Event, stores: StoreHandler, dispatcher: Dispatcher, gate: RedisGate,
                 ae_title: str) -> int:
    """C-STORE: the decision the fast engine makes too (:class:`router.ingest.store.StoreHandler`),
    on the buffer pynetdicom assembled; then queue for routing."""
    request = event.request
    assoc = event.assoc
    store = Store(
        message_id=int(request.MessageID or 0),
        context_id=int(event.context.context_id),
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        transfer_syntax=str(event.context.transfer_syntax),
        context_class=str(event.context.abstract_syntax),
    )
    origin = filemeta.Origin(
        calling_ae_title=assoc.requestor.ae_title,
        called_ae_title=assoc.requestor.primitive.called_ae_title if assoc.requestor.primitive else ae_title,
        source_ip=assoc.requestor.address,
        source_port=assoc.requestor.port,
    )
    stores.begin(store, origin)
    body = request.DataSet.getbuffer()
    try:
        stores.write(store, body)
    finally:
        body.release()
    source = f"{origin.calling_ae_title}@{origin.source_ip}"
    status, spool_id = stores.finish(store, source)
    if spool_id is not None:
        queue_for_routing(dispatcher, gate, spool_id, store.sop_instance_uid, store.sop_class_uid,
                          origin.calling_ae_title, origin.source_ip)
    return status


def handle_event_report(event: evt.Event, commitments: CommitmentService) -> tuple[int, None]:
    """N-EVENT-REPORT: a destination's storage commitment report, as the fast engine takes it."""
    caller = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
    try:
        report = decode_report(event.request.EventInformation.getvalue(), str(event.context.transfer_syntax))
    except (ValueError, AttributeError) as exc:
        log.warning("commitment report from %s: %s", caller, exc)
        return Status.PROCESSING_FAILURE, None
    return commitments.take_report(report, caller), None


_GLANCE = 0.05
"""s between looks for a release request while a report awaits its answer."""


class _Released(Exception):
    """The peer asked to release the association while we awaited its answer."""


class _AnswersOnly:
    """The blocking ``get_msg`` of one association's DIMSE provider, taking answers only.

    pynetdicom's ``send_n_event_report`` pauses the association's reactor,
    sends, then takes the *next* message off the association's queue as its
    answer. A modality that goes on storing on that association may send its
    next C-STORE-RQ before it answers our report: pynetdicom would take that
    request for the answer, and the modality would never get its C-STORE-RSP.
    Installed on the association, a blocking get (only ``send_*`` calls block;
    the reactor polls) takes the first answer or end-of-association marker and
    leaves every request in the queue, in order, for the reactor once it
    resumes. ``lock`` lets one report at a time await its answer.

    A modality that releases instead of answering (its A-RELEASE-RQ waits
    for the paused reactor) ends the wait at once with :class:`_Released`,
    where pynetdicom would wait out its DIMSE timeout and then abort.
    """

    def __init__(self, dimse) -> None:
        self.dimse = dimse
        self.poll = dimse.get_msg
        self.lock = threading.Lock()
        self.message_id = 0  # of our reports on this association, counted under ``lock``

    @classmethod
    def install(cls, assoc: Association) -> _AnswersOnly:
        current = assoc.dimse.__dict__.get("get_msg")
        if isinstance(current, cls):
            return current
        installed = assoc.dimse.get_msg = cls(assoc.dimse)  # this association's provider only
        return installed

    def __call__(self, block: bool = False):
        if not block:
            return self.poll(block=False)
        messages = self.dimse.msg_queue
        timeout = self.dimse.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with messages.not_empty:
            while True:
                for index, item in enumerate(messages.queue):
                    message = item[1]
                    if message is None or getattr(message, "MessageIDBeingRespondedTo", None) is not None:
                        del messages.queue[index]
                        messages.not_full.notify()
                        return item
                if self._release_requested():
                    raise _Released
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None, None
                messages.not_empty.wait(_GLANCE if remaining is None else min(remaining, _GLANCE))

    def _release_requested(self) -> bool:
        """An A-RELEASE-RQ waits for the reactor (looked at, left for the reactor to take)."""
        waiting = self.dimse.assoc.dul.peek_next_pdu()
        return isinstance(waiting, A_RELEASE) and waiting.result is None


class _AssociationChannel:
    """A modality's association as the way back for its commitment report.

    pynetdicom's ``send_n_event_report`` pauses the association's reactor
    while it sends and waits for the answer, so the reporter thread may call
    it while the association serves the modality's own requests; with
    :class:`_AnswersOnly` installed, those requests wait their turn instead
    of being taken for the answer.
    """

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.answers = _AnswersOnly.install(assoc)

    def send_report(self, report: Report) -> int | None:
        with self.answers.lock:
            if not self.assoc.is_established:
                return None
            self.answers.message_id += 1
            try:
                answer, _ = self.assoc.send_n_event_report(report_dataset(report), report.event_type,
                                                           STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE,
                                                           msg_id=self.answers.message_id)
            except _Released:
                self.assoc._reactor_checkpoint.set()  # pynetdicom's send_* resumes its reactor only on return
                log.info("commitment report %s: the modality released its association instead of answering",
                         report.transaction_uid)
                return None
            except (RuntimeError, ValueError) as exc:  # released meanwhile, or no context for it
                log.warning("commitment report %s on the association: %s", report.transaction_uid, exc)
                return None
        return int(answer.Status) if "Status" in answer else None


def handle_action(event: evt.Event, commitments: CommitmentService) -> tuple[int, None]:
    """N-ACTION: a modality's storage commitment request, as the fast engine takes it."""
    request = event.request
    info = request.ActionInformation
    return commitments.take_request(
        int(request.ActionTypeID or 0), str(request.RequestedSOPInstanceUID or ""),
        info.getvalue() if info is not None else b"", str(event.context.transfer_syntax),
        event.assoc.requestor.ae_title, event.assoc.requestor.address, _AssociationChannel(event.assoc)), None


class IngestServer:
    """The ingest SCP, built from settings and bound to a spool and a dispatcher."""

    def __init__(self, settings: RouterSettings, spool: Spool, dispatcher: Dispatcher,
                 commitments: CommitmentService | None = None) -> None:
        configure_pynetdicom()
        self.settings = settings
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self.ae.maximum_pdu_size = settings.max_pdu
        self.ae.network_timeout = settings.network_timeout
        self.ae.maximum_associations = settings.max_associations
        self.ae.require_calling_aet = list(settings.accept.calling_ae_titles)
        self.ae.add_supported_context(Verification, VERIFICATION_SYNTAXES)
        commitment = commitment_context()
        self.ae.add_supported_context(commitment.abstract_syntax, commitment.transfer_syntax,
                                      scu_role=True, scp_role=True)
        for context in acceptance.storage_contexts():
            self.ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        self.spool = spool
        self.dispatcher = dispatcher
        self.gate = RedisGate()
        self.stores = StoreHandler(spool, settings.ae_title)
        self.commitments = commitments or CommitmentService(
            spool, dispatcher, [], ModalityCommitments(settings, spool, dispatcher.redis, {}))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def open_associations(self) -> int:
        return len(self.ae.active_associations)

    def start(self) -> None:
        """Bind and serve in a background thread."""
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.stores, self.dispatcher, self.gate, self.settings.ae_title]),
            (evt.EVT_N_EVENT_REPORT, handle_event_report, [self.commitments]),
            (evt.EVT_N_ACTION, handle_action, [self.commitments]),
        ]
        contexts: list[PresentationContext] = self.ae.supported_contexts
        server = _Server(
            self.ae,
            (self.settings.host, self.settings.port),
            self.settings.ae_title,
            contexts,
            evt_handlers=handlers,
            request_handler=_RequestHandler,
        )
        server.allows_address = self.settings.accept.allows_address
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ingest-scp", daemon=True)
        self._thread.start()
        self.ae._servers.append(server)
        self.commitments.start()
        log.info("ingest SCP %s listening on %s:%s", self.settings.ae_title, self.settings.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.ae.shutdown()
        self.commitments.stop()
