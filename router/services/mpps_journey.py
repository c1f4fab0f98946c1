"""What an MPPS message's journey and counters say, written where an instance's are.

Each N-CREATE and N-SET gets a history of its own (``router/kernel/history.py``,
keyed by its message id): received from the modality, then per destination
sent (relayed live or delivered from the hold, with the status), failed (held:
not reachable, or a transient refusal: tried again) or dead (refused for good).
So ``dicom-router journey UID`` and the dashboard's journeys find it by its SOP
Instance UID, and its steps are among the recent ones. Each outcome also counts
in ``dicom_router_mpps_messages_total{destination,outcome}``.

Identifiers only (UIDs, AE titles, destination names, statuses), never the
data set. Redis is not the truth about held messages (the files are): a step
Redis cannot take is logged and the message goes on.
"""

from __future__ import annotations

import logging

import redis

from router.kernel import history, telemetry
from router.kernel.dimse import N_CREATE_RQ
from router.kernel.telemetry import MppsOutcome
from router.services.mpps_hold import HeldMessage

log = logging.getLogger(__name__)


def command_name(command_field: int) -> str:
    return "N-CREATE" if command_field == N_CREATE_RQ else "N-SET"


def _write(client: redis.Redis, message_id: str, what: str, write) -> None:  # noqa: ANN001
    try:
        pipe = client.pipeline(transaction=False)
        write(pipe)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("MPPS message %s: %s not recorded in its journey: %s", message_id, what, exc)


def received(client: redis.Redis, message: HeldMessage, destinations: list[str]) -> None:
    """The modality's message, and where it is relayed."""
    def write(pipe) -> None:  # noqa: ANN001
        history.received(pipe, message.message_id, message.sop_instance, message.sop_class, message.source,
                         at=message.received_at)
        history.routed(pipe, message.message_id, destinations,
                       f"MPPS {command_name(message.command_field)} relayed to {', '.join(destinations)}")
    _write(client, message.message_id, "its receipt", write)


def answered(client: redis.Redis, message_id: str, destination: str, status: int, seconds: float,
             live: bool) -> None:
    """``destination`` took it (Success or a warning), while the modality waited or from the hold."""
    def write(pipe) -> None:  # noqa: ANN001
        history.sent(pipe, message_id, destination, status, seconds, awaiting_commitment=False)
        telemetry.count_mpps(pipe, destination, MppsOutcome.RELAYED if live else MppsOutcome.DELIVERED)
    _write(client, message_id, "its delivery", write)


def held(client: redis.Redis, message_id: str, destination: str, reason: str, status: int | None = None,
         first: bool = True) -> None:
    """Kept for ``destination`` (``first``: just now), or tried from the hold and kept again."""
    def write(pipe) -> None:  # noqa: ANN001
        history.failed(pipe, message_id, destination, status, reason)
        if first:
            telemetry.count_mpps(pipe, destination, MppsOutcome.HELD)
    _write(client, message_id, "its hold", write)


def refused(client: redis.Redis, message_id: str, destination: str, status: int | None, reason: str) -> None:
    """``destination`` refused it for good (the modality heard it, or it came from the hold)."""
    def write(pipe) -> None:  # noqa: ANN001
        history.dead(pipe, message_id, destination, status, reason)
        telemetry.count_mpps(pipe, destination, MppsOutcome.REFUSED)
    _write(client, message_id, "its refusal", write)
