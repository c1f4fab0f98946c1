"""MPPS relay (placeholder until the relay lands): every message refused."""

from __future__ import annotations

from router.kernel.dimse import RESPONSE_BIT, n_set_create_response
from router.kernel.operation import Caller, DimseRequest
from router.kernel.status import Status


class MppsRelay:
    def __init__(self, config, spool, client) -> None:  # noqa: ANN001
        pass

    def __call__(self, caller: Caller, request: DimseRequest) -> None:
        caller.respond(request.context_id, n_set_create_response(
            request.command_field | RESPONSE_BIT, request.message_id, Status.PROCESSING_FAILURE, request.sop_class, "",
            False))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
