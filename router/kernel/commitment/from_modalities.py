"""The router as Storage Commitment SCP toward modalities (PS3.4 Annex J.3).

A modality asks, with an N-ACTION, whether the router has taken
responsibility for what it sent; the answer (an N-EVENT-REPORT) tells it
which copies it may delete. So nothing is ever reported committed that is
not: ``router.commitment.mode: received`` reports what the instances'
histories (``router/kernel/history.py``) say is durably in the spool, ``delivered``
what every destination the rules chose has acknowledged (and committed,
where it commits) — until then the request waits, within
``timeout_seconds``, and what is still missing is then reported failed.
Without Redis the histories cannot be read, and nothing is reported committed.

The N-ACTION is answered at once and the request written durably
(``spool_dir/commitments/requests/HOST/UID.json``), so a restart of the ingest
loses none; on a spool several hosts share, a host that dies whole has its
requests taken over by another host's reporter once its heartbeat is gone.
A reporter thread decides each request, and sends its report on
the modality's own association while that is open, else on a new
association to its entry under ``modalities:`` with SCP/SCU role selection
(PS3.4 §J.3.3, PS3.7 §D.3.3.4). A report that cannot be delivered is tried
again on ``report_retry``'s back-off, then dropped with an error. A request
from an AE title not under ``modalities:`` whose association is gone waits
on that same schedule: adding the modality and restarting delivers it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import redis
from redis.exceptions import RedisError

from router.kernel import history, keys
from router.kernel.commitment.messages import (
    ACTION_REQUEST_COMMITMENT,
    CLASS_INSTANCE_CONFLICT,
    COMMITMENT_SYNTAXES,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    STORAGE_COMMITMENT_PUSH,
    WELL_KNOWN_INSTANCE,
    Reference,
    Report,
    decode_request,
    encode_report,
)
from router.kernel.dimse import STATUS, command_us, n_event_report_rq
from router.kernel.errors import SendError, SpoolFull
from router.kernel.requestor import RequestedAssociation
from router.kernel.settings import CommitmentScpSettings, Modality, RouterSettings
from router.kernel.spool import HOST, Spool, fsync_dir
from router.kernel.status import Status

log = logging.getLogger(__name__)

COMMITTED = 0
"""A reference's decision: committed (every other decision is a Failure Reason)."""
RECHECK_SECONDS = 1.0
"""How often waiting requests look at the histories again."""
UNKNOWN_GRACE_SECONDS = 2.0
"""How long a UID no history knows is looked for again before it fails
with 0x0112, in either mode: the ingest records the receipt right after the
C-STORE-RSP, so an N-ACTION on another association may overtake it."""
ANSWER_TIMEOUT = 30.0
"""Seconds a modality may take to answer a report (N-EVENT-REPORT-RSP)."""
CONNECT_TIMEOUT = 10.0
"""Seconds to open a new association to a modality for its report."""
REPORT_MAX_PDU = 1 << 16
"""The largest PDU the router takes on a report's association: only the answer comes back."""
HOST_TTL = 15
"""Seconds a host's heartbeat lives: a host whose heartbeat is gone has its requests taken over."""
ADOPT_EVERY = 5.0
"""How often (seconds) the reporter looks for requests of hosts that are gone."""
DELIVERERS = 4
"""Reports delivered at once: a modality that hangs (up to ``CONNECT_TIMEOUT`` +
``ANSWER_TIMEOUT``) holds one of them, not every other modality's report."""



class Channel(Protocol):
    """The modality's own association, which a report may go on while it is open."""

    def send_report(self, report: Report) -> int | None:
        """Send the N-EVENT-REPORT-RQ and wait for its answer.

        Returns:
            The N-EVENT-REPORT-RSP status, or None when the association is
            gone or the answer did not come.
        """
        ...


