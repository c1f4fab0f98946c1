"""A pynetdicom modality that asks the router for storage commitment, for the tests.

It sends C-STOREs, then an N-ACTION (Storage Commitment Push Model) on the
same association, and takes the router's N-EVENT-REPORT either on that
association (kept open) or, once it has released, on a new association to
its own listening port, where it accepts the router's SCP/SCU role
selection (PS3.4 §J.3.3). DCMTK has no commitment SCU, and Orthanc as the
modality is tested too (tests/test_commitment_scp_e2e.py).
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel

from router.kernel.commitment.messages import (
    COMMITMENT_SYNTAXES,
    WELL_KNOWN_INSTANCE,
    Reference,
    Report,
    decode_report,
    new_transaction_uid,
)
from tests.peers import LOOPBACK

ROUTER_AE = "DICOM_ROUTER"
N_EVENT_REPORT_RSP = 0x8100  # Command Field (PS3.7 §E.1)
COMMAND_LAST = 0x03  # message control header: a command set's last fragment (PS3.8 §E.2)


def command_field(command: bytes) -> int | None:
    """Command Field (0000,0100) of a command set (Implicit VR Little Endian, PS3.7 §6.3.1)."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        if (group, element) == (0x0000, 0x0100) and length == 2:
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    return None


class Modality:
    """``ae_title`` of the modality; ``listen_port`` set: it also listens for reports."""

    def __init__(self, ae_title: str = "MODALITY", listen_port: int | None = None) -> None:
        self.ae_title = ae_title
        self.reports: queue.Queue[tuple[Report, str]] = queue.Queue()
        """(report, "same" or "new" association) as they arrive."""
        self.listen_port = listen_port
        self._server = None
        self._assoc = None
        self.released: bool | None = None
        """Whether the last association given up after the N-ACTION was released properly."""
        self._answered = threading.Semaphore(0)
        """Released once per N-EVENT-REPORT-RSP on the wire: pynetdicom answers after the handler
        returns, and fires EVT_DIMSE_SENT before it queues the answer's PDU, so a release asked for
        on that event could overtake the answer (the router then rightly keeps the report)."""

    def _on_report(self, event: evt.Event, how: str) -> tuple[int, None]:
        report = decode_report(event.request.EventInformation.getvalue(), str(event.context.transfer_syntax))
        self.reports.put((report, how))
        return 0x0000, None

    def _on_pdu_sent(self, event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            for item in event.pdu.presentation_data_value_items:
                data = item.presentation_data_value
                if data[0] & COMMAND_LAST == COMMAND_LAST and command_field(data[1:]) == N_EVENT_REPORT_RSP:
                    self._answered.release()

    def _handlers(self, how: str) -> list:
        return [(evt.EVT_N_EVENT_REPORT, self._on_report, [how]), (evt.EVT_PDU_SENT, self._on_pdu_sent)]

    def listen(self) -> None:
        """Accept the router's report on a new association (its SCP role)."""
        ae = AE(self.ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, list(COMMITMENT_SYNTAXES), scu_role=True, scp_role=True)
        self._server = ae.start_server((LOOPBACK, self.listen_port), block=False, evt_handlers=self._handlers("new"))

    def stop(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _associate(self, port: int, datasets: Sequence[Dataset], called_ae: str):
        ae = AE(self.ae_title)
        ae.dimse_timeout = 20  # a C-STORE-RQ the router never answers fails the test, not hangs it
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}))
        ae.add_requested_context(StorageCommitmentPushModel, list(COMMITMENT_SYNTAXES))
        assoc = ae.associate(LOOPBACK, port, ae_title=called_ae, evt_handlers=self._handlers("same"))
        assert assoc.is_established, "the router refused the association"
        return assoc

    @staticmethod
    def _store_and_ask(assoc, datasets: Sequence[Dataset], extra: Sequence[Reference] = ()
                       ) -> tuple[int, str, list[Reference]]:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, status
        refs = [Reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets] + list(extra)
        uid = new_transaction_uid()
        action = Dataset()
        action.TransactionUID = uid
        action.ReferencedSOPSequence = []
        for ref in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ref.sop_class, ref.sop_instance
            action.ReferencedSOPSequence.append(item)
        answer, _ = assoc.send_n_action(action, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        return (int(answer.Status) if "Status" in answer else -1), uid, refs

    def store_and_request(self, port: int, files: Sequence[Path], extra: Sequence[Reference] = (),
                          keep_open: bool = True, called_ae: str = ROUTER_AE) -> tuple[int, str, list[Reference]]:
        """C-STORE ``files``, then ask to commit them and ``extra``.

        Returns:
            The N-ACTION-RSP status, the Transaction UID, and the references asked for.
        """
        datasets = [pydicom.dcmread(f) for f in files]
        assoc = self._associate(port, datasets, called_ae)
        answer = self._store_and_ask(assoc, datasets, extra)
        if keep_open:
            self._assoc = assoc
        else:
            assoc.release()
            self.released = assoc.is_released  # False: it ended otherwise (aborted, timed out)
        return answer

    def store_and_request_in_turns(self, port: int, batches: Sequence[Sequence[Path]],
                                   called_ae: str = ROUTER_AE) -> list[tuple[int, str, list[Reference]]]:
        """On one association kept open: each batch C-STOREd, then asked to commit,
        without waiting for its report, so reports cross the next batch's C-STOREs."""
        batches = [[pydicom.dcmread(f) for f in batch] for batch in batches]
        self._assoc = self._associate(port, [ds for batch in batches for ds in batch], called_ae)
        return [self._store_and_ask(self._assoc, batch) for batch in batches]

    def report(self, timeout: float) -> tuple[Report, str]:
        """The next report and the association it came on ("same" or "new"), once it has
        been answered: a modality stopped right after could otherwise take the answer with
        it, and the router would rightly keep the report to send again."""
        found = self.reports.get(timeout=timeout)
        if not self._answered.acquire(timeout=timeout):
            raise AssertionError(f"the report {found[0].transaction_uid} was never answered")
        return found
