"""The sender: C-STORE spool files to one destination over a reused association.

Consecutive instances for a destination travel over one association
(PRODUCT.md §5); it is renegotiated only when an instance needs a
presentation context the open one lacks, and released after
``idle_timeout`` seconds without use. Failures are translated here into the
router's exception tree: the caller decides retry or dead letter by type.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import sop_class as sop_class_module
from pynetdicom.association import Association

from router.errors import DestinationUnavailable, PermanentSendError, TransientSendError
from router.settings import Destination
from router.status import category

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: context IDs are odd numbers 1..255

# Offered on every association in the uncompressed syntaxes, so that a burst
# of mixed modalities does not renegotiate per new SOP class (DCMTK's
# storescu offers a similar list); other classes are added when first seen.
COMMON_SOP_CLASSES = """
CTImageStorage EnhancedCTImageStorage MRImageStorage EnhancedMRImageStorage
ComputedRadiographyImageStorage DigitalXRayImageStorageForPresentation
DigitalXRayImageStorageForProcessing DigitalMammographyXRayImageStorageForPresentation
DigitalMammographyXRayImageStorageForProcessing BreastTomosynthesisImageStorage
UltrasoundImageStorage UltrasoundMultiFrameImageStorage SecondaryCaptureImageStorage
MultiFrameGrayscaleByteSecondaryCaptureImageStorage MultiFrameGrayscaleWordSecondaryCaptureImageStorage
MultiFrameTrueColorSecondaryCaptureImageStorage NuclearMedicineImageStorage
PositronEmissionTomographyImageStorage EnhancedPETImageStorage XRayAngiographicImageStorage
EnhancedXAImageStorage XRayRadiofluoroscopicImageStorage RTImageStorage RTDoseStorage
RTStructureSetStorage RTPlanStorage RTIonPlanStorage GrayscaleSoftcopyPresentationStateStorage
BasicTextSRStorage EnhancedSRStorage ComprehensiveSRStorage KeyObjectSelectionDocumentStorage
EncapsulatedPDFStorage RawDataStorage SpatialRegistrationStorage SegmentationStorage
VLPhotographicImageStorage VLEndoscopicImageStorage OphthalmicPhotography8BitImageStorage
DigitalIntraOralXRayImageStorageForPresentation XRay3DAngiographicImageStorage
""".split()
PREFERENCE_UIDS = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "deflate": UID("1.2.840.10008.1.2.1.99"),
    "big-endian": UID("1.2.840.10008.1.2.2"),
}


def _nodelay(event: evt.Event) -> None:
    # Nagle's algorithm costs ~45 ms per C-STORE against DCMTK (shared/notes/peers.md).
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _keep_stray_responses(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0's requestor reactor.

    ``send_c_store`` pauses the reactor by clearing an event and waiting for
    ``_is_paused``; that flag can still be True from the previous pause while
    the reactor is waking, so the reactor may take the next C-STORE-RSP off
    the DIMSE queue, log "Received unexpected C-STORE service message" and
    drop it, and the sender then waits out the DIMSE timeout (seen here under
    load; pynetdicom issue #875 describes the same with C-FIND). A response
    the reactor takes is put back on the queue for the waiting sender.
    """
    serve = assoc._serve_request

    def serve_request(msg, context_id):  # noqa: ANN001, ANN202 - pynetdicom's signature
        if not msg.is_valid_request and msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return None
        return serve(msg, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]