@dataclass(frozen=True)
class Request:
    """One modality's commitment request, until its report is acknowledged."""

    transaction_uid: str
    calling_ae: str
    address: str
    refs: tuple[Reference, ...]
    received: float
    deadline: float
    """When what is still undecided is reported failed."""
    report: Report | None = None
    """Decided and not yet acknowledged: sent again as it is, even after a restart."""
    attempts: int = 0
    """Deliveries of the report that failed."""
    next_attempt: float = 0.0
    problem: str = ""
    """Why the last delivery failed, in words (``dicom-router queues`` shows it)."""

    @property
    def state(self) -> str:
        """``deciding`` (the histories have not settled every reference yet), ``report ready``
        (decided, not yet tried) or ``retrying`` (a delivery failed: see ``problem``)."""
        if self.report is None:
            return "deciding"
        return "retrying" if self.attempts else "report ready"

    def to_json(self) -> str:
        report = None
        if self.report is not None:
            report = {"committed": [list(r) for r in self.report.committed],
                      "failed": [[*ref, reason] for ref, reason in self.report.failed]}
        return json.dumps({
            "transaction_uid": self.transaction_uid, "calling_ae": self.calling_ae, "address": self.address,
            "refs": [list(r) for r in self.refs], "received": self.received, "deadline": self.deadline,
            "report": report, "attempts": self.attempts, "next_attempt": self.next_attempt,
            "problem": self.problem,
        })

    @classmethod
    def from_json(cls, text: str) -> Request:
        data = json.loads(text)
        uid = str(data["transaction_uid"])
        report = None
        if data.get("report") is not None:
            report = Report(uid, [Reference(str(c), str(i)) for c, i in data["report"]["committed"]],
                            [(Reference(str(c), str(i)), int(reason)) for c, i, reason in data["report"]["failed"]])
        return cls(
            transaction_uid=uid, calling_ae=str(data["calling_ae"]), address=str(data["address"]),
            refs=tuple(Reference(str(c), str(i)) for c, i in data["refs"]),
            received=float(data["received"]), deadline=float(data["deadline"]), report=report,
            attempts=int(data.get("attempts", 0)), next_attempt=float(data.get("next_attempt", 0.0)),
            problem=str(data.get("problem", "")),
        )


def decide(ref: Reference, record: history.Record | None, mode: str, request: Request,
           now: float) -> int | None:
    """What to report for one reference: ``COMMITTED``, a Failure Reason, or None (not yet).

    Args:
        record: the history of the last instance received with the reference's SOP Instance UID.
        mode: ``received`` or ``delivered`` (``router.commitment.mode``).
    """
    late = now >= request.deadline
    if record is None:
        # The modality's C-STOREs came before its N-ACTION, and the ingest records
        # every receipt as it answers it (reconcile back-fills what came while
        # Redis was away), so in either mode unknown is final after a moment:
        # routing's pace concerns known instances only.
        return NO_SUCH_OBJECT_INSTANCE if now - request.received >= UNKNOWN_GRACE_SECONDS else None
    if record.sop_class_uid and ref.sop_class != record.sop_class_uid:
        return CLASS_INSTANCE_CONFLICT  # PS3.4 §J.3.3.1.1: not the instance it says
    if record.outcome == history.Kind.DROPPED:
        return PROCESSING_FAILURE  # unrouted: drop — received, but not kept: nobody holds it
    if mode == "received" or record.delivered:
        return COMMITTED
    if record.routed_at is not None and not record.destinations:
        return PROCESSING_FAILURE  # quarantined or dropped: it will never be delivered
    return PROCESSING_FAILURE if late else None


