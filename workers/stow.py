"""STOW-RS: send spool files to a DICOMweb destination (PS3.18 §10.5).

A DICOMweb destination (``dicomweb:`` in its config) gets its instances by
``POST {url}/studies``, ``multipart/related; type="application/dicom"``:
each part a whole PS3.10 file. The forwarding loop (``workers/forwarding.py``)
hands a batch of spool files to :meth:`StowSender.send_all` and reads one
outcome per file, exactly as it does of a DIMSE destination's C-STOREs:

* a batch goes in requests bounded by ``max_instances`` and ``max_bytes``;
  each body is streamed from the spool files with its length announced (never
  a study in memory, never a chunked body an HTTP retry would send empty: a
  request that must be made again is made again from the files), over one
  reused HTTP connection (urllib3, without its own retries);
* 200 and 202: what the answer's FailedSOPSequence names failed with its
  Failure Reason (0xA7xx and 0x0110 come back later, the rest is a dead
  letter), the rest is delivered; an instance a 202 names in neither list
  is tried again. 409: each as its Failure Reason says. Any other 4xx but
  401, 404, 405, 408 and 429 is the instance's: a request of several is made
  again one instance at a time, to tell which, and an instance refused alone
  is a dead letter with the answer's status and text;
* 401 (after one new token, when there is one to get), 404 and 405 (the URL
  is not a STOW-RS service: a configuration to fix, not instances to bury),
  408, 429 (``Retry-After`` honoured), 5xx and connection errors: the
  destination is held on its ``retry`` schedule, as a DIMSE destination
  that cannot be reached, and nothing is charged to the instances.

Authentication: a bearer token (``token_env``, ``token_file``), HTTP Basic
(``username``, ``password_env``) or OAuth 2.0 client credentials
(``oauth2``): the token is fetched once, kept, fetched again shortly before it
expires and once when the destination answers 401 (:class:`OAuth2Token`).
Secrets come from the environment or files, never the config, and never
reach a log.

The health check (``dicom-router echo``, the probe of a held destination and
the periodic check) is one authenticated ``GET {url}/studies?limit=1``
(:meth:`StowSender.check`): reachable and authenticated is healthy, whatever the service
answers to a query it may not support.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode

import urllib3
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from router.kernel.errors import (
    DestinationTimeout,
    DestinationUnavailable,
    PermanentSendError,
    SendError,
    TransientSendError,
)
from router.kernel.settings import Destination, DicomWebSettings, OAuth2Settings
from router.kernel.status import Category, category, describe
from workers.sender import PREFERENCE_UIDS, FileInfo, Sent, _stamp, read_info
from workers.transcode import transcode

log = logging.getLogger(__name__)

PROCESSING_FAILURE = 0x0110
"""A Failure Reason a later attempt may cure (the service failed, not the instance)."""
INSTANCE_STATUSES = frozenset({400, 403, 409, 410, 411, 413, 415, 422})
"""HTTP answers about the request's instances: made again one by one, then a dead letter."""
DESTINATION_STATUSES = frozenset({401, 404, 405, 407, 408, 429})
"""HTTP answers about the destination or the router's access to it: the destination is held."""
READ_CHUNK = 1 << 20
TOKEN_MARGIN = 60.0
"""Seconds before a token's expiry when a new one is fetched (at most a fifth of its life)."""
ANSWER_EXCERPT = 200
"""Characters of an error answer's text kept in a dead letter's reason."""

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


# -- authentication -----------------------------------------------------------


class Authenticator:
    """No authentication: the base of the others."""

    def header(self) -> str | None:
        """The ``Authorization`` header's value for the next request, or None."""
        return None

    def renew(self) -> bool:
        """After a 401: whether there is a new credential worth one more request."""
        return False


class StaticBearer(Authenticator):
    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def header(self) -> str:
        return self._value


