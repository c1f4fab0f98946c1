"""What an operator sees and does: one module behind the CLI (``queues``, ``retry``,
``purge``, ``quarantine``, ``echo``, ``journey``) and the dashboard's JSON API, so that
both say and do the same.

Actions that change or delete data (retry, purge, re-route) name who asked —
the CLI's ``user@host``, the dashboard's token and client address — and are
recorded with it in an INFO log line per instance (ids only) and a step in
each instance's journey (README, "Operations").

Disk-side figures (files per state, the oldest waiting instance's age from
its time-ordered spool id) come from the spool and never need Redis; queue
depths and a destination's health do. When Redis cannot be reached the
views say so in one sentence instead of hanging or failing
(:attr:`Operator.redis_problem`), and retry moves dead letters back all the
same: the router's reconciliation queues them once Redis is back.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom
import redis
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from redis.exceptions import RedisError

from router.ingest.validate import check_dataset
from router.kernel import history, keys, telemetry
from router.kernel.backlog import Backlog
from router.kernel.commitment.from_modalities import Requests
from router.kernel.commitment.to_destinations import Transactions
from router.kernel.dispatch import Dispatcher
from router.kernel.errors import MalformedDataset, TransientSendError
from router.kernel.filemeta import PREAMBLE
from router.kernel.health import destination_health
from router.kernel.settings import Config
from router.kernel.spool import DeadLetter, Quarantined, Spool, id_time
from router.kernel.status import Status, describe
from router.services.mpps_hold import MppsHold

REDIS_CONNECT_TIMEOUT = 2.0
"""Seconds an operator command waits to connect: a Redis that is gone is said so promptly."""
REDIS_TIMEOUT = 5.0
STUDY_INSTANCE_UID = 0x0020000D

log = logging.getLogger(__name__)

_QUEUED_LATER = "Redis not reachable ({}): the router queues them at its next reconciliation"

Progress = Callable[[DeadLetter | Quarantined], None]


class RedisUnavailable(RuntimeError):
    """What was asked needs Redis, which does not answer; the message says where it was looked for."""


class UnknownDestination(ValueError):
    """An operator named a destination the configuration does not have."""


class NotQuarantined(ValueError):
    """An operator named spool ids that are not in quarantine (any more)."""


def _per_version(read: Callable[[str, int, int], str | None], path: Path) -> str | None:
    """``read(path)``, asked again only when the file's size or modification time changed:
    the dashboard lists dead letters and the quarantine every few seconds."""
    try:
        facts = path.stat()
    except OSError:
        return None
    return read(str(path), facts.st_size, facts.st_mtime_ns)


def study_instance_uid(path: Path) -> str | None:
    """The Study Instance UID in a spooled file's header (pixels are not read), None when it has none."""
    return _per_version(_study_instance_uid, path)


def recorded_sop_instance_uid(path: Path) -> str | None:
    """The SOP Instance UID the ingest recorded in a spooled file's meta, None when it has none.

    Read from the file meta alone: a quarantined file that is no whole dataset has it too.
    """
    return _per_version(_recorded_sop_instance_uid, path)


@functools.lru_cache(maxsize=8192)
def _study_instance_uid(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[STUDY_INSTANCE_UID])
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return None
    value = dataset.get("StudyInstanceUID")
    return str(value) if value else None