class Requests:
    """The requests on disk, one durable file each, in a folder per host
    (``spool_dir/commitments/requests/HOST/UID.json``): on a spool that several
    hosts share, each reports its own, and a host whose heartbeat is gone has its
    requests taken over (:meth:`adopt`) by the first live host to look.

    Args:
        spool: the spool.
        host: the host these requests belong to (default: this host).
    """

    def __init__(self, spool: Spool, host: str = HOST) -> None:
        self.spool = spool
        self.host = host
        self.root = spool.root / "commitments" / "requests"
        self.folder = self.root / host
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, uid: str) -> Path:
        return self.folder / f"{uid}.json"

    def exists(self, uid: str) -> bool:
        return self._path(uid).exists()

    def save(self, request: Request) -> None:
        """Raises SpoolFull or OSError when it cannot be made durable."""
        self.spool.write_durably(self._path(request.transaction_uid), request.to_json().encode())

    def remove(self, uid: str) -> None:
        self._path(uid).unlink(missing_ok=True)

    def load(self) -> list[Request]:
        """This host's requests on disk, oldest first, with those an earlier version kept
        directly in the requests folder (they become this host's); an unreadable file is
        logged and left for an operator."""
        self._take(sorted(self.root.glob("*.json")))
        return _read(sorted(self.folder.glob("*.json")))

    def other_hosts(self) -> list[str]:
        """The other hosts with requests on disk."""
        with os.scandir(self.root) as entries:
            return sorted(e.name for e in entries
                          if e.name != self.host and e.is_dir() and any(Path(e.path).glob("*.json")))

    def adopt(self, host: str) -> list[Request]:
        """Take ``host``'s requests over: each file is renamed into this host's folder, so
        that of two hosts adopting at once each request goes to exactly one."""
        return _read(self._take(sorted((self.root / host).glob("*.json"))))

    def _take(self, paths: list[Path]) -> list[Path]:
        taken = []
        for path in paths:
            target = self.folder / path.name
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue  # another host took it, or it was reported meanwhile
            taken.append(target)
        if taken:
            fsync_dir(self.folder)
            fsync_dir(paths[0].parent)
        return taken

    def everyone(self) -> list[tuple[str, Request]]:
        """Every host's requests, as (host, request), oldest first (``dicom-router queues``)."""
        found = [(self.host, r) for r in _read(sorted(self.root.glob("*.json")))]
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.is_dir():
                    found += [(entry.name, r) for r in _read(sorted(Path(entry.path).glob("*.json")))]
        found.sort(key=lambda pair: pair[1].received)
        return found


def _read(paths: list[Path]) -> list[Request]:
    found = []
    for path in paths:
        try:
            found.append(Request.from_json(path.read_text()))
        except FileNotFoundError:
            continue  # reported meanwhile, or taken over
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("commitment request %s is unreadable (%s); it is not reported", path, exc)
    found.sort(key=lambda r: r.received)
    return found


def report_on_new_association(calling_ae: str, called_ae: str, modality: Modality, report: Report) -> int | None:
    """Send ``report`` to a modality on an association the router opens.

    The router proposes the Storage Commitment context with itself in the
    SCP role only (SCP/SCU Role Selection, scu_role False, scp_role True:
    PS3.4 §J.3.3, PS3.7 §D.3.3.4): the N-EVENT-REPORT goes from SCP to SCU.
    It travels on the router's own upper layer (``router/kernel/requestor.py``),
    as every association the router requests.

    Returns:
        The N-EVENT-REPORT-RSP status, or None when the modality could not be reached or did not answer.
    """
    uid = report.transaction_uid
    try:
        assoc = RequestedAssociation.negotiate(
            modality.host, modality.port, calling_ae_title=calling_ae, called_ae_title=called_ae,
            contexts=[(STORAGE_COMMITMENT_PUSH, ts) for ts in COMMITMENT_SYNTAXES], max_pdu=REPORT_MAX_PDU,
            connect_timeout=CONNECT_TIMEOUT, dimse_timeout=ANSWER_TIMEOUT, label=f"commitment report {uid}",
            scp_role_for=[STORAGE_COMMITMENT_PUSH], tls=modality.tls)
    except SendError as exc:
        log.warning("commitment report %s: no association with %s@%s:%s: %s", uid, called_ae, modality.host,
                    modality.port, exc)
        return None
    try:
        context = next(((assoc.contexts[(STORAGE_COMMITMENT_PUSH, ts)], ts) for ts in COMMITMENT_SYNTAXES
                        if (STORAGE_COMMITMENT_PUSH, ts) in assoc.contexts), None)
        if context is None:
            log.warning("commitment report %s: %s refused the Storage Commitment context", uid, called_ae)
            return None
        context_id, syntax = context
        message_id = assoc.next_message_id()
        answer = assoc.request(
            context_id, n_event_report_rq(message_id, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE, report.event_type),
            message_id, encode_report(report, syntax))
        return command_us(answer, STATUS)
    except SendError as exc:
        log.warning("commitment report %s to %s: %s", uid, called_ae, exc)
        return None
    finally:
        assoc.release()


