"""Storage Commitment Push Model (PS3.4 Annex J): its messages, both ways.

The router is the SOP class's SCU toward destinations (it asks a PACS to
commit what it stored) and its SCP toward modalities (it tells a modality
what it may delete). Both sides exchange the same two messages:

* N-ACTION-RQ, Action Type 1, on the well-known instance
  1.2.840.10008.1.20.1.1: a Transaction UID and the references (SOP class,
  SOP instance) to commit (PS3.4 §J.3.2);
* N-EVENT-REPORT-RQ, Event Type 1 (all committed) or 2 (failures): the
  Transaction UID, the committed references, and the failed ones each with a
  Failure Reason (PS3.4 §J.3.3).

This module encodes and decodes their data sets; it never touches a socket.
Their command sets are built with ``router/kernel/dimse.py``'s ``n_action_rq``,
``n_event_report_rq`` and ``n_response``, on :data:`STORAGE_COMMITMENT_PUSH`
and :data:`WELL_KNOWN_INSTANCE`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from router.kernel.uids import uid_problem

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class."""
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP instance, the N-ACTION's Requested SOP Instance (PS3.4 §J.3.2)."""

ACTION_REQUEST_COMMITMENT = 1  # PS3.4 Table J.3-1
EVENT_ALL_COMMITTED = 1  # PS3.4 Table J.3-2: storage commitment request successful
EVENT_SOME_FAILED = 2  # ... complete, failures exist

# Failure Reason (0008,1197), PS3.4 §J.3.3.1.1 / Annex C.14.1.1.
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
RESOURCE_LIMITATION = 0x0213
REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION_UID = 0x0131

COMMITMENT_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
"""The transfer syntaxes the router proposes and accepts for commitment messages."""

MAX_REFERENCES = 10_000
"""References one request or report may carry; a bigger one is refused (a hostile peer)."""


class Reference(NamedTuple):
    """One SOP instance a commitment message refers to."""

    sop_class: str
    sop_instance: str


class Report(NamedTuple):
    """An N-EVENT-REPORT's contents: what was committed and what failed, with why."""

    transaction_uid: str
    committed: list[Reference]
    failed: list[tuple[Reference, int]]

    @property
    def event_type(self) -> int:
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED


def new_transaction_uid() -> str:
    """A fresh Transaction UID (2.25 form: no root to register)."""
    return str(generate_uid(prefix=None))


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def _decode(data: bytes, transfer_syntax: str) -> Dataset:
    """Raises ValueError for bytes that are not a data set in ``transfer_syntax``."""
    if transfer_syntax not in COMMITMENT_SYNTAXES:
        raise ValueError(f"commitment message in transfer syntax {transfer_syntax}")
    try:
        ds = read_dataset(DicomBytesIO(data), transfer_syntax == ImplicitVRLittleEndian, True)
    except Exception as exc:  # pydicom raises many types for malformed data
        raise ValueError(f"unreadable commitment data set: {exc}") from exc
    _uid(ds, "TransactionUID", "Transaction UID")
    return ds


def _uid(ds: Dataset, keyword: str, what: str) -> str:
    """The UID ``keyword`` of ``ds``, by the ingest's own check: a UID accepted with
    an instance is accepted here too.

    Raises:
        ValueError: unreadable, several values (a backslash is PS3.5's value
            delimiter), or refused by :func:`uid_problem`.
    """
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom raises many types for malformed data
        raise ValueError(f"unreadable {what}: {exc}") from exc
    if isinstance(value, MultiValue):
        raise ValueError(f"{what} holds {len(value)} values")
    uid = str(value or "")
    problem = uid_problem(what, uid)
    if problem:
        raise ValueError(problem)
    return uid


def _references(items: Iterable[Reference]) -> list[Dataset]:
    found = []
    for ref in items:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class
        item.ReferencedSOPInstanceUID = ref.sop_instance
        found.append(item)
    return found


def _read_references(ds: Dataset, keyword: str) -> list[Dataset]:
    items = list(ds.get(keyword) or [])
    if len(items) > MAX_REFERENCES:
        raise ValueError(f"{len(items)} references in {keyword} (at most {MAX_REFERENCES})")
    return items


def _reference(item: Dataset) -> Reference:
    return Reference(_uid(item, "ReferencedSOPClassUID", "Referenced SOP Class UID"),
                     _uid(item, "ReferencedSOPInstanceUID", "Referenced SOP Instance UID"))


def encode_request(transaction_uid: str, references: Iterable[Reference], transfer_syntax: str) -> bytes:
    """The N-ACTION-RQ data set (PS3.4 Table J.3-1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = _references(references)
    return _encode(ds, transfer_syntax)


def decode_request(data: bytes, transfer_syntax: str) -> tuple[str, list[Reference]]:
    """Transaction UID and references of an N-ACTION-RQ data set.

    Raises:
        ValueError: not a readable commitment request (no Transaction UID, or too many references).
    """
    ds = _decode(data, transfer_syntax)
    return str(ds.TransactionUID), [_reference(item) for item in _read_references(ds, "ReferencedSOPSequence")]


def encode_report(report: Report, transfer_syntax: str) -> bytes:
    """The N-EVENT-REPORT-RQ data set (PS3.4 Table J.3-2); an empty sequence is left out."""
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.committed:
        ds.ReferencedSOPSequence = _references(report.committed)
    if report.failed:
        items = _references(ref for ref, _ in report.failed)
        for item, (_, reason) in zip(items, report.failed):
            item.FailureReason = reason
        ds.FailedSOPSequence = items
    return _encode(ds, transfer_syntax)


def decode_report(data: bytes, transfer_syntax: str) -> Report:
    """An N-EVENT-REPORT-RQ data set.

    Raises:
        ValueError: not a readable commitment report.
    """
    ds = _decode(data, transfer_syntax)
    committed = [_reference(item) for item in _read_references(ds, "ReferencedSOPSequence")]
    try:
        failed = [(_reference(item), int(item.get("FailureReason") or PROCESSING_FAILURE))
                  for item in _read_references(ds, "FailedSOPSequence")]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unreadable failed reference: {exc}") from exc
    return Report(str(ds.TransactionUID), committed, failed)
