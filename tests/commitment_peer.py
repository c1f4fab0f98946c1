"""A Storage + Storage Commitment SCP for the tests, written with pynetdicom.

Orthanc reports commitment only on a new association; other archives report
on the association the N-ACTION came on while it is open. This peer does the
latter, with the misbehaviours a router must survive: it reports late, or
reports the first transaction all failed. It stores nothing on disk: it
remembers which SOP instances it received, and commits only those.
"""

from __future__ import annotations

import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import StorageCommitmentPushModel

from router.kernel.commitment.messages import (
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    WELL_KNOWN_INSTANCE,
)
from tests.peers import LOOPBACK, free_port

_GLANCE = 0.05
"""s between looks for a release request while a report awaits its answer."""


class _Released(Exception):
    """The peer asked to release the association while we awaited its answer."""


class _AnswersOnly:
    """The blocking ``get_msg`` of one association's DIMSE provider, taking answers only.

    (The test archive's guard against a pynetdicom behaviour; the router's own
    upper layer, ``router/kernel/requestor.py``, never takes a request for an
    answer.)

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


class CommitmentPeer:
    """Args:
    report_delay: seconds between the N-ACTION-RSP and the N-EVENT-REPORT.
    fail_first: report every reference of the first transaction failed (0x0110).
    """

    def __init__(self, ae_title: str = "COMMITSCP", report_delay: float = 0.2, fail_first: bool = False,
                 port: int | None = None) -> None:
        self.ae_title = ae_title
        self.report_delay = report_delay
        self.fail_first = fail_first
        self.port = port or free_port()
        self.stored: dict[str, str] = {}  # SOP Instance UID -> SOP Class UID
        self.store_requests = 0
        self.actions: list[str] = []  # Transaction UIDs asked for, in order
        self.reports: list[tuple[str, int, int]] = []  # (transaction, committed, failed) sent and acknowledged
        self.committed: set[str] = set()  # SOP Instance UIDs reported committed, the report acknowledged
        self.lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.network_timeout = 60
        self.ae.add_supported_context(StorageCommitmentPushModel)
        from pynetdicom import AllStoragePresentationContexts
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax)
        self._server = None

    def start(self) -> CommitmentPeer:
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)]
        self._server = self.ae.start_server((LOOPBACK, self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> CommitmentPeer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.store_requests += 1
            self.stored[str(event.request.AffectedSOPInstanceUID)] = str(event.request.AffectedSOPClassUID)
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        uid = str(request.TransactionUID)
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in request.ReferencedSOPSequence]
        with self.lock:
            first = not self.actions
            self.actions.append(uid)
        fail_all = first and self.fail_first
        # The router stores on while a report is under way: pynetdicom alone would take its
        # next C-STORE-RQ for the report's answer (see _AnswersOnly), and two reports at
        # once would take each other's answers. This peer behaves as an archive should.
        answers = _AnswersOnly.install(event.assoc)
        threading.Thread(target=self._report, args=(event.assoc, answers, uid, refs, fail_all), daemon=True).start()
        return 0x0000, None

    def _report(self, assoc, answers: _AnswersOnly, uid: str, refs: list[tuple[str, str]], fail_all: bool) -> None:
        time.sleep(self.report_delay)
        report = Dataset()
        report.TransactionUID = uid
        committed, failed = [], []
        for sop_class, sop_instance in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            with self.lock:
                known = self.stored.get(sop_instance) == sop_class
            if known and not fail_all:
                committed.append(item)
            else:
                item.FailureReason = PROCESSING_FAILURE if known else NO_SUCH_OBJECT_INSTANCE
                failed.append(item)
        if committed:
            report.ReferencedSOPSequence = committed
        if failed:
            report.FailedSOPSequence = failed
        with answers.lock:  # one report at a time awaits its answer on this association
            if not assoc.is_established:
                return  # the requester went away: this report is lost (it must ask again)
            answers.message_id += 1
            try:
                status, _ = assoc.send_n_event_report(report, EVENT_SOME_FAILED if failed else EVENT_ALL_COMMITTED,
                                                      StorageCommitmentPushModel, WELL_KNOWN_INSTANCE,
                                                      msg_id=answers.message_id)
            except _Released:
                assoc._reactor_checkpoint.set()  # pynetdicom's send_* resumes its reactor only on return
                return  # the requester released instead of answering: this report is lost
            except (RuntimeError, ValueError):
                return  # released meanwhile
        if status and status.get("Status") == 0x0000:
            with self.lock:
                self.reports.append((uid, len(committed), len(failed)))
                self.committed.update(str(item.ReferencedSOPInstanceUID) for item in committed)