class Sender:
    """One association (opened on demand) toward one destination.

    Args:
        name: the destination's name in the config (for logs).
        destination: its settings.
        calling_ae_title: the AE title the router presents.
    """

    def __init__(self, name: str, destination: Destination, calling_ae_title: str) -> None:
        self.name = name
        self.destination = destination
        self.calling_ae_title = destination.calling_ae_title or calling_ae_title
        self._assoc: Association | None = None
        self._accepted: set[tuple[str, str]] = set()
        self._offered: set[tuple[str, str]] = set()
        # (SOP class, transfer syntax) pairs to propose, most recently used last.
        self._wanted: OrderedDict[tuple[str, str], None] = OrderedDict()
        for keyword in COMMON_SOP_CLASSES:
            self._propose(str(getattr(sop_class_module, keyword)), str(ExplicitVRLittleEndian))
        self._last_used = 0.0
        self._lock = threading.Lock()
        self.associations_opened = 0

    # -- association -------------------------------------------------------

    def _syntaxes_for(self, transfer_syntax: str) -> list[str]:
        """The transfer syntaxes to offer for an instance, in the destination's preference."""
        return [
            transfer_syntax if choice == "as-received" else str(PREFERENCE_UIDS[choice])
            for choice in self.destination.transfer_syntaxes
        ]

    def _propose(self, sop_class: str, transfer_syntax: str) -> None:
        """Add the contexts an instance may need to those the next association offers."""
        for ts in self._syntaxes_for(transfer_syntax):
            self._wanted[(sop_class, ts)] = None
            self._wanted.move_to_end((sop_class, ts))
        while len(self._wanted) > MAX_CONTEXTS:
            self._wanted.popitem(last=False)

    def _open(self) -> Association:
        dest = self.destination
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = dest.connect_timeout
        ae.connection_timeout = dest.connect_timeout
        ae.dimse_timeout = dest.dimse_timeout
        ae.network_timeout = dest.dimse_timeout
        for sop_class, ts in self._wanted:
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            max_pdu=dest.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                raise DestinationUnavailable(f"{self.name}: association rejected by {dest.ae_title}")
            if assoc.is_aborted:
                raise DestinationUnavailable(f"{self.name}: association aborted by {dest.ae_title}")
            raise DestinationUnavailable(f"{self.name}: cannot connect to {dest.host}:{dest.port}")
        _keep_stray_responses(assoc)
        self._offered = set(self._wanted)
        self._accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        self.associations_opened += 1
        log.info("%s: association open to %s@%s:%s", self.name, dest.ae_title, dest.host, dest.port)
        return assoc

    def close(self) -> None:
        """Release the association, if one is open."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            if assoc.is_established:
                assoc.release()
            log.info("%s: association closed", self.name)

    def close_if_idle(self) -> None:
        """Release an association unused for ``idle_timeout`` seconds.

        Called from the maintenance thread: it never waits for a send in
        progress (which holds the lock, and is by definition not idle).
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._assoc is not None and time.monotonic() - self._last_used > self.destination.idle_timeout:
                self._close_locked()
        finally:
            self._lock.release()

    # -- sending -----------------------------------------------------------

    @staticmethod
    def _contexts_of(paths: list[Path]) -> list[tuple[str, str]]:
        found = []
        for path in paths:
            try:
                meta = read_file_meta_info(path)
            except (OSError, ValueError):
                continue  # send() reports it
            found.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        return found

    def ready_for(self, paths: list[Path]) -> bool:
        """Whether the open association already offers what ``paths`` need."""
        with self._lock:
            if self._assoc is None or not self._assoc.is_established:
                return False
            return all(
                (sop, ts) in self._offered
                for sop, received in self._contexts_of(paths)
                for ts in self._syntaxes_for(received)
            )

    def prepare(self, paths: list[Path]) -> None:
        """Propose, up front, the contexts these files will need, so that a
        burst travels over one association instead of renegotiating midway."""
        with self._lock:
            for sop, ts in self._contexts_of(paths):
                self._propose(sop, ts)

    def send(self, path: Path) -> int:
        """C-STORE the spool file at ``path``.

        Returns:
            The destination's status: Success or a warning (it stored the instance).

        Raises:
            DestinationUnavailable: no association could be had.
            TransientSendError: the association broke, or 0xA7xx.
            PermanentSendError: 0xA9xx/0xCxxx, or no transfer syntax the destination takes.
        """
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        transfer_syntax = str(meta.TransferSyntaxUID)
        with self._lock:
            missing = any(
                (sop_class, ts) not in self._offered for ts in self._syntaxes_for(transfer_syntax)
            )
            if missing:
                self._propose(sop_class, transfer_syntax)
            if missing or self._assoc is None or not self._assoc.is_established:
                self._close_locked()
                self._assoc = self._open()
            assoc = self._assoc
            self._last_used = time.monotonic()
            payload = self._payload(path, sop_class, transfer_syntax)
            try:
                rsp = assoc.send_c_store(payload)
            except (RuntimeError, OSError) as exc:
                self._close_locked()
                raise TransientSendError(f"{self.name}: association lost: {exc}") from exc
            if not rsp or "Status" not in rsp:
                self._close_locked()
                raise TransientSendError(f"{self.name}: no C-STORE response (association aborted or timed out)")
        status = int(rsp.Status)
        kind = category(status)
        if kind == "transient":
            raise TransientSendError(f"{self.name}: status 0x{status:04X}", status)
        if kind == "permanent":
            raise PermanentSendError(f"{self.name}: status 0x{status:04X}", status)
        return status

    def _payload(self, path: Path, sop_class: str, transfer_syntax: str):  # noqa: ANN202 - Path or Dataset
        """What to hand pynetdicom: the file itself when its syntax was accepted,
        else a decoded dataset in an uncompressed syntax the destination took."""
        for ts in self._syntaxes_for(transfer_syntax):
            if (sop_class, ts) not in self._accepted:
                continue
            if ts == transfer_syntax:
                return path  # sent in chunks straight from the file, never decoded
            ds = dcmread(path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                try:
                    ds.decompress()
                except Exception as exc:  # pydicom raises several types for codec trouble
                    raise PermanentSendError(f"{self.name}: cannot decompress {transfer_syntax}: {exc}") from exc
            # pynetdicom re-encodes an uncompressed dataset in whichever
            # uncompressed syntax the destination accepted.
            return ds
        if not any(sop == sop_class for sop, _ in self._accepted):
            raise PermanentSendError(f"{self.name}: SOP class {sop_class} not accepted by {self.destination.ae_title}")
        raise PermanentSendError(
            f"{self.name}: none of {self.destination.transfer_syntaxes} accepted for {transfer_syntax}"
        )