@functools.lru_cache(maxsize=8192)
def _recorded_sop_instance_uid(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        value = read_file_meta_info(path).get("MediaStorageSOPInstanceUID")
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return None
    return str(value) if value else None


def _dataset_problem(path: Path) -> str | None:
    """Why a spooled file holds no whole dataset (the ingest's structural walk,
    ``router/ingest/validate.py``), or None when it does."""
    try:
        meta = read_file_meta_info(path)
        # The group's elements start after the preamble and (0002,0000) UL, itself 12 bytes.
        offset = len(PREAMBLE) + 12 + int(meta.FileMetaInformationGroupLength)
        check_dataset(path.read_bytes()[offset:], str(meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, ValueError, EOFError, AttributeError, MalformedDataset) as exc:
        return str(exc) or type(exc).__name__
    return None


@dataclass
class RequeueOutcome:
    """What a re-queueing did: instances queued again, ones kept (and why)."""

    requeued: int = 0
    kept: list[tuple[str, str]] = field(default_factory=list)
    """(spool id, why) of instances left where they were."""
    redis_problem: str | None = None
    """Set when the files were moved back but Redis was not reachable to queue them."""


@dataclass
class RetryOutcome(RequeueOutcome):
    """What a retry of dead letters did; ``kept``: those whose morph failed again."""

    holds_ended: list[str] = field(default_factory=list)


@dataclass
class EchoOutcome:
    destination: str
    ok: bool
    message: str
    milliseconds: float | None = None


class Operator:
    """The operator's view of one router: its configuration, spool and (when reachable) Redis.

    Args:
        config: the router's configuration.
        redis_url: the queues' Redis; None when none is configured or running.
    """

    def __init__(self, config: Config, redis_url: str | None) -> None:
        self.config = config
        self.spool = Spool(config.router.spool_dir)
        self.redis_url = redis_url
        self.redis = (redis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
                                           socket_timeout=REDIS_TIMEOUT) if redis_url else None)

    @classmethod
    def of(cls, config: Config, redis_url: str | None = None) -> Operator:
        """The operator view with ``redis_url``, else the config's, else a running ``run``'s embedded Redis."""
        from router.embedded_redis import running_url

        return cls(config, redis_url or config.router.redis_url or running_url(config.router.redis_data_dir))

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    @property
    def redis_problem(self) -> str | None:
        """None when Redis answers; else one sentence an operator can act on."""
        if self.redis is None:
            return "no Redis configured or running: queue depths unknown"
        try:
            self.redis.ping()
        except RedisError as exc:
            return f"Redis at {_redacted(self.redis_url)} is not reachable ({exc}): queue depths unknown"
        return None

    def _telling(self) -> redis.Redis:
        """The connection for telling the router what an action did (queueing, journeys).

        Raises:
            RedisError: no Redis is configured or running.
        """
        if self.redis is None:
            raise RedisError("no Redis configured or running")
        return self.redis

    def _dispatcher(self) -> Dispatcher:
        """A dispatcher on :meth:`_telling`'s connection, queueing the workers' drain job."""
        from workers.runtime import DRAIN_JOB

        return Dispatcher(self._telling(), DRAIN_JOB)

    def live_redis(self) -> redis.Redis | None:
        """The Redis connection when Redis answers, else None (views then show the spool alone)."""
        return self.redis if self.redis_problem is None else None

    # -- journeys -------------------------------------------------------------

    def journeys(self, identifier: str, limit: int = 50) -> list[dict[str, object]]:
        """The instances received with this SOP, Series or Study Instance UID or Accession
        Number (or this spool id), newest first, each with its SOP Instance UID and journey.

        Raises:
            RedisUnavailable: Redis does not answer (nothing can be looked up).
        """
        live = self._answering_redis()
        found = history.find(live, identifier, limit=limit)
        if not found and live.exists(keys.instance(identifier)):
            found = [identifier]
        return [{"spool_id": spool_id, "sop_instance_uid": (record.sop_instance_uid or None) if record else None,
                 "journey": [asdict(step) for step in record.steps] if record else []}
                for spool_id, record in zip(found, history.records(live, found))]

    def journey(self, spool_id: str) -> list[dict[str, object]]:
        """The recorded steps of one received instance in time order (empty when none are recorded).

        Raises:
            RedisUnavailable: Redis does not answer.
        """
        return [asdict(step) for step in history.journey(self._answering_redis(), spool_id)]

    def _answering_redis(self) -> redis.Redis:
        live = self.live_redis()
        if live is None:
            raise RedisUnavailable(self.redis_problem or "Redis unavailable")
        return live

    # -- what waits where ---------------------------------------------------

    def queues(self) -> dict[str, object]:
        """Per queue (route, then each destination): on disk, pending, delayed, in flight, dead;
        per destination its health and commitment backlog; the quarantine; a Redis problem, if any."""
        problem = self.redis_problem
        live = None if problem else self.redis
        dead: dict[str, int] = {}
        for letter in self.spool.dead_letters():
            dead[letter.destination] = dead.get(letter.destination, 0) + 1
        rows = [self._queue_row("route", keys.ROUTE, self.spool.incoming, live, None)]
        rows += [self._queue_row(name, keys.forward(name), self.spool.out_dir(name), live, dead.get(name, 0))
                 for name in self.config.destinations]
        counters = telemetry.counters(live, list(self.config.destinations)) if live is not None else None
        return {
            "redis": {"reachable": problem is None, "problem": problem},
            "queues": rows,
            "destinations": [self.destination(name, live, dead.get(name, 0), counters)
                             for name in self.config.destinations],
            "quarantine": len(self.spool.quarantine_reasons()),
            "dead_letters": sum(dead.values()),
            "commitment_reports": self.commitment_reports(),
            "mpps": self.mpps_held(),
        }

    def mpps_held(self) -> list[dict[str, object]]:
        """Per ``mpps.forward`` destination: MPPS messages held for it (waiting to be delivered
        in order), the oldest one's age, and those set aside as refused (docs/mpps.md); from
        the spool alone."""
        if self.config.mpps is None:
            return []
        hold = MppsHold(self.spool)
        rows = []
        for name in self.config.mpps.forward:
            waiting = hold.waiting(name)
            oldest = id_time(waiting[0].name.partition("_")[0]) if waiting else None
            rows.append({"destination": name, "held": len(waiting), "refused": hold.refused_count(name),
                         "oldest_age_seconds": round(time.time() - oldest, 1) if oldest else None})
        return rows

    def _queue_row(self, label: str, backlog: str, folder: Path, live: redis.Redis | None,
                   dead: int | None) -> dict[str, object]:
        on_disk = self.spool.ids_in(folder)
        depth = Backlog(live, backlog).depth() if live is not None else {}
        oldest = id_time(on_disk[0]) if on_disk else None
        return {"queue": label, "on_disk": len(on_disk), "pending": depth.get("pending"),
                "delayed": depth.get("delayed"), "inflight": depth.get("inflight"), "dead": dead,
                "oldest_age_seconds": round(time.time() - oldest, 1) if oldest else None}

    def destination(self, name: str, live: redis.Redis | None, dead: int,
                    counters: telemetry.Counters | None) -> dict[str, object]:
        """One destination's row: where it is, what waits, what it was sent, its health, its last
        send failure and its last C-ECHO apart, its last dead letter's status in words."""
        settings = self.config.destinations[name]
        address = settings.dicomweb.url if settings.dicomweb is not None else f"{settings.host}:{settings.port}"
        row: dict[str, object] = {"name": name, "ae_title": settings.ae_title or "STOW-RS",
                                  "address": address, "dead": dead}
        row.update({k: v for k, v in self._queue_row(name, keys.forward(name), self.spool.out_dir(name), live,
                                                     dead).items() if k != "queue"})
        last_dead = max(self.spool.dead_letters(name), key=lambda d: d.since, default=None)
        row["last_dead_status"] = (describe(last_dead.status) if last_dead is not None
                                   and last_dead.status is not None else None)
        if live is not None:
            health = destination_health(live, name)
            row.update(state=str(health.state), held_until=health.held_until, failures=health.failures,
                       last_error=health.last_error, last_error_at=health.last_error_at, last_ok=health.last_ok,
                       last_echo=health.last_echo, last_echo_ok=health.last_echo_ok,
                       last_echo_error=health.last_echo_error)
        else:
            row.update(state="unknown", held_until=None, failures=None, last_error=None, last_error_at=None,
                       last_ok=None, last_echo=None, last_echo_ok=None, last_echo_error=None)
        row["delivered"] = counters.forwarded.get(name, 0) if counters is not None else None
        row["failed_sends"] = ({status_class: count for (destination, status_class), count in counters.failed.items()
                                if destination == name} if counters is not None else None)
        commitment = None
        if settings.commitment is not None:
            now = time.time()
            open_tx = Transactions(self.spool).of(name)
            commitment = {
                "awaiting": len(self.spool.ids_awaiting_commitment(name)),
                "transactions": [{"uid": tx.uid, "instances": len(tx.refs), "request": tx.request,
                                  "due_in_seconds": round(tx.deadline - now, 1),
                                  "sop_instance_uids": [ref.sop_instance for _, ref in tx.refs[:5]],
                                  "spool_ids": [spool_id for spool_id, _ in tx.refs[:5]]}
                                 for tx in open_tx[:10]],
                "open_transactions": len(open_tx),
            }
        row["commitment"] = commitment
        mpps = self.config.mpps
        row["mpps_held"] = MppsHold(self.spool).count(name) if mpps is not None and name in mpps.forward else None
        return row

    def commitment_reports(self) -> list[dict[str, object]]:
        """Modalities' storage commitment requests whose report is not delivered yet, oldest
        first, with where each stands (``router/kernel/commitment/from_modalities.py``)."""
        return [{"transaction_uid": request.transaction_uid, "calling_ae": request.calling_ae,
                 "address": request.address, "references": len(request.refs), "created": request.received,
                 "deadline": request.deadline, "state": request.state, "attempts": request.attempts,
                 "next_attempt": request.next_attempt or None, "problem": request.problem or None,
                 "host": host}
                for host, request in Requests(self.spool).everyone()]

    # -- quarantine -----------------------------------------------------------

    def quarantine(self, limit: int | None = 200) -> list[dict[str, object]]:
        """What sits in quarantine, oldest first: its reason, when it was received, its SOP Instance UID."""
        return [{"spool_id": item.spool_id, "sop_instance_uid": recorded_sop_instance_uid(item.path),
                 "reason": item.reason, "since": id_time(item.spool_id)}
                for item in self.spool.in_quarantine()[:limit]]

    def select_quarantined(self, ids: Iterable[str] = ()) -> list[Quarantined]:
        """The quarantined instances with these spool ids; all when none are given.

        Raises:
            NotQuarantined: some of ``ids`` are not in quarantine.
        """
        items = self.spool.in_quarantine()
        wanted = set(ids)
        if not wanted:
            return items
        missing = wanted - {item.spool_id for item in items}
        if missing:
            raise NotQuarantined(f"not in quarantine: {', '.join(sorted(missing))}")
        return [item for item in items if item.spool_id in wanted]

    def reroute(self, items: list[Quarantined], *, actor: str, progress: Progress | None = None) -> RequeueOutcome:
        """Route quarantined instances again, under the current rules.

        One that would only come back stays where it is, with its reason,
        and ``kept`` says why: still no whole dataset, still unreadable, or
        no rule sending it anywhere (re-routing it under ``unrouted: drop``
        would delete it, which is a purge).
        """
        outcome = RequeueOutcome()
        released = []
        started = time.time()
        for item in items:
            sop_instance_uid = recorded_sop_instance_uid(item.path) or ""
            why = self._still_quarantined(item)
            if why is None:
                try:
                    self.spool.release_from_quarantine(item)
                    released.append((item.spool_id, sop_instance_uid, ""))
                except FileNotFoundError:
                    why = "no longer in quarantine"
            if why is not None:
                outcome.kept.append((item.spool_id, why))
                log.info("operator %s: quarantined instance %s (SOP Instance UID %s) stays: %s", actor,
                         item.spool_id, sop_instance_uid or "?", why)
            if progress:
                progress(item)
        outcome.requeued = len(released)
        self._record(actor, history.Kind.REROUTED, "quarantined instance", released, started)
        if released:
            try:
                self._dispatcher().submit(keys.ROUTE, [spool_id for spool_id, _, _ in released])
            except RedisError as exc:
                # The files are in incoming/: the router's reconciliation routes them.
                outcome.redis_problem = _QUEUED_LATER.format(exc)
        return outcome

    def _still_quarantined(self, item: Quarantined) -> str | None:
        """Why routing ``item`` again would only quarantine it again (or drop it); None when it would route."""
        from workers.routing import decision_for

        if item.undecodable:
            problem = _dataset_problem(item.path)
            return None if problem is None else f"still not a whole dataset: {problem}"
        try:
            header = pydicom.dcmread(item.path, stop_before_pixels=True, defer_size=1024)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            return f"still unreadable: {exc}"
        decision = decision_for(self.config, header)
        if decision.deliveries:
            return None
        if decision.matched:
            return f"the rules {', '.join(decision.matched)} send it nowhere"
        return f"no rule matches it (unrouted: {decision.unrouted})"

    def purge_quarantined(self, items: list[Quarantined], *, actor: str, progress: Progress | None = None) -> int:
        """Delete quarantined instances for good; how many.

        Their histories then say nobody holds them, so a storage commitment
        request for one is answered failed, never committed.
        """
        purged = []
        started = time.time()
        for item in items:
            purged.append((item.spool_id, recorded_sop_instance_uid(item.path) or "", ""))
            self.spool.purge_quarantined(item)
            if progress:
                progress(item)
        self._record(actor, history.Kind.PURGED, "quarantined instance", purged, started)
        return len(purged)

    def _record(self, actor: str, step: history.Kind, what: str, done: list[tuple[str, str, str]],
                at: float) -> None:
        """Record an operator's action on each instance: an INFO log line (who, what, ids
        only; the line's time is when) and a step in its history.

        Args:
            done: (spool id, SOP Instance UID, destination or "") of each instance acted on.
            at: when the action began (the journey's step comes before what the action set off).
        """
        if not done:
            return
        for spool_id, sop_instance_uid, destination in done:
            log.info("operator %s: %s %s %s%s (SOP Instance UID %s)", actor, step, what, spool_id,
                     f" of {destination}" if destination else "", sop_instance_uid or "?")
        try:
            pipe = self._telling().pipeline(transaction=False)
            for spool_id, _, destination in done:
                history.acted(pipe, spool_id, step, actor, destination, at)
            pipe.execute()
        except RedisError as exc:
            log.warning("operator %s: %s %d %s(s); their journeys do not show it: Redis not reachable (%s)",
                        actor, step, len(done), what, exc)

    # -- dead letters -------------------------------------------------------

    def dead_letters(self, destination: str | None = None, limit: int = 200,
                     with_study: bool = True) -> list[dict[str, object]]:
        """Dead letters (of one destination), oldest first, with the status in words and their study."""
        self._known(destination)
        found = []
        for letter in self.spool.dead_letters(destination):
            if len(found) >= limit:
                break
            view = {k: v for k, v in asdict(letter).items() if k != "path"}
            view["status_text"] = describe(letter.status) if letter.status is not None else None
            if with_study:
                view["study_instance_uid"] = study_instance_uid(letter.path)
            found.append(view)
        return found

    def _known(self, destination: str | None) -> None:
        if destination and destination not in self.config.destinations:
            raise UnknownDestination(f"no destination {destination!r}: choose from "
                                     f"{', '.join(self.config.destinations) or 'none configured'}")

    def select(self, destination: str | None = None, ids: Iterable[str] = (),
               study: str | None = None) -> list[DeadLetter]:
        """The dead letters of ``destination`` (all when None), only ``ids`` when given, only
        those of Study Instance UID ``study`` when given (read from each file's header).

        Raises:
            UnknownDestination: ``destination`` is not configured.
        """
        self._known(destination)
        wanted = set(ids)
        letters = [d for d in self.spool.dead_letters(destination) if not wanted or d.spool_id in wanted]
        if study:
            letters = [d for d in letters if study_instance_uid(d.path) == study]
        return letters

    def retry(self, letters: list[DeadLetter], destinations: list[str], *, actor: str,
              progress: Progress | None = None) -> RetryOutcome:
        """Send ``letters`` again, and end the back-off of ``destinations`` so they are tried now.

        A letter whose morph failed at routing is morphed again from the
        instance as received (never sent as it is); one whose morph fails
        again stays, with why.
        """
        outcome = RetryOutcome()
        by_destination: dict[str, list[str]] = {}
        retried = []
        started = time.time()
        context = None
        for letter in letters:
            if letter.unmorphed:
                from rules.context import MorphContext, SecretMissing
                from workers.routing import remorph

                try:
                    context = context or MorphContext.from_config(self.config)
                    why = remorph(self.config, self.spool, letter, context)
                except SecretMissing as exc:
                    why = str(exc)
                if why is not None:
                    outcome.kept.append((letter.spool_id, why))
                    if progress:
                        progress(letter)
                    continue
            else:
                self.spool.resurrect(letter)
            by_destination.setdefault(letter.destination, []).append(letter.spool_id)
            retried.append((letter.spool_id, letter.sop_instance_uid, letter.destination))
            if progress:
                progress(letter)
        outcome.requeued = len(retried)
        self._record(actor, history.Kind.RETRIED, "dead letter", retried, started)
        from workers.forwarding import lift_hold_reset_backoff

        try:
            dispatcher = self._dispatcher()
            for name, spool_ids in by_destination.items():
                dispatcher.submit(keys.forward(name), spool_ids)
            for name in destinations:
                if lift_hold_reset_backoff(dispatcher.redis, keys.forward(name)):
                    dispatcher.kick(keys.forward(name))
                    outcome.holds_ended.append(name)
                    log.info("operator %s: ended the back-off of %s", actor, name)
        except RedisError as exc:
            # The files are back in out/DEST: the router's reconciliation sends them.
            outcome.redis_problem = _QUEUED_LATER.format(exc)
        return outcome

    def purge(self, letters: list[DeadLetter], *, actor: str, progress: Progress | None = None) -> int:
        """Delete ``letters`` for good; how many."""
        started = time.time()
        for letter in letters:
            self.spool.purge(letter)
            if progress:
                progress(letter)
        self._record(actor, history.Kind.PURGED, "dead letter",
                     [(letter.spool_id, letter.sop_instance_uid, letter.destination) for letter in letters], started)
        return len(letters)

    # -- peers ----------------------------------------------------------------

    def echo(self, destination: str) -> EchoOutcome:
        """C-ECHO a configured destination, as a probe of a held one does."""
        from workers.probe import echo as c_echo

        self._known(destination)
        try:
            answer = c_echo(destination, self.config.destinations[destination], self.config.router.ae_title)
        except TransientSendError as exc:
            return EchoOutcome(destination, False, str(exc))
        if answer.status is None:
            return EchoOutcome(destination, False, f"{destination}: association accepted, but not the "
                                                   "Verification SOP class")
        if answer.status != Status.SUCCESS:
            return EchoOutcome(destination, False, f"{destination}: C-ECHO failed ({describe(answer.status)})")
        ms = round(answer.seconds * 1000, 1)
        return EchoOutcome(destination, True, f"{destination}: C-ECHO success in {ms:.0f} ms", ms)


def _redacted(url: str | None) -> str:
    """A Redis URL without its password, for messages."""
    if not url:
        return "-"
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