class FileBearer(Authenticator):
    """A bearer token in a file another process keeps fresh (a Kubernetes projected
    token, a sidecar): read again when the file changes, and after a 401."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._value = ""

    def header(self) -> str:
        st = os.stat(self.path)
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self._value = f"Bearer {self.path.read_text().strip()}"
            self._stamp = (st.st_mtime_ns, st.st_size)
        return self._value

    def renew(self) -> bool:
        before = self._value
        self._stamp = None
        return self.header() != before


class Basic(Authenticator):
    def __init__(self, username: str, password: str) -> None:
        self._value = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")

    def header(self) -> str:
        return self._value


class OAuth2Token(Authenticator):
    """OAuth 2.0 client credentials (RFC 6749 §4.4): one token kept per process,
    fetched again ``TOKEN_MARGIN`` s (at most a fifth of its life) before it expires,
    and once after a 401.

    The client authenticates with HTTP Basic (``client_secret_basic``, RFC 6749
    §2.3.1); its id is sent in the form too, for servers that look only there.

    Raises (from :meth:`header`):
        DestinationUnavailable: the token endpoint cannot be reached or refuses.
    """

    def __init__(self, settings: OAuth2Settings, secret: str, pool: urllib3.PoolManager, timeout: float) -> None:
        self.settings = settings
        self._secret = secret
        self._pool = pool
        self._timeout = timeout
        self._token: str | None = None
        self._renew_at = 0.0
        self.fetched = 0
        self._lock = threading.Lock()

    def header(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._fetch()
            return f"Bearer {self._token}"

    def renew(self) -> bool:
        with self._lock:
            self._fetch()
            return True

    def _fetch(self) -> None:
        form = {"grant_type": "client_credentials", "client_id": self.settings.client_id}
        if self.settings.scope:
            form["scope"] = self.settings.scope
        basic = base64.b64encode(f"{self.settings.client_id}:{self._secret}".encode()).decode("ascii")
        url = self.settings.token_url
        try:
            answer = self._pool.request("POST", url, body=urlencode(form),
                                        headers={"Content-Type": "application/x-www-form-urlencoded",
                                                 "Accept": "application/json", "Authorization": f"Basic {basic}"},
                                        timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout),
                                        retries=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise DestinationUnavailable(f"OAuth2 token endpoint {url}: {_why(exc)}") from exc
        if answer.status != 200:
            raise DestinationUnavailable(f"OAuth2 token endpoint {url} answered {answer.status}: "
                                         f"{_excerpt(answer.data)}", answer.status)
        try:
            data = json.loads(answer.data)
            token = str(data["access_token"])
            lifetime = float(data.get("expires_in") or 3600)
        except (ValueError, KeyError, TypeError) as exc:
            raise DestinationUnavailable(f"OAuth2 token endpoint {url}: no access_token in its answer") from exc
        self._token = token
        self._renew_at = time.monotonic() + max(0.0, lifetime - min(TOKEN_MARGIN, lifetime / 5))
        self.fetched += 1
        log.info("OAuth2 token for %s fetched (valid %.0f s)", self.settings.client_id, lifetime)


def authenticator(settings: DicomWebSettings, pool: urllib3.PoolManager) -> Authenticator:
    """The authentication ``settings`` name, with its secret read from the environment or file.

    Raises:
        DestinationUnavailable: the secret is not there (``dicom-router check`` says so at start).
    """
    def env(name: str) -> str:
        value = os.environ.get(name, "")
        if not value:
            raise DestinationUnavailable(f"the environment variable {name} is not set")
        return value

    if settings.token_env:
        return StaticBearer(env(settings.token_env))
    if settings.token_file:
        return FileBearer(settings.token_file)
    if settings.username:
        return Basic(settings.username, env(settings.password_env or ""))
    if settings.oauth2:
        return OAuth2Token(settings.oauth2, env(settings.oauth2.client_secret_env), pool, settings.timeout)
    return Authenticator()


# -- the request body ---------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One instance of a request: where its bytes come from, and how many there are."""

    path: Path
    info: FileInfo
    data: bytes | None  # a transcoded PS3.10 file; None: the spool file as it is

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.info.stamp[1]


