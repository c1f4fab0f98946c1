"""The sender: C-STORE spool files to one destination over a reused association.

Consecutive instances for a destination travel over one association
(docs/guarantees.md, "Association reuse"); it is renegotiated only when an instance needs a
presentation context the open one lacks, and released after
``idle_timeout`` seconds without use. Failures are translated here into the
router's exception tree: the caller decides retry or dead letter by type.

The association is the router's own upper layer,
:class:`router.kernel.requestor.RequestedAssociation` (a blocking socket in
the caller's thread, no pynetdicom reactor). A file whose syntax
the destination accepted is streamed from the spool as it is, without
decoding; its file meta is read once per instance (``ready_for``/
``prepare`` remember it for ``send``). Other DIMSE requests on the same
association (storage commitment's N-ACTION) need only their command set and
``RequestedAssociation.request``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import sop_class as sop_class_module
from pynetdicom.dsutils import split_dataset

from router.kernel.commitment.messages import (
    ACTION_REQUEST_COMMITMENT,
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_PUSH,
    WELL_KNOWN_INSTANCE,
    Reference,
    Report,
    decode_report,
    encode_request,
)
from router.kernel.dimse import (
    COMMAND_FIELD,
    EVENT_TYPE_ID,
    MESSAGE_ID,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    RESPONSE_BIT,
    STATUS,
    c_store_rq,
    c_store_sub_rq,
    command_us,
    n_action_rq,
    n_response,
)
from router.kernel.errors import PermanentSendError, SendError, TransientSendError
from router.kernel.requestor import RequestedAssociation
from router.kernel.settings import Destination
from router.kernel.status import Category, Status, category, describe
from router.kernel.vr import SHORT_VRS
from workers.transcode import transcode

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
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg-2000-lossless": JPEG2000Lossless,
}
FILE_CACHE = 2048  # files whose meta is remembered between ready_for/prepare and send

_META_ELEMENT = struct.Struct("<HH2sH")  # explicit VR LE: group, element, VR, short length


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What sending a spool file needs from its meta (PS3.10 §7.1), read once."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    offset: int  # where the data set starts, after preamble and group 0002
    stamp: tuple[int, int, int]  # (inode, size, mtime ns) of the file it was read from


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii")


def read_info(fp: BinaryIO, path: Path) -> FileInfo:
    """Read the file meta of an open spool file by walking group 0002 by hand.

    The group is always explicit VR little endian after the 128-byte
    preamble and ``DICM`` (PS3.10 §7.1); this costs one small read instead
    of pydicom building a FileMetaDataset. Anything unusual falls back to
    pydicom.

    Raises:
        PermanentSendError: the file has no usable meta (SOP class, instance, syntax).
    """
    stamp = _stamp(os.fstat(fp.fileno()))
    fp.seek(0)
    head = fp.read(4096)
    values: dict[int, bytes] = {}
    try:
        if head[128:132] != b"DICM":
            raise ValueError("no DICM prefix")
        pos = 132
        while True:
            if len(head) < pos + 12:
                head += fp.read(max(4096, pos + 12 - len(head)))
            if len(head) < pos + 8:
                break  # a file of meta only: the data set is empty
            group, element, vr, length = _META_ELEMENT.unpack_from(head, pos)
            if group != 0x0002:
                break
            if vr in SHORT_VRS:
                start = pos + 8
            else:
                (length,) = struct.unpack_from("<I", head, pos + 8)
                start = pos + 12
            if len(head) < start + length:
                head += fp.read(start + length - len(head))
                if len(head) < start + length:
                    raise ValueError("truncated file meta")
            values[element] = head[start : start + length]
            pos = start + length
        info = FileInfo(_uid(values[0x0002]), _uid(values[0x0003]), _uid(values[0x0010]), pos, stamp)
    except (ValueError, KeyError, UnicodeDecodeError, struct.error):
        info = _read_info_with_pydicom(path, stamp)
    if not (info.sop_class and info.sop_instance and info.transfer_syntax):
        raise PermanentSendError(f"{path.name}: file meta lacks SOP class, instance or transfer syntax")
    return info


def _read_info_with_pydicom(path: Path, stamp: tuple[int, int, int]) -> FileInfo:
    try:
        meta = read_file_meta_info(path)
        _, offset = split_dataset(path)
        return FileInfo(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                        str(meta.TransferSyntaxUID), offset, stamp)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises several types for a malformed meta
        raise PermanentSendError(f"{path.name}: unreadable file meta: {exc}") from exc


class Sent(NamedTuple):
    """An instance the destination took: its status (Success or a warning) and the instance."""

    status: int
    sop_instance_uid: str
    sop_class_uid: str = ""
    seconds: float | None = None
    """Its share of the request's time when several travelled in one (STOW-RS); None: timed by the caller."""


