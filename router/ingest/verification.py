"""C-ECHO at the ingest (PS3.4 Annex A, Verification Service Class).

The router answers Success whenever it can take associations: a modality's
engineer uses C-ECHO to test the link, and nothing behind the ingest (Redis,
workers, destinations) is a reason to say otherwise — instances it accepts
are durable in the spool whatever those are doing (docs/guarantees.md, G1).
"""

from __future__ import annotations

from router.kernel.status import Status


def echo_status() -> int:
    """The status of a C-ECHO-RSP."""
    return Status.SUCCESS
