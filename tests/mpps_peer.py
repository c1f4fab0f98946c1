"""MPPS peers for the tests, written with pynetdicom: an MPPS SCP that records what
arrives, and a modality that sends N-CREATE and N-SET.

No packaged MPPS SCP exists here (Orthanc has none, DCMTK has no MPPS SCP), so
:class:`MppsPeer` stands for a RIS or PACS: a real listening socket on loopback,
in a thread of the test process, that keeps every N-CREATE and N-SET in the
order it came (command, SOP Instance UID, data set) and answers the status it
is told to. :class:`MppsModality` is the modality, on a real association to the
router, and reads each answer's command set whole (the Affected SOP Instance
UID an N-CREATE-RSP carries is not in pynetdicom's status).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import N_CREATE_RSP, N_SET_RSP
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from tests.peers import LOOPBACK, free_port

MPPS = str(ModalityPerformedProcedureStep)
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@dataclass(frozen=True)
class Arrived:
    """One message as the SCP received it."""

    command: str
    """``N-CREATE`` or ``N-SET``."""
    sop_instance: str
    dataset: Dataset | None
    calling_ae: str
    status: int
    """What the SCP answered."""


class MppsPeer:
    """An MPPS SCP on ``port`` (a free one by default) that records and answers.

    Args:
        status: what it answers every message, until :meth:`answer` says otherwise.
        echo_status: on Success, its N-CREATE-RSP carries an Attribute List
            (Performed Procedure Step Status, as an SCP may return it).
    """

    def __init__(self, ae_title: str = "MPPS_SCP", port: int | None = None, status: int = 0x0000,
                 echo_status: bool = True) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.status = status
        self.comment = ""
        self.echo_status = echo_status
        self.arrived: list[Arrived] = []
        self._next: list[int] = []
        self._changed = threading.Condition()
        self._server = None

    def start(self) -> MppsPeer:
        ae = AE(ae_title=self.ae_title)
        ae.network_timeout = 30
        ae.add_supported_context(MPPS, SYNTAXES)
        handlers = [(evt.EVT_N_CREATE, self._on_create), (evt.EVT_N_SET, self._on_set)]
        self._server = ae.start_server((LOOPBACK, self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> MppsPeer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def answer(self, status: int, comment: str = "") -> None:
        """Answer every message from now on with ``status`` (and this Error Comment)."""
        with self._changed:
            self.status, self.comment = status, comment

    def answer_next(self, *statuses: int) -> None:
        """Answer the next messages with ``statuses``, one each, then as before."""
        with self._changed:
            self._next.extend(statuses)

    def _record(self, command: str, sop_instance: str, dataset: Dataset | None, event: evt.Event):
        with self._changed:
            status, comment = (self._next.pop(0), "") if self._next else (self.status, self.comment)
            self.arrived.append(Arrived(command, sop_instance, dataset, event.assoc.requestor.ae_title, status))
            self._changed.notify_all()
        answer = Dataset()
        answer.Status = status
        if comment:
            answer.ErrorComment = comment
        return answer

    def _on_create(self, event: evt.Event):
        dataset = event.attribute_list
        answer = self._record("N-CREATE", str(event.request.AffectedSOPInstanceUID), dataset, event)
        reply = None
        if answer.Status == 0 and self.echo_status and "PerformedProcedureStepStatus" in dataset:
            reply = Dataset()
            reply.PerformedProcedureStepStatus = dataset.PerformedProcedureStepStatus
        return answer, reply

    def _on_set(self, event: evt.Event):
        return self._record("N-SET", str(event.request.RequestedSOPInstanceUID), event.modification_list, event), None

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Arrived]:
        """The first ``count`` messages, once that many have arrived.

        Raises:
            AssertionError: fewer within ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.arrived) >= count, timeout):
                raise AssertionError(f"{self.ae_title}: {len(self.arrived)} MPPS message(s) within {timeout} s, "
                                     f"expected {count}")
            return list(self.arrived)


@dataclass(frozen=True)
class Answered:
    """The router's N-CREATE-RSP or N-SET-RSP as the modality read it."""

    status: int
    sop_instance: str
    """Its Affected SOP Instance UID."""
    comment: str
    dataset: Dataset | None


class MppsModality:
    """A modality on one association to the router, sending MPPS messages."""

    def __init__(self, port: int, called_ae: str, ae_title: str = "MODALITY", syntax: str = SYNTAXES[0]) -> None:
        ae = AE(ae_title=ae_title)
        ae.dimse_timeout = 60  # longer than the router's connect and answer timeouts together
        ae.add_requested_context(MPPS, [syntax])
        self._responses: list[Dataset] = []
        handlers = [(evt.EVT_DIMSE_RECV, self._on_received)]
        self.assoc = ae.associate(LOOPBACK, port, ae_title=called_ae, evt_handlers=handlers)
        assert self.assoc.is_established, "the router refused the association"
        self._message_id = 0

    def _on_received(self, event: evt.Event) -> None:
        if isinstance(event.message, (N_CREATE_RSP, N_SET_RSP)):
            self._responses.append(event.message.command_set)

    def _answered(self, status: Dataset, dataset: Dataset | None) -> Answered:
        assert "Status" in status, "no answer from the router"
        command = self._responses[-1]
        return Answered(int(status.Status), str(command.get("AffectedSOPInstanceUID", "")),
                        str(status.get("ErrorComment", "")), dataset)

    def create(self, dataset: Dataset, sop_instance: str | None) -> Answered:
        """N-CREATE (no Affected SOP Instance UID when ``sop_instance`` is None)."""
        self._message_id += 1
        status, reply = self.assoc.send_n_create(dataset, MPPS, sop_instance, msg_id=self._message_id)
        return self._answered(status, reply)

    def set(self, dataset: Dataset, sop_instance: str) -> Answered:
        self._message_id += 1
        status, reply = self.assoc.send_n_set(dataset, MPPS, sop_instance, msg_id=self._message_id)
        return self._answered(status, reply)

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def in_progress(accession: str = "ACC1") -> Dataset:
    """An N-CREATE's Attribute List: a procedure step begun (PS3.4 F.7.2.1, abridged)."""
    ds = Dataset()
    ds.PatientName = "Test^Mpps"
    ds.PatientID = "MPPS-1"
    ds.PerformedProcedureStepID = f"PPS-{accession}"
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedProcedureStepStartDate = time.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = time.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    step = Dataset()
    step.AccessionNumber = accession
    step.StudyInstanceUID = "1.2.826.0.1.3680043.10.511.1"
    ds.ScheduledStepAttributesSequence = [step]
    return ds


def completed() -> Dataset:
    """An N-SET's Modification List: the procedure step completed."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = time.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = time.strftime("%H%M%S")
    return ds
