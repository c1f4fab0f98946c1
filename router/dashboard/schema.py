"""The JSON API's answers as pydantic models, so that ``/api/openapi.json`` gives each one a
concrete schema and clients can be generated from it.

Each route names its model as ``response_model``: FastAPI checks every answer
against it before it leaves. Models forbid fields they do not declare, so a
view that grows a field without its model is a server error in the tests
(tests/app/test_dashboard_api.py), never a field the document hides.
Times are epoch seconds; identifiers only, never patient data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from router.kernel.health import State
from router.kernel.telemetry import FailureClass


class Answer(BaseModel):
    """Base of the API's answers: every field declared."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Answer):
    """Why a request could not be answered (FastAPI's ``HTTPException``)."""

    detail: str


NOT_FOUND = {404: {"model": ErrorDetail, "description": "No such destination, or nothing recorded (or quarantined) under that id"}}


class RedisState(Answer):
    reachable: bool
    problem: str | None = Field(description="Where Redis was looked for and what it said, when it did not answer")


class RouterIdentity(Answer):
    ae_title: str
    port: int


class Totals(Answer):
    received: int = Field(description="Instances received and made durable")
    forwarded: int = Field(description="Deliveries: instances a destination acknowledged, counted once per "
                                       "destination (one instance sent to three destinations counts three)")
    failed: int = Field(description="Sends that failed, of every status class; a connection or association "
                                    "that failed (class `unreachable`) counts too")


class MinuteTotals(Answer):
    start: int = Field(description="The minute's start, epoch seconds")
    received: int
    forwarded: int = Field(description="Deliveries, counted per destination")
    failed: int


class Overview(Answer):
    router: RouterIdentity
    redis: RedisState
    totals: Totals
    error_rate: float = Field(ge=0, le=1, description="failed / (forwarded + failed): the share of sends that failed")
    per_minute: list[MinuteTotals] = Field(description="The last hour, oldest minute first (empty while Redis is away)")
    associations_open: dict[str, int] = Field(description="Per direction: `in` (ingest), `out` (to destinations)")
    waiting: dict[str, int] = Field(description="Instances on disk per queue: `route`, then each destination")
    unavailable: list[str] = Field(description="Destinations held, or down (their last C-ECHO failed)")
    quarantine: int
    dead_letters: int


class CommitmentTransaction(Answer):
    uid: str
    instances: int
    request: int = Field(description="1 for the first request, 2 for the first re-request, ...")
    due_in_seconds: float
    sop_instance_uids: list[str] = Field(description="The first few")
    spool_ids: list[str] = Field(description="The first few")


class CommitmentBacklog(Answer):
    awaiting: int = Field(description="Instances stored at the destination, not yet committed")
    transactions: list[CommitmentTransaction] = Field(description="The first ten open transactions")
    open_transactions: int


class DestinationRow(Answer):
    name: str
    ae_title: str
    address: str = Field(description="host:port, or a DICOMweb destination's URL")
    on_disk: int = Field(description="Instances waiting for it in the spool")
    pending: int | None = Field(description="Queued; null while Redis is away")
    delayed: int | None = Field(description="Due for a retry later; null while Redis is away")
    inflight: int | None = Field(description="Being sent; null while Redis is away")
    dead: int = Field(description="Its dead letters")
    oldest_age_seconds: float | None = Field(description="Since the oldest waiting instance was received")
    last_dead_status: str | None = Field(description="The last dead letter's DICOM status, in words")
    state: State
    held_until: float | None = Field(description="When its hold is over and it is probed with C-ECHO")
    failures: int | None = Field(description="Back-off steps of the current hold")
    last_error: str | None = Field(description="Why its last send failed (no association, or an instance "
                                               "refused or unanswered); C-ECHOs are told apart in last_echo_*")
    last_error_at: float | None
    last_ok: float | None = Field(description="When it last acknowledged an instance")
    last_echo: float | None = Field(description="When it was last C-ECHOed (a probe, the periodic check-up)")
    last_echo_ok: bool | None
    last_echo_error: str | None = Field(description="Why the last C-ECHO failed, while it did")
    delivered: int | None = Field(description="Deliveries to it (instances it acknowledged); null while Redis is away")
    mpps_held: int | None = Field(None, description="MPPS messages held for it, to be delivered in order; null when "
                                                    "it is not an mpps.forward destination")
    failed_sends: dict[FailureClass, int] | None = Field(
        description="Sends to it that failed, per status class; null while Redis is away")
    commitment: CommitmentBacklog | None = Field(description="Null unless it commits (storage_commitment)")


