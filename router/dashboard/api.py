"""The JSON API under ``/api/``: everything the dashboard shows and does, described at ``/api/openapi.json``.

Views and actions are :class:`router.operations.Operator`'s, the same the CLI
uses; counters, per-minute series and rule hits are the telemetry the router
records in Redis (``router/kernel/telemetry.py``), the recent steps are its
instances' histories (``router/kernel/history.py``), read through the same
connection. Identifiers
only: no patient names or IDs cross this API.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.dashboard.schema import (
    NOT_FOUND,
    CommitmentReport,
    DeadLetterView,
    DestinationRow,
    EchoAnswer,
    InstanceJourney,
    JourneyStep,
    Overview,
    PurgeAnswer,
    QuarantineItem,
    RerouteAnswer,
    RetryAnswer,
    RulesView,
)
from router.kernel import history, telemetry
from router.kernel.health import State
from router.operations import NotQuarantined, Operator, RedisUnavailable, UnknownDestination

api = APIRouter(prefix="/api")

MINUTES = 60
"""The overview's chart: received and forwarded per minute over the last hour."""
UID_PATTERN = r"^[ -.0-\[\]-~]{1,64}$"
"""A UID, an accession number (SH, 16) or a spool id: printable ASCII but the path separators,
64 at most — what the ingest accepts as a UID (``router/kernel/uids.py``), so any instance it
took can be looked up, 64 hex characters or a letter in a component included."""

Uid = Annotated[str, Field(pattern=UID_PATTERN)]


def _operator(request: Request) -> Operator:
    return request.app.state.operator


def _unknown(exc: UnknownDestination | NotQuarantined) -> HTTPException:
    return HTTPException(status_code=404, detail=str(exc))


def _actor(request: Request) -> str:
    """Who asked for an action, for its record: the dashboard's token (the one identity it
    knows) or, on a loopback dashboard without one, this host; and the client's address."""
    who = "dashboard token" if request.app.state.access.token else "dashboard (loopback, no token)"
    return f"{who} from {request.client.host if request.client else '?'}"


@api.get("/overview", response_model=Overview,
         summary="Totals, per-minute series over the last hour, error rate, spool and Redis state")
def overview(request: Request) -> dict[str, Any]:
    operator = _operator(request)
    view = operator.queues()
    totals = {"received": 0, "forwarded": 0, "failed": 0}
    minutes: list[dict[str, Any]] = []
    associations: dict[str, int] = {}
    if (conn := operator.live_redis()) is not None:
        counters = telemetry.counters(conn, list(operator.config.destinations))
        totals = {"received": sum(counters.received.values()), "forwarded": sum(counters.forwarded.values()),
                  "failed": sum(counters.failed.values())}
        minutes = [asdict(minute) for minute in telemetry.per_minute(conn, minutes=MINUTES)]
        associations = telemetry.associations_open(conn)
    attempts = totals["forwarded"] + totals["failed"]
    return {
        "router": {"ae_title": operator.config.router.ae_title, "port": operator.config.router.port},
        "redis": view["redis"],
        "totals": totals,
        "error_rate": round(totals["failed"] / attempts, 4) if attempts else 0.0,
        "per_minute": minutes,
        "associations_open": associations,
        "waiting": {row["queue"]: row["on_disk"] for row in view["queues"]},
        "unavailable": [row["name"] for row in view["destinations"] if row["state"] in (State.HELD, State.DOWN)],
        "quarantine": view["quarantine"],
        "dead_letters": view["dead_letters"],
    }


@api.get("/destinations", response_model=list[DestinationRow],
         summary="Per destination: what waits, deliveries and failed sends, health, last send error, last C-ECHO")
def destinations(request: Request) -> list[dict[str, Any]]:
    return _operator(request).queues()["destinations"]


@api.post("/destinations/{name}/echo", response_model=EchoAnswer, responses=NOT_FOUND,
          summary="C-ECHO a configured destination")
def echo(request: Request, name: str) -> dict[str, Any]:
    try:
        return asdict(_operator(request).echo(name))
    except UnknownDestination as exc:
        raise _unknown(exc) from exc


@api.get("/dead-letters", response_model=list[DeadLetterView], responses=NOT_FOUND,
         summary="Dead letters, oldest first, with their reason, status in words and study")