def one_by_one(send: Callable[[Path], Sent],
               paths: list[Path]) -> Iterator[Sent | SendError | FileNotFoundError]:
    """``send`` each path as its outcome is asked for: the caller that stops reading sends
    no more. A file gone before it was sent (purged meanwhile) is FileNotFoundError."""
    for path in paths:
        try:
            yield send(path)
        except (SendError, FileNotFoundError) as exc:
            yield exc


ReportHandler = Callable[[Report], int]
"""Takes a destination's storage commitment report; returns the N-EVENT-REPORT-RSP status."""


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
        self._assoc: RequestedAssociation | None = None
        self._offered: set[tuple[str, str]] = set()
        # (SOP class, transfer syntax) pairs to propose, most recently used last.
        self._wanted: OrderedDict[tuple[str, str], None] = OrderedDict()
        for keyword in COMMON_SOP_CLASSES:
            self._propose(str(getattr(sop_class_module, keyword)), str(ExplicitVRLittleEndian))
        self._files: OrderedDict[Path, FileInfo] = OrderedDict()
        self.on_report: ReportHandler | None = None
        """Set by the forwarding side when the destination commits: reports that
        come on this association go there."""
        self._awaiting_until = 0.0  # keep the association open for a report until then
        self._last_used = 0.0
        self._lock = threading.Lock()
        self.associations_opened = 0
        self.move_originator: tuple[str, int] | None = None
        """Set when the instances are a C-MOVE's sub-operations (router/services/retrieve.py):
        the caller's AE title and Message ID, named in each C-STORE-RQ (PS3.7 §9.3.1.1)."""

    # -- association -------------------------------------------------------

    def _syntaxes_for(self, transfer_syntax: str) -> list[str]:
        """The transfer syntaxes to offer for an instance, in the destination's
        preference, then its own: sent as it is, it is faithful, which beats a
        dead letter when the destination takes none of the preferences.

        ``jpeg-lossless`` means JPEG Lossless SV1 (the one this router
        encodes), and also Process 14 with any predictor (.57) for an
        instance already in it: sent as it is rather than re-encoded.
        """
        syntaxes: dict[str, None] = {}
        for choice in self.destination.transfer_syntaxes:
            if choice == "as-received" or (choice == "jpeg-lossless" and transfer_syntax == JPEGLossless):
                syntaxes[transfer_syntax] = None
            if choice != "as-received":
                syntaxes[str(PREFERENCE_UIDS[choice])] = None
        syntaxes[transfer_syntax] = None
        return list(syntaxes)

    def _propose(self, sop_class: str, transfer_syntax: str) -> None:
        """Add the contexts an instance may need to those the next association offers."""
        for ts in self._syntaxes_for(transfer_syntax):
            self._wanted[(sop_class, ts)] = None
            self._wanted.move_to_end((sop_class, ts))
        while len(self._wanted) > MAX_CONTEXTS:
            self._wanted.popitem(last=False)

    def _open(self) -> RequestedAssociation:
        dest = self.destination
        contexts = list(self._wanted)
        if dest.commitment is not None:
            # Storage commitment travels on the same association as the instances.
            contexts = [(STORAGE_COMMITMENT_PUSH, ts) for ts in COMMITMENT_SYNTAXES] + contexts[: MAX_CONTEXTS - 2]
        assoc = RequestedAssociation.negotiate(
            dest.host,
            dest.port,
            calling_ae_title=self.calling_ae_title,
            called_ae_title=dest.ae_title,
            contexts=contexts,
            max_pdu=dest.max_pdu,
            connect_timeout=dest.connect_timeout,
            dimse_timeout=dest.dimse_timeout,
            label=self.name,
            tls=dest.tls,
        )
        self._offered = set(self._wanted)
        assoc.on_request = self._incoming
        self.associations_opened += 1
        log.info("%s: association open to %s@%s:%s", self.name, dest.ae_title, dest.host, dest.port)
        return assoc

    def _is_open(self) -> bool:
        return self._assoc is not None and self._assoc.is_alive()

    @property
    def is_open(self) -> bool:
        """Whether an association is open (a new context then means renegotiating)."""
        with self._lock:
            return self._is_open()

    def close(self) -> None:
        """Release the association, if one is open."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
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
            if self._assoc is None:
                return
            # Reads (and answers) a commitment report that came meanwhile.
            alive = self._assoc.is_alive()
            idle = time.monotonic() - self._last_used > self.destination.idle_timeout
            if alive and idle and time.time() >= self._awaiting_until:
                self._close_locked()
            elif not alive:
                self._assoc = None
        finally:
            self._lock.release()

    # -- file meta ---------------------------------------------------------

    def _info(self, path: Path) -> FileInfo | None:
        """The meta of ``path``, read once and remembered until it is sent."""
        info = self._files.get(path)
        if info is None:
            try:
                with open(path, "rb", buffering=0) as fp:
                    info = read_info(fp, path)
            except (OSError, PermanentSendError):
                return None  # send() reports it
            self._remember(path, info)
        return info

    def _remember(self, path: Path, info: FileInfo) -> None:
        self._files[path] = info
        while len(self._files) > FILE_CACHE:
            self._files.popitem(last=False)

    def ready_for(self, paths: list[Path]) -> bool:
        """Whether the open association already offers what ``paths`` need."""
        with self._lock:
            if not self._is_open():
                return False
            return all(
                (info.sop_class, ts) in self._offered
                for info in map(self._info, paths)
                if info is not None
                for ts in self._syntaxes_for(info.transfer_syntax)
            )

    def prepare(self, paths: list[Path]) -> None:
        """Propose, up front, the contexts these files will need, so that a
        burst travels over one association instead of renegotiating midway."""
        with self._lock:
            for info in map(self._info, paths):
                if info is not None:
                    self._propose(info.sop_class, info.transfer_syntax)

    # -- sending -----------------------------------------------------------

    def send(self, path: Path) -> Sent:
        """C-STORE the spool file at ``path``.

        Returns:
            The destination's status — Success or a warning (it stored the
            instance) — and the instance's SOP Instance UID.

        Raises:
            DestinationUnavailable: no association could be had.
            TransientSendError: the association broke, or 0xA7xx.
            PermanentSendError: 0xA9xx/0xCxxx, an unreadable file meta, or no
                transfer syntax the destination takes.
            Each carries the instance's SOP Instance UID once the file meta was read.
        """
        with self._lock, open(path, "rb", buffering=0) as fp:
            info = self._files.pop(path, None)
            if info is None or info.stamp != _stamp(os.fstat(fp.fileno())):
                info = read_info(fp, path)
            try:
                status = self._send_locked(fp, path, info)
            except SendError as exc:
                exc.sop_instance_uid = info.sop_instance
                raise
        kind = category(status)
        if kind is Category.TRANSIENT:
            raise TransientSendError(f"{self.name}: {describe(status)}", status, info.sop_instance)
        if kind is Category.PERMANENT:
            raise PermanentSendError(f"{self.name}: {describe(status)}", status, info.sop_instance)
        return Sent(status, info.sop_instance, info.sop_class)

    def send_all(self, paths: list[Path]) -> Iterator[Sent | SendError | FileNotFoundError]:
        """One outcome per path, in order (the shape :class:`workers.stow.StowSender` shares)."""
        return one_by_one(self.send, paths)

    # -- storage commitment (PS3.4 Annex J) ---------------------------------

    def request_commitment(self, transaction_uid: str, references: list[Reference], deadline: float) -> None:
        """Send an N-ACTION asking the destination to commit ``references``.

        The transaction must be recorded before this is called: the report
        may come before this returns. The association stays open for a report
        on it until ``deadline`` (epoch seconds) or until it is released.

        Raises:
            DestinationUnavailable, DestinationTimeout, TransientSendError: as for a C-STORE.
            PermanentSendError: the destination does not take Storage Commitment, or refused the request.
        """
        with self._lock:
            if not self._is_open():
                self._close_locked()
                self._assoc = self._open()
            assoc = self._assoc
            self._last_used = time.monotonic()
            context = next(((assoc.contexts[(STORAGE_COMMITMENT_PUSH, ts)], ts) for ts in COMMITMENT_SYNTAXES
                            if (STORAGE_COMMITMENT_PUSH, ts) in assoc.contexts), None)
            if context is None:
                raise PermanentSendError(
                    f"{self.name}: {self.destination.ae_title} does not accept Storage Commitment Push Model")
            context_id, ts = context
            message_id = assoc.next_message_id()
            try:
                rsp = assoc.request(context_id, n_action_rq(message_id, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE,
                                                            ACTION_REQUEST_COMMITMENT),
                                    message_id, encode_request(transaction_uid, references, ts))
            except TransientSendError:
                self._assoc = None
                raise
            self._awaiting_until = max(self._awaiting_until, deadline)
        status = command_us(rsp, STATUS)
        if status != Status.SUCCESS:
            kind = category(status) if status is not None else Category.TRANSIENT
            error = PermanentSendError if kind is Category.PERMANENT else TransientSendError
            raise error(f"{self.name}: storage commitment request refused: {describe(status) if status is not None else 'no status'}",
                        status)

    def _incoming(self, context_id: int, transfer_syntax: str, command: dict[int, bytes], dataset: bytes) -> bytes:
        """Answer a request the destination sends on our association: its commitment report."""
        field = command_us(command, COMMAND_FIELD) or 0
        message_id = command_us(command, MESSAGE_ID) or 0
        event_type = command_us(command, EVENT_TYPE_ID) or 0
        if field != N_EVENT_REPORT_RQ:
            log.warning("%s: request %#06x on our association not performed", self.name, field)
            return _report_response(field | RESPONSE_BIT, message_id, Status.UNRECOGNIZED_OPERATION, 0)
        try:
            report = decode_report(dataset, transfer_syntax)
        except ValueError as exc:
            log.warning("%s: unreadable storage commitment report: %s", self.name, exc)
            return _report_response(N_EVENT_REPORT_RSP, message_id, Status.PROCESSING_FAILURE, event_type)
        status = self.on_report(report) if self.on_report is not None else Status.PROCESSING_FAILURE
        return _report_response(N_EVENT_REPORT_RSP, message_id, status, event_type)

    def _send_locked(self, fp: BinaryIO, path: Path, info: FileInfo) -> int:
        """The C-STORE exchange itself, with the lock held: the destination's status."""
        missing = any((info.sop_class, ts) not in self._offered for ts in self._syntaxes_for(info.transfer_syntax))
        if missing:
            self._propose(info.sop_class, info.transfer_syntax)
        if missing or not self._is_open():
            self._close_locked()
            self._assoc = self._open()
        assoc = self._assoc
        self._last_used = time.monotonic()
        context_id, dataset = self._dataset_for(assoc, fp, path, info)
        message_id = assoc.next_message_id()
        try:
            command = (c_store_rq(message_id, info.sop_class, info.sop_instance) if self.move_originator is None
                       else c_store_sub_rq(message_id, info.sop_class, info.sop_instance, *self.move_originator))
            rsp = assoc.request(context_id, command, message_id, dataset, timeout=self.destination.store_timeout)
        except TransientSendError:
            self._assoc = None  # the association closed itself
            log.info("%s: association closed", self.name)
            raise
        status = command_us(rsp, STATUS)
        if status is None:
            self._close_locked()
            raise TransientSendError(f"{self.name}: C-STORE response without a status")
        return status

    def _accepted(self, assoc: RequestedAssociation, info: FileInfo) -> list[tuple[int, str]]:
        """(context ID, syntax) the peer accepted for this instance, in the
        order of :meth:`_syntaxes_for`.

        Raises:
            PermanentSendError: the peer accepted none (naming the SOP class
                when it took none of its contexts at all).
        """
        accepted = [
            (context_id, ts) for ts in self._syntaxes_for(info.transfer_syntax)
            if (context_id := assoc.contexts.get((info.sop_class, ts))) is not None
        ]
        if accepted:
            return accepted
        if not any(sop == info.sop_class for sop, _ in assoc.contexts):
            raise PermanentSendError(
                f"{self.name}: SOP class {info.sop_class} not accepted by {self.destination.ae_title}")
        raise PermanentSendError(
            f"{self.name}: none of {self.destination.transfer_syntaxes} accepted for {info.transfer_syntax}"
        )

    def _dataset_for(self, assoc: RequestedAssociation, fp: BinaryIO, path: Path,
                     info: FileInfo) -> tuple[int, bytes | tuple[BinaryIO, int]]:
        """The context to send on and the data set to send: the first accepted
        syntax the instance can be had in.

        Its own syntax is streamed from the file, never decoded. A transcoding
        that fails for this instance (an encoder refusing its Photometric
        Interpretation or bit depth, a verification that fails) moves on to
        the next accepted syntax; only when every one fails is it a dead
        letter, whose reason names every attempt.

        Raises:
            PermanentSendError: nothing accepted, or every transcoding failed.
        """
        attempts = []
        for context_id, ts in self._accepted(assoc, info):
            if ts == info.transfer_syntax:
                fp.seek(info.offset)
                return context_id, (fp, info.stamp[1] - info.offset)
            try:
                return context_id, transcode(path, info.transfer_syntax, ts)
            except PermanentSendError as exc:
                log.info("%s: %s not transcoded to %s: %s", self.name, info.sop_instance, ts, exc)
                attempts.append(f"to {UID(ts).name}: {exc}")
        raise PermanentSendError(f"{self.name}: cannot transcode {info.sop_instance}: {'; '.join(attempts)}")


def _report_response(command_field: int, message_id: int, status: int, event_type: int) -> bytes:
    """The answer to a destination's request on our association (its commitment report)."""
    return n_response(command_field, message_id, status, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE,
                      EVENT_TYPE_ID, event_type)