class Body:
    """A ``multipart/related; type="application/dicom"`` body whose length is known
    before it is sent; :meth:`chunks` reads the files anew each time it is called."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.boundary = f"dicom-router-{secrets.token_hex(12)}"
        # No transfer-syntax parameter: the file meta says it, and Orthanc's DICOMweb plugin
        # (1.7) answers 200 and stores nothing for a part whose type carries one.
        self.heads = [(f"--{self.boundary}\r\nContent-Type: application/dicom\r\n"
                       f"Content-Length: {p.size}\r\n\r\n").encode("ascii") for p in parts]
        self.tail = f"\r\n--{self.boundary}--\r\n".encode("ascii")
        self.length = sum(len(h) + p.size for h, p in zip(self.heads, self.parts)) + 2 * (len(parts) - 1) \
            + len(self.tail)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def chunks(self) -> Iterator[bytes]:
        for index, (head, part) in enumerate(zip(self.heads, self.parts)):
            yield (b"\r\n" if index else b"") + head
            if part.data is not None:
                yield part.data
                continue
            with open(part.path, "rb", buffering=0) as fp:
                if _stamp(os.fstat(fp.fileno())) != part.info.stamp:
                    raise TransientSendError(f"{part.path.name} changed while it was being sent",
                                             sop_instance_uid=part.info.sop_instance)
                left = part.size
                while left:
                    chunk = fp.read(min(READ_CHUNK, left))
                    if not chunk:
                        raise TransientSendError(f"{part.path.name} is shorter than it was",
                                                 sop_instance_uid=part.info.sop_instance)
                    left -= len(chunk)
                    yield chunk
        yield self.tail


def part10(path: Path, info: FileInfo, syntax: str) -> bytes:
    """The spool file at ``path`` as a PS3.10 file in ``syntax`` (the data set transcoded,
    the meta saying so)."""
    dataset = transcode(path, info.transfer_syntax, syntax)
    meta = read_file_meta_info(path)
    meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(dataset)
    return out.getvalue()


# -- the answer ----------------------------------------------------------------


class StowAnswer(NamedTuple):
    """What a STOW-RS answer said of each instance: SOP Instance UID -> Failure Reason,
    the instances it says it stored, and whether it said either at all."""

    failed: dict[str, int]
    stored: set[str]
    listed: bool = False
    """The answer carries a ReferencedSOPSequence or a FailedSOPSequence, even empty: what
    it does not name, it did not store."""


def parse_answer(data: bytes) -> StowAnswer:
    """The FailedSOPSequence and ReferencedSOPSequence of an ``application/dicom+json``
    answer (PS3.18 Table 10.5.3-1; PS3.18 F.2 for the JSON). Anything else: nothing said."""
    try:
        document = json.loads(data) if data.strip() else {}
    except ValueError:
        return StowAnswer({}, set())
    if isinstance(document, list):
        document = document[0] if document and isinstance(document[0], dict) else {}
    if not isinstance(document, dict):
        return StowAnswer({}, set())

    def items(tag: str) -> list[dict]:
        value = document.get(tag, {})
        found = value.get("Value", []) if isinstance(value, dict) else []
        return [item for item in found if isinstance(item, dict)]

    def first(item: dict, tag: str) -> object:
        value = item.get(tag, {})
        values = value.get("Value", []) if isinstance(value, dict) else []
        return values[0] if values else None

    failed = {}
    for item in items(_FAILED_SOP_SEQUENCE):
        uid, reason = first(item, _REFERENCED_SOP_INSTANCE_UID), first(item, _FAILURE_REASON)
        if uid:
            failed[str(uid)] = int(reason) if isinstance(reason, int) else PROCESSING_FAILURE
    stored = {str(uid) for item in items(_REFERENCED_SOP_SEQUENCE)
              if (uid := first(item, _REFERENCED_SOP_INSTANCE_UID))}
    return StowAnswer(failed, stored, _REFERENCED_SOP_SEQUENCE in document or _FAILED_SOP_SEQUENCE in document)


def _reason_error(name: str, uid: str, reason: int) -> SendError:
    """The error of one instance the service failed with ``reason``."""
    text = f"{name}: STOW-RS failed it: {describe(reason)}"
    if reason == PROCESSING_FAILURE or category(reason) is Category.TRANSIENT:
        return TransientSendError(text, reason, uid)
    return PermanentSendError(text, reason, uid)


def _retry_after(headers) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), or None."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _excerpt(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:ANSWER_EXCERPT] + ("…" if len(text) > ANSWER_EXCERPT else "")


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


# -- the sender ----------------------------------------------------------------


Outcome = Sent | SendError | FileNotFoundError
"""What became of one instance; FileNotFoundError: its file was gone before it was sent (purged meanwhile)."""


class StowSender:
    """STOW-RS toward one DICOMweb destination, over one reused connection.

    Shaped as :class:`workers.sender.Sender` where the forwarding loop and the
    maintenance thread use it (``send_all``, ``ready_for``, ``prepare``,
    ``is_open``, ``close``, ``close_if_idle``).

    Args:
        name: the destination's name in the config (for logs and reasons).
        destination: its settings (``dicomweb`` set).
        calling_ae_title: unused (DIMSE's); taken for the same signature.
    """

    def __init__(self, name: str, destination: Destination, calling_ae_title: str = "") -> None:
        assert destination.dicomweb is not None
        self.name = name
        self.destination = destination
        self.settings = destination.dicomweb
        self.url = f"{self.settings.url}/studies"
        ca = str(self.settings.ca_file) if self.settings.ca_file else None
        # Two connections per host at most: the drain's, and a health check's on the maintenance thread.
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=2, block=False, retries=False,
                                         ca_certs=ca, cert_reqs="CERT_REQUIRED")
        self._auth: Authenticator | None = None
        self._auth_lock = threading.Lock()
        self._lock = threading.Lock()
        self._last_used = 0.0
        self.requests_made = 0

    # -- what the forwarding loop and maintenance ask of any sender --

    def ready_for(self, paths: list[Path]) -> bool:
        return True  # nothing to negotiate

    def prepare(self, paths: list[Path]) -> None:
        pass

    @property
    def is_open(self) -> bool:
        return self._last_used > 0 and time.monotonic() - self._last_used < self.destination.idle_timeout

    def close(self) -> None:
        self._pool.clear()

    def close_if_idle(self) -> None:
        if self._last_used and time.monotonic() - self._last_used > self.destination.idle_timeout:
            self._pool.clear()
            self._last_used = 0.0

    def send(self, path: Path) -> Sent:
        """One instance alone (``dicom-router`` tools; the loop uses :meth:`send_all`)."""
        outcome = next(self.send_all([path]))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # -- sending --

    def send_all(self, paths: list[Path]) -> Iterator[Outcome]:
        """One outcome per path, in order: :class:`Sent`, or the :class:`SendError` the
        forwarding loop would have met sending it by C-STORE. A destination-wide error
        (``DestinationUnavailable``, ``DestinationTimeout``) is the outcome of the first
        instance of the request that met it; the caller stops there and gives the rest back."""
        parts: list[Part] = []
        size = 0
        for path in paths:
            try:
                part = self._part(path)
            except (SendError, FileNotFoundError) as exc:
                yield from self._request_all(parts)
                parts, size = [], 0
                yield exc
                continue
            except OSError as exc:
                yield from self._request_all(parts)
                parts, size = [], 0
                yield TransientSendError(f"{self.name}: {path.name}: {exc.strerror or exc}")
                continue
            if parts and (len(parts) >= self.settings.max_instances or size + part.size > self.settings.max_bytes):
                yield from self._request_all(parts)
                parts, size = [], 0
            parts.append(part)
            size += part.size
        yield from self._request_all(parts)

    def _part(self, path: Path) -> Part:
        """The part ``path`` travels as: as it is, or transcoded to the first preference
        it can be had in (``transfer_syntaxes``; no negotiation to learn what the service
        takes, so ``as-received`` first sends every instance as it came)."""
        with open(path, "rb", buffering=0) as fp:
            info = read_info(fp, path)
        attempts = []
        for choice in self.destination.transfer_syntaxes:
            syntax = info.transfer_syntax if choice == "as-received" else str(PREFERENCE_UIDS[choice])
            if syntax == info.transfer_syntax:
                return Part(path, info, None)
            try:
                return Part(path, info, part10(path, info, syntax))
            except PermanentSendError as exc:
                log.info("%s: %s not transcoded to %s: %s", self.name, info.sop_instance, syntax, exc)
                attempts.append(f"to {UID(syntax).name}: {exc}")
        raise PermanentSendError(f"{self.name}: cannot transcode {info.sop_instance}: {'; '.join(attempts)}",
                                 sop_instance_uid=info.sop_instance)

    def _request_all(self, parts: list[Part]) -> Iterator[Outcome]:
        """The outcomes of ``parts`` sent in one request, or one by one when the answer
        concerns instances the request does not tell apart."""
        if not parts:
            return
        outcomes = self._request(parts)
        if outcomes is None:  # one instance's failure in a request of several: each alone
            for part in parts:
                (outcome,) = self._request([part]) or ()  # alone: never None
                yield outcome
                if isinstance(outcome, (DestinationUnavailable, DestinationTimeout)):
                    return
            return
        for outcome in outcomes:
            yield outcome
            if isinstance(outcome, (DestinationUnavailable, DestinationTimeout)):
                return

    def _request(self, parts: list[Part]) -> list[Outcome] | None:
        """One STOW-RS request: an outcome per part, or a single destination-wide error
        (the caller stops), or None when a request of several failed for one of its
        instances without saying which (make it again one by one)."""
        with self._lock:
            began = time.perf_counter()
            answer, error = self._post(parts)
            seconds = (time.perf_counter() - began) / len(parts)
            self._last_used = time.monotonic()
        first = parts[0].info.sop_instance
        if error is not None:
            if isinstance(error, (DestinationUnavailable, DestinationTimeout)):
                error.sop_instance_uid = error.sop_instance_uid or first
                return [error]  # the caller stops here and gives the rest back
            if len(parts) > 1:
                return None  # one instance's file failed the request: each alone, so the others go
            error.sop_instance_uid = error.sop_instance_uid or first
            return [error]
        status, data = answer.status, answer.data
        if status in (200, 202, 409):
            said = parse_answer(data)
            outcomes: list[Outcome] = []
            for part in parts:
                uid = part.info.sop_instance
                if uid in said.failed:
                    outcomes.append(_reason_error(self.name, uid, said.failed[uid]))
                elif uid in said.stored or (status == 200 and not said.listed):
                    outcomes.append(Sent(0, uid, part.info.sop_class, seconds))
                else:
                    # Never taken for stored: a service that skips a part it cannot read
                    # may answer 200 and list nothing.
                    outcomes.append(TransientSendError(
                        f"{self.name}: STOW-RS answered {status} without naming this instance stored", None, uid))
            return outcomes
        if status in INSTANCE_STATUSES or (400 <= status < 500 and status not in DESTINATION_STATUSES):
            if len(parts) > 1:
                log.info("%s: a request of %d instances answered %d; each is sent alone", self.name, len(parts),
                         status)
                return None
            return [PermanentSendError(f"{self.name}: STOW-RS answered {status} {answer.reason}: "
                                       f"{_excerpt(data)}", None, first)]
        if status == 401:
            why = f"{self.name}: STOW-RS answered 401 Unauthorized (credentials refused)"
        elif status in (404, 405):
            why = f"{self.name}: {self.url} answered {status} {answer.reason}: is it a STOW-RS service?"
        else:
            why = f"{self.name}: STOW-RS answered {status} {answer.reason}"
        held = DestinationUnavailable(why, None, first)
        held.retry_after = _retry_after(answer.headers)
        return [held]

    def _authenticator(self) -> Authenticator:
        """This destination's authentication, made once (its token kept across requests).

        Raises:
            DestinationUnavailable: its secret is not in the environment.
        """
        with self._auth_lock:
            if self._auth is None:
                try:
                    self._auth = authenticator(self.settings, self._pool)
                except DestinationUnavailable as exc:
                    raise DestinationUnavailable(f"{self.name}: {exc}") from None
            return self._auth

    def _authorized(self, make: Callable[[dict[str, str]], urllib3.BaseHTTPResponse]) -> urllib3.BaseHTTPResponse:
        """``make(headers)`` a request with the ``Authorization`` header, and once more with a
        new credential after a 401 when there is one to get; the answer.

        Raises:
            DestinationUnavailable: no credential can be had (its secret, its token file,
                its token endpoint).
            What ``make`` raises.
        """
        auth = self._authenticator()
        answer = make(self._credentials(auth))
        if answer.status != 401:
            return answer
        try:
            renewed = auth.renew()
        except (DestinationUnavailable, OSError) as exc:
            raise DestinationUnavailable(f"{self.name}: after a 401: {exc}") from None
        if not renewed:
            return answer
        log.info("%s: 401 Unauthorized; trying once more with a new credential", self.name)
        return make(self._credentials(auth))

    def _credentials(self, auth: Authenticator) -> dict[str, str]:
        try:
            value = auth.header()
        except OSError as exc:
            raise DestinationUnavailable(f"{self.name}: token file: {exc.strerror or exc}") from exc
        except DestinationUnavailable as exc:
            raise DestinationUnavailable(f"{self.name}: {exc}") from None
        return {"Authorization": value} if value else {}

    def check(self) -> float:
        """The health check: one authenticated ``GET {url}/studies?limit=1``, within
        ``connect_timeout``. Reachable and authenticated is healthy, whatever the service
        answers to a query it may not support.

        Returns:
            The seconds it took.

        Raises:
            DestinationUnavailable: not reachable, 401 (after a new credential), 407,
                408, 429 or 5xx.
        """
        started = time.monotonic()
        url = f"{self.url}?{urlencode({'limit': 1})}"
        timeout = urllib3.Timeout(connect=self.destination.connect_timeout, read=self.destination.connect_timeout)
        try:
            answer = self._authorized(lambda credentials: self._pool.request(
                "GET", url, headers={"Accept": "application/dicom+json", **credentials}, retries=False,
                redirect=False, timeout=timeout))
        except urllib3.exceptions.HTTPError as exc:
            raise DestinationUnavailable(f"{self.name}: {self.settings.url}: {_why(exc)}") from exc
        if answer.status in (401, 407, 408, 429) or answer.status >= 500:
            raise DestinationUnavailable(f"{self.name}: {self.url} answered {answer.status} {answer.reason}")
        return time.monotonic() - started

    def _post(self, parts: list[Part]) -> tuple[urllib3.BaseHTTPResponse | None, SendError | None]:
        """POST the parts (a body made anew from the files each time); after a 401, once more
        with a new credential when one is had."""
        timeout = urllib3.Timeout(connect=self.settings.timeout, read=self.settings.timeout)

        def post(credentials: dict[str, str]) -> urllib3.BaseHTTPResponse:
            body = Body(parts)
            headers = {"Content-Type": body.content_type, "Content-Length": str(body.length),
                       "Accept": "application/dicom+json", **credentials}
            answer = self._pool.request("POST", self.url, body=body.chunks(), headers=headers, chunked=False,
                                        timeout=timeout, retries=False, redirect=False, preload_content=True)
            self.requests_made += 1
            return answer

        try:
            return self._authorized(post), None
        except urllib3.exceptions.ReadTimeoutError as exc:
            self._pool.clear()
            return None, DestinationTimeout(f"{self.name}: no answer within {self.settings.timeout:g} s "
                                            f"({_why(exc)})")
        except urllib3.exceptions.HTTPError as exc:
            self._pool.clear()
            cause = exc.__context__ if isinstance(exc.__context__, SendError) else None
            if cause is not None:  # a spool file that changed under us: that instance's problem
                return None, cause
            return None, DestinationUnavailable(f"{self.name}: {self.url}: {_why(exc)}")
        except SendError as exc:  # no credential (the destination's), or a file that changed (its instance's)
            self._pool.clear()
            return None, exc