class EchoAnswer(Answer):
    destination: str
    ok: bool
    message: str
    milliseconds: float | None


class DeadLetterView(Answer):
    destination: str
    spool_id: str
    reason: str
    attempts: int
    since: float
    sop_instance_uid: str
    status: int | None = Field(description="The destination's last DIMSE status for it")
    status_text: str | None = Field(description="That status in words, e.g. `0xA900 Data Set Does Not Match SOP Class`")
    unmorphed: bool = Field(description="Its morph failed at routing: a retry morphs it again")
    study_instance_uid: str | None = Field(description="From the file's header")


class RetryAnswer(Answer):
    requeued: int
    kept: list[tuple[str, str]] = Field(description="(spool id, why) of dead letters whose morph failed again")
    holds_ended: list[str] = Field(description="Destinations whose back-off this retry ended")
    redis_problem: str | None = Field(description="Set when the files were moved back but Redis could not be "
                                                  "told: the router's reconciliation queues them")


class PurgeAnswer(Answer):
    purged: int


class QuarantineItem(Answer):
    spool_id: str
    sop_instance_uid: str | None = Field(description="As the ingest recorded it in the file's meta")
    reason: str
    since: float | None = Field(description="When it was received")


class RerouteAnswer(Answer):
    requeued: int = Field(description="Quarantined instances handed back to routing")
    kept: list[tuple[str, str]] = Field(description="(spool id, why) of instances that stay in quarantine: still "
                                                    "no whole dataset, still unreadable, or no rule sends them anywhere")
    redis_problem: str | None = Field(description="Set when the files went back to incoming/ but Redis could not be "
                                                  "told: the router's reconciliation routes them")


class CommitmentReport(Answer):
    transaction_uid: str
    calling_ae: str
    address: str = Field(description="The modality's IP address, as it called")
    references: int = Field(description="Instances it asked about")
    created: float = Field(description="When it asked (its N-ACTION)")
    deadline: float = Field(description="When what is still undecided is reported failed")
    state: Literal["deciding", "report ready", "retrying"]
    attempts: int = Field(description="Deliveries of the report that failed")
    next_attempt: float | None
    problem: str | None = Field(description="Why the last delivery failed")
    host: str = Field(description="The host whose ingest reports it (a shared spool: each host reports its own, "
                                  "and takes over those of a host that is gone)")


class JourneyStep(Answer):
    at: float
    step: str = Field(description="received, routed, quarantined, dropped, sent, failed, dead, committed, "
                                  "commit_failed, or an operator's action: retried, purged, re-routed")
    destination: str = Field(description="Empty for steps of no one destination")
    status: int | None = Field(description="The DIMSE status, where there was one")
    detail: str
    spool_id: str


class InstanceJourney(Answer):
    spool_id: str
    sop_instance_uid: str | None
    journey: list[JourneyStep]


class RuleView(Answer):
    name: str
    forward: list[str]
    final: bool
    hits: int = Field(description="Instances it matched")


class UnroutedForward(Answer):
    forward: list[str]


class ReloadView(Answer):
    at: float
    generation: int
    ok: bool = Field(description="False: the edit was invalid and the running rules were kept")
    message: str


class RulesView(Answer):
    rules: list[RuleView]
    unrouted: str | UnroutedForward = Field(description="`keep`, `drop`, or where unmatched instances go")
    last_reload: ReloadView | None