class ModalityCommitments:
    """Takes modalities' N-ACTIONs and reports on them from a thread of its own.

    Args:
        settings: the router's settings (``ae_title``, ``commitment``).
        spool: where requests are kept.
        client: Redis, where the instances' histories are.
        modalities: AE title -> where its reports go on a new association.
        host: the host whose requests these are (default: this host's name).
    """

    def __init__(self, settings: RouterSettings, spool: Spool, client: redis.Redis,
                 modalities: Mapping[str, Modality], host: str = HOST) -> None:
        self.ae_title = settings.ae_title
        self.config: CommitmentScpSettings = settings.commitment
        self.requests = Requests(spool, host)
        self.redis = client
        self.modalities = dict(modalities)
        self._lock = threading.Lock()
        self._pending: dict[str, Request] = {}
        self._channels: dict[str, Channel] = {}
        self._decided: dict[str, dict[Reference, int]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._delivering: set[str] = set()  # transaction UIDs whose report is under way
        self._next_beat = 0.0
        self._next_adoption = 0.0

    # -- the N-ACTION (an association's thread) --

    def take_action(self, action_type: int, requested_instance: str, data: bytes, transfer_syntax: str,
                    calling_ae: str, address: str, channel: Channel) -> int:
        """A modality's N-ACTION-RQ: its N-ACTION-RSP status; the report follows later.

        The request is durable before Success is answered. A repeated
        Transaction UID still open is the same request asked again (its
        answer was lost): Success, and the report goes on this association.
        """
        caller = f"{calling_ae}@{address}"
        if action_type != ACTION_REQUEST_COMMITMENT:
            log.warning("commitment request from %s: action type %s", caller, action_type)
            return Status.NO_SUCH_ACTION
        if requested_instance != WELL_KNOWN_INSTANCE:
            log.warning("commitment request from %s on instance %s, not the well-known one", caller,
                        requested_instance)
            return Status.INVALID_OBJECT_INSTANCE
        try:
            uid, refs = decode_request(data, transfer_syntax)
        except ValueError as exc:
            log.warning("commitment request from %s: %s", caller, exc)
            return Status.PROCESSING_FAILURE
        if not refs:  # decode_request has checked the Transaction UID and every reference's UIDs
            log.warning("commitment request %s from %s: no references", uid, caller)
            return Status.INVALID_ARGUMENT_VALUE
        with self._lock:
            if uid in self._pending:
                self._channels[uid] = channel
                log.info("commitment request %s from %s again: its report goes on this association", uid, caller)
                return Status.SUCCESS
            now = time.time()
            request = Request(uid, calling_ae, address, tuple(refs), now, now + self.config.timeout_seconds)
            try:
                self.requests.save(request)
            except SpoolFull:
                log.error("commitment request %s from %s: spool full", uid, caller)
                return Status.RESOURCE_LIMITATION
            except OSError as exc:
                log.error("commitment request %s from %s: cannot record it: %s", uid, caller, exc)
                return Status.PROCESSING_FAILURE
            self._pending[uid] = request
            self._channels[uid] = channel
        log.info("commitment request %s from %s: %d reference(s), %s mode", uid, caller, len(refs),
                 self.config.mode)
        self._wake.set()
        return Status.SUCCESS

    # -- the reporter thread --

    def start(self) -> None:
        """Load the requests a previous run left, and start reporting."""
        with self._lock:
            for request in self.requests.load():
                self._pending.setdefault(request.transaction_uid, request)
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=DELIVERERS, thread_name_prefix="commitment-report")
        self._thread = threading.Thread(target=self._run, name="commitment-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=ANSWER_TIMEOUT + CONNECT_TIMEOUT)
            self._thread = None
        if self._pool is not None:
            # A delivery under way finishes or times out on its own; its record stays
            # on disk until the report is acknowledged, so nothing is lost by not waiting.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RECHECK_SECONDS)
            self._wake.clear()
            self.step()

    def step(self, now: float | None = None) -> None:
        """One pass over the open requests: decide what can be, deliver what is due.

        Args:
            now: the time to judge deadlines by (a test's clock); default the current time.
        """
        self._keep_hosts(time.monotonic())
        with self._lock:
            pending = list(self._pending.values())
        for request in pending:
            if self._stop.is_set():
                return
            if not self.requests.exists(request.transaction_uid):
                self._forget(request.transaction_uid, "its record is gone: another host took it over")
                continue
            at = time.time() if now is None else now
            if request.report is None:
                request = self._decide(request, at)
            if request is not None and request.report is not None and at >= request.next_attempt:
                self._start_delivery(request, at)

    def _keep_hosts(self, now: float) -> None:
        """Keep this host's heartbeat, and take over the requests of hosts whose heartbeat
        is gone (every ``ADOPT_EVERY`` s). Without Redis nothing is taken over: a host
        that cannot be seen may be alive."""
        try:
            if now >= self._next_beat:
                self.redis.set(keys.host_alive(self.requests.host), b"1", ex=HOST_TTL)
                self._next_beat = now + HOST_TTL / 3
            if now < self._next_adoption:
                return
            self._next_adoption = now + ADOPT_EVERY
            for host in self.requests.other_hosts():
                if self.redis.exists(keys.host_alive(host)):
                    continue
                adopted = self.requests.adopt(host)
                with self._lock:
                    for request in adopted:
                        self._pending.setdefault(request.transaction_uid, request)
                if adopted:
                    log.warning("commitment: took over %d request(s) of host %s, whose heartbeat is gone",
                                len(adopted), host)
                    self._wake.set()
        except RedisError as exc:
            log.debug("commitment: no heartbeat and no takeover while Redis is unavailable: %s", exc)
        except OSError as exc:
            log.warning("commitment: cannot look at other hosts' requests: %s", exc)

    def _forget(self, uid: str, why: str) -> None:
        with self._lock:
            if uid in self._delivering:
                return  # its delivery ends first
            self._pending.pop(uid, None)
            self._channels.pop(uid, None)
            self._decided.pop(uid, None)
        log.info("commitment request %s: %s", uid, why)

    def _start_delivery(self, request: Request, now: float) -> None:
        """Deliver on a pool thread, once per report at a time (inline when not started, as in a unit test)."""
        uid = request.transaction_uid
        with self._lock:
            # The pass's snapshot may be stale: a delivery that ended meanwhile
            # removed the request, or put its next attempt later.
            current = self._pending.get(uid)
            if uid in self._delivering or current is None or current.report is None or now < current.next_attempt:
                return
            self._delivering.add(uid)
            request = current
        pool = self._pool
        if pool is None:
            self._delivered(request, now)
            return
        try:
            pool.submit(self._delivered, request, now)
        except RuntimeError:  # shut down meanwhile: the record stays, the next start delivers it
            with self._lock:
                self._delivering.discard(uid)

    def _delivered(self, request: Request, now: float) -> None:
        try:
            self._deliver(request, now)
        except Exception:  # a delivery must never take the reporter down; the record stays
            log.exception("commitment report %s: delivery failed", request.transaction_uid)
        finally:
            with self._lock:
                self._delivering.discard(request.transaction_uid)
            self._wake.set()

    def _decide(self, request: Request, now: float) -> Request | None:
        """The request with its report when every reference is decided (and the report durable)."""
        uid = request.transaction_uid
        known = self._decided.setdefault(uid, {})
        try:
            for ref in request.refs:
                if ref not in known:
                    outcome = decide(ref, history.lookup(self.redis, ref.sop_instance), self.config.mode, request, now)
                    if outcome is not None:
                        known[ref] = outcome
        except RedisError as exc:
            if now < request.deadline:
                log.warning("commitment request %s: histories unavailable (%s); asking again", uid, exc)
                return None
            log.error("commitment request %s: histories unavailable at its deadline (%s); what they do not "
                      "confirm is reported failed", uid, exc)
            for ref in request.refs:
                known.setdefault(ref, PROCESSING_FAILURE)
        if any(ref not in known for ref in request.refs):
            return None
        report = Report(uid, [r for r in request.refs if known[r] == COMMITTED],
                        [(r, known[r]) for r in request.refs if known[r] != COMMITTED])
        decided = replace(request, report=report)
        try:
            self.requests.save(decided)
        except OSError as exc:  # SpoolFull too: deliver it anyway, the record says what was asked
            log.warning("commitment request %s: cannot record its report (%s)", uid, exc)
        with self._lock:
            self._pending[uid] = decided
        del self._decided[uid]
        log.info("commitment request %s from %s: %d committed, %d failed%s", uid, request.calling_ae,
                 len(report.committed), len(report.failed),
                 "".join(f"; {ref.sop_instance}: {reason:#06x}" for ref, reason in report.failed[:5]))
        return decided

    def _deliver(self, request: Request, now: float) -> None:
        """Send the report on the modality's association, else on a new one; retry on failure."""
        uid, report = request.transaction_uid, request.report
        assert report is not None
        with self._lock:
            channel = self._channels.get(uid)
        status, via = None, "its own association"
        if channel is not None:
            status = channel.send_report(report)
            if status is None:
                with self._lock:
                    self._channels.pop(uid, None)
        if status is None:
            modality = self.modalities.get(request.calling_ae)
            if modality is None:
                problem = f"{request.calling_ae} is not under modalities: and its association has closed"
                # Said once per request; its retries fail the same way until a restart: DEBUG.
                log.log(logging.DEBUG if request.attempts else logging.WARNING,
                        "commitment report %s: %s; add it (modalities: {%s: {host: %s, port: ...}}) and "
                        "restart the ingest to deliver it (tried again on report_retry until then)", uid,
                        problem, request.calling_ae, request.address)
                self._retry_later(request, now, problem)
                return
            via = f"a new association to {modality.host}:{modality.port}"
            status = report_on_new_association(self.ae_title, request.calling_ae, modality, report)
        if status == Status.SUCCESS:
            self.requests.remove(uid)
            with self._lock:
                self._pending.pop(uid, None)
                self._channels.pop(uid, None)
            log.info("commitment report %s sent to %s on %s (event type %d)", uid, request.calling_ae, via,
                     report.event_type)
            return
        if status is None:
            problem = f"{via}: not established, or no answer"
        else:
            problem = f"{request.calling_ae} answered {status:#06x} on {via}"
            log.warning("commitment report %s: %s", uid, problem)
        self._retry_later(request, now, problem)

    def _retry_later(self, request: Request, now: float, problem: str) -> None:
        uid = request.transaction_uid
        retry = self.config.report_retry
        attempts = request.attempts + 1
        if attempts >= retry.max_attempts:
            log.error("commitment report %s to %s: not delivered after %d attempts (%s); dropped", uid,
                      request.calling_ae, attempts, problem)
            self.requests.remove(uid)
            with self._lock:
                self._pending.pop(uid, None)
                self._channels.pop(uid, None)
            return
        delay = retry.delay(attempts) * (1 + random.uniform(-retry.jitter, retry.jitter))
        later = replace(request, attempts=attempts, next_attempt=now + delay, problem=problem)
        try:
            self.requests.save(later)
        except OSError as exc:
            log.warning("commitment request %s: cannot record its retry (%s)", uid, exc)
        with self._lock:
            self._pending[uid] = later