def dead_letters(request: Request, destination: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    try:
        return _operator(request).dead_letters(destination, limit=limit)
    except UnknownDestination as exc:
        raise _unknown(exc) from exc


class Selection(BaseModel):
    """Which dead letters: one or more spool ids, a whole study, or all of a destination (or a combination,
    which narrows). An empty selection is refused: "all dead letters" is said with ``all: true``."""

    model_config = ConfigDict(extra="forbid")

    destination: str | None = None
    spool_ids: list[Uid] = Field(default_factory=list, max_length=10000)
    study_instance_uid: Uid | None = None
    all: bool = False

    @model_validator(mode="after")
    def _says_which(self) -> Selection:
        if not (self.destination or self.spool_ids or self.study_instance_uid or self.all):
            raise ValueError("name a destination, spool_ids or a study_instance_uid (or all: true)")
        return self


def _selected(operator: Operator, selection: Selection):  # noqa: ANN202
    try:
        return operator.select(selection.destination, selection.spool_ids, selection.study_instance_uid)
    except UnknownDestination as exc:
        raise _unknown(exc) from exc


@api.post("/dead-letters/retry", response_model=RetryAnswer, responses=NOT_FOUND,
          summary="Send the selected dead letters again; end their destinations' back-off")
def retry(request: Request, selection: Selection) -> dict[str, Any]:
    operator = _operator(request)
    letters = _selected(operator, selection)
    # Whose back-off ends: the named destination, every one for "all", else those of the chosen letters.
    if selection.destination:
        scope = [selection.destination]
    elif selection.all:
        scope = list(operator.config.destinations)
    else:
        scope = sorted({letter.destination for letter in letters})
    return asdict(operator.retry(letters, scope, actor=_actor(request)))


@api.post("/dead-letters/purge", response_model=PurgeAnswer, responses=NOT_FOUND,
          summary="Delete the selected dead letters for good")
def purge(request: Request, selection: Selection) -> dict[str, Any]:
    operator = _operator(request)
    return {"purged": operator.purge(_selected(operator, selection), actor=_actor(request))}


@api.get("/quarantine", response_model=list[QuarantineItem], summary="What was quarantined, with its reason")
def quarantine(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    return _operator(request).quarantine(limit=limit)


class QuarantineSelection(BaseModel):
    """Which quarantined instances: spool ids, or ``all: true`` (an empty selection is refused)."""

    model_config = ConfigDict(extra="forbid")

    spool_ids: list[Uid] = Field(default_factory=list, max_length=10000)
    all: bool = False

    @model_validator(mode="after")
    def _says_which(self) -> QuarantineSelection:
        if not (self.spool_ids or self.all):
            raise ValueError("name spool_ids (or all: true)")
        return self


def _quarantined(operator: Operator, selection: QuarantineSelection):  # noqa: ANN202
    try:
        return operator.select_quarantined(selection.spool_ids)
    except NotQuarantined as exc:
        raise _unknown(exc) from exc


@api.post("/quarantine/re-route", response_model=RerouteAnswer, responses=NOT_FOUND,
          summary="Route the selected quarantined instances again under the current rules; those that would "
                  "only come back stay, with why")
def reroute(request: Request, selection: QuarantineSelection) -> dict[str, Any]:
    operator = _operator(request)
    return asdict(operator.reroute(_quarantined(operator, selection), actor=_actor(request)))


@api.post("/quarantine/purge", response_model=PurgeAnswer, responses=NOT_FOUND,
          summary="Delete the selected quarantined instances for good")
def purge_quarantined(request: Request, selection: QuarantineSelection) -> dict[str, Any]:
    operator = _operator(request)
    return {"purged": operator.purge_quarantined(_quarantined(operator, selection), actor=_actor(request))}


@api.get("/commitment-reports", response_model=list[CommitmentReport],
         summary="Storage commitment reports owed to modalities, oldest first, with where each stands")
def commitment_reports(request: Request) -> list[dict[str, Any]]:
    return _operator(request).commitment_reports()


@api.get("/instances", response_model=list[InstanceJourney],
         summary="Instances whose SOP, Series or Study Instance UID or Accession Number is q, "
                 "newest first, each with its journey")
def instances(request: Request, q: Annotated[str, Query(pattern=UID_PATTERN)],
              limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[dict[str, Any]]:
    try:
        return _operator(request).journeys(q, limit=limit)
    except RedisUnavailable:
        return []


@api.get("/instances/{spool_id}/journey", response_model=list[JourneyStep], responses=NOT_FOUND,
         summary="The journey of one received instance")
def journey(request: Request, spool_id: Annotated[str, PathParam(pattern=UID_PATTERN)]) -> list[dict[str, Any]]:
    try:
        steps = _operator(request).journey(spool_id)
    except RedisUnavailable:
        steps = []
    if not steps:
        raise HTTPException(status_code=404, detail=f"no journey recorded for {spool_id}")
    return steps


@api.get("/recent", response_model=list[JourneyStep], summary="The latest steps of instances' journeys, newest first")
def recent(request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    conn = _operator(request).live_redis()
    if conn is None:
        return []
    return [asdict(step) for step in history.recent(conn, limit=limit)]


@api.get("/rules", response_model=RulesView, summary="The rules with their hit counts, and the result of the last reload")
def rules(request: Request) -> dict[str, Any]:
    operator = _operator(request)
    conn = operator.live_redis()
    hits = telemetry.rule_hit_counts(conn) if conn is not None else {}
    reload = telemetry.last_reload(conn) if conn is not None else None
    return {
        "rules": [{"name": rule.name, "forward": list(rule.forward), "final": rule.final,
                   "hits": hits.get(rule.name, 0)} for rule in operator.config.rules],
        "unrouted": operator.config.unrouted if isinstance(operator.config.unrouted, str)
        else {"forward": list(operator.config.unrouted.forward)},
        "last_reload": asdict(reload) if reload is not None else None,
    }
