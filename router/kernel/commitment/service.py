"""Storage Commitment on the ingest's associations (PS3.4 Annex J).

Two kinds of message reach the ingest SCP on the Storage Commitment Push
Model context:

* an N-EVENT-REPORT-RQ from a destination the router asked to commit
  (Orthanc always reports on a new association to the requester's port):
  it settles the transaction the forwarding worker recorded
  (:func:`router.kernel.commitment.to_destinations.apply_report`);
* an N-ACTION-RQ from a modality asking the router to commit what it sent
  (the router as the SOP class's SCP): answered at once, reported on later
  by :class:`router.kernel.commitment.from_modalities.ModalityCommitments`.

The association (``router/ingest/fastscp.py``) decodes the message and calls
the one :class:`CommitmentService`.
"""

from __future__ import annotations

import logging

from pynetdicom.presentation import PresentationContext

from router.kernel.commitment.from_modalities import Channel, ModalityCommitments
from router.kernel.commitment.messages import COMMITMENT_SYNTAXES, STORAGE_COMMITMENT_PUSH, Report
from router.kernel.commitment.to_destinations import Transactions, apply_report
from router.kernel.dispatch import Dispatcher
from router.kernel.spool import Spool
from router.kernel.status import Status

log = logging.getLogger(__name__)


def commitment_context() -> PresentationContext:
    """The context the ingest accepts commitment messages on, in either role:
    a destination reporting to us proposes the SCP role for itself (PS3.4
    §J.3.3, SCP/SCU Role Selection), a modality asking us proposes none."""
    context = PresentationContext()
    context.abstract_syntax = STORAGE_COMMITMENT_PUSH
    context.transfer_syntax = list(COMMITMENT_SYNTAXES)
    context.scu_role = True
    context.scp_role = True
    return context


class CommitmentService:
    """What the ingest does with commitment messages.

    Args:
        spool: the spool (its ``commit/`` folders hold the transactions).
        dispatcher: to send again what a destination failed to commit.
        destinations: the configured destinations' names (a report's
            transaction is looked for among them).
        modalities: takes modalities' requests and reports on them.
    """

    def __init__(self, spool: Spool, dispatcher: Dispatcher, destinations: list[str],
                 modalities: ModalityCommitments) -> None:
        self.transactions = Transactions(spool)
        self.dispatcher = dispatcher
        self.destinations = list(destinations)
        self.modalities = modalities

    def start(self) -> None:
        """Start reporting to modalities (their requests left by a previous run too)."""
        self.modalities.start()

    def stop(self) -> None:
        self.modalities.stop()

    def take_request(self, action_type: int, requested_instance: str, data: bytes, transfer_syntax: str,
                     calling_ae: str, address: str, channel: Channel) -> int:
        """A modality's N-ACTION-RQ: the N-ACTION-RSP status (its report follows, on ``channel``
        while that association is open)."""
        return self.modalities.take_action(action_type, requested_instance, data, transfer_syntax, calling_ae,
                                           address, channel)

    def take_report(self, report: Report, caller: str) -> int:
        """A destination's report on a transaction the router asked for: the N-EVENT-REPORT-RSP status.

        A report of no open transaction is answered Success and ignored (it
        was asked again since, and that request's report will settle it):
        refusing it would only make the peer repeat it.
        """
        settled = apply_report(self.transactions, self.dispatcher, self.destinations, report)
        if settled is None:
            log.warning("commitment report %s from %s: no such open transaction; ignored",
                        report.transaction_uid, caller)
        return Status.SUCCESS
