"""What runs inside the DICOMweb test peers' processes: an OAuth2 token endpoint
and an authenticating STOW-RS proxy in front of Orthanc.

The handles in ``tests/dicomweb_peers.py`` start them as
``python -m tests.dicomweb_servers token-server|auth-proxy --config FILE``, one
process each, stopped by PID.  Both speak HTTP/1.1 with the standard library's
``http.server`` (keep-alive, request bodies with Content-Length or chunked, one
thread per connection) and buffer whole bodies.

Tokens are self-contained, ``base64url(JSON claims) "." base64url(HMAC-SHA256)``
under a key both processes are given, so the proxy checks a token's signature
and expiry without asking the token server (what a JWT-checking gateway does).
STOW-RS bodies are read and written with ``tests/stow_rs.py``.

The proxy's modes are changed while it runs by ``POST /_control`` with a JSON
object (``{"clear": true}``, ``{"fail_uids": {UID: {"times": N | null,
"reason": STATUS}}}``, ``{"status": {"code": 503, "retry_after": N | null,
"times": N | null} | null}``; see ``Modes.change``) and read by ``GET /_control``;
neither needs a token, and neither is in the request log.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import http.client
import json
import logging
import re
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from router.kernel.status import Status
from tests.stow_rs import (
    DICOM_JSON,
    FAILED_SOP_SEQUENCE,
    REFERENCED_SOP_SEQUENCE,
    MultipartError,
    build_related,
    content_type_params,
    failed_sop_item,
    parse_related,
    sop_uids,
)

log = logging.getLogger("dicomweb-peer")

LOOPBACK = "127.0.0.1"
CONTROL_PATH = "/_control"
TOKEN_PATH = "/token"
STOW_PATH = re.compile(r"^/dicom-web/studies(/[0-9.]+)?/?$")


class InvalidToken(ValueError):
    """A bearer token that is malformed, forged or expired (RFC 6750 3.1 invalid_token)."""


# -- tokens -------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(key: str, subject: str, ttl: float, scope: str | None = None,
               now: float | None = None) -> str:
    """A signed access token for ``subject`` that expires ``ttl`` seconds from ``now``.

    Args:
        key: the HMAC key (hex) the proxy verifies with.
        subject: the client id.
        ttl: lifetime in seconds (negative: already expired).
        scope: the scope granted, carried along.
        now: the issue time (default: the clock).
    """
    issued = time.time() if now is None else now
    claims = {"sub": subject, "iat": issued, "exp": issued + ttl,
              "jti": secrets.token_hex(8), "scope": scope}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(bytes.fromhex(key), payload.encode("ascii"), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def token_claims(token: str) -> dict:
    """The claims a token carries, unverified (for logs and tests).

    Raises:
        InvalidToken: when it is not one of ours.
    """
    try:
        claims = json.loads(_unb64(token.partition(".")[0]))
    except (binascii.Error, ValueError) as exc:
        raise InvalidToken("malformed") from exc
    if not isinstance(claims, dict):
        raise InvalidToken("malformed")
    return claims


def verify_token(key: str, token: str, now: float | None = None) -> dict:
    """The claims of ``token`` if it is signed with ``key`` and unexpired.

    Raises:
        InvalidToken: naming what is wrong (malformed, bad signature, expired).
    """
    payload, dot, signature = token.partition(".")
    if not dot:
        raise InvalidToken("malformed")
    try:
        given = _unb64(signature)
        claims = json.loads(_unb64(payload))
    except (binascii.Error, ValueError) as exc:
        raise InvalidToken("malformed") from exc
    expected = hmac.new(bytes.fromhex(key), payload.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(given, expected):
        raise InvalidToken("bad signature")
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), (int, float)):
        raise InvalidToken("malformed")
    if (time.time() if now is None else now) >= claims["exp"]:
        raise InvalidToken("expired")
    return claims


# -- HTTP plumbing ------------------------------------------------------------

class _KeptAliveHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: every answer has a Content-Length, every body is read."""

    protocol_version = "HTTP/1.1"
    server_version = "dicomweb-peer"

    def read_body(self) -> bytes:
        """The request body, from Content-Length or chunked transfer coding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status: int, body: bytes = b"", content_type: str | None = None,
               headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def answer_json(self, status: int, payload: object, content_type: str = "application/json",
                    headers: Mapping[str, str] | None = None) -> None:
        self.answer(status, json.dumps(payload).encode(), content_type, headers)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        log.info("%s %s", self.address_string(), format % args)


class _JsonLines:
    """An append-only file of one JSON record per line, shared by the handler threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def _serve(handler: type[_KeptAliveHandler], port: int, **attributes) -> None:
    """Serve ``handler`` on loopback ``port`` until the process is signalled."""
    server = ThreadingHTTPServer((LOOPBACK, port), handler)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    log.info("listening on %s:%s", LOOPBACK, port)
    server.serve_forever()


# -- the token endpoint (RFC 6749 4.4, client credentials) ---------------------

class TokenEndpoint(_KeptAliveHandler):
    """POST /token, grant_type=client_credentials; the client authenticates with
    HTTP Basic (client_secret_basic) or form fields (client_secret_post), RFC 6749 2.3.1."""

    def do_POST(self) -> None:
        body = self.read_body()
        if urllib.parse.urlsplit(self.path).path != TOKEN_PATH:
            self.answer_json(404, {"error": "not_found"})
            return
        status, payload, headers, record = self._grant(body)
        record.update(time=time.time(), status=status)
        self.server.requests.append(record)
        # RFC 6749 5.1: token answers are never cached.
        self.answer_json(status, payload, headers={"Cache-Control": "no-store", "Pragma": "no-cache",
                                                   **headers})

    def _grant(self, body: bytes) -> tuple[int, dict, dict, dict]:
        record: dict = {"client_id": None, "client_auth": None, "grant_type": None, "scope": None}
        media_type = content_type_params(self.headers.get("Content-Type", ""))[0]
        if media_type != "application/x-www-form-urlencoded":
            return 400, {"error": "invalid_request"}, {}, record
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("ascii", "replace"),
                                                          keep_blank_values=True).items()}
        record.update(grant_type=form.get("grant_type"), scope=form.get("scope"))
        basic = self._basic_credentials()
        if basic and ("client_secret" in form or form.get("client_id", basic[0]) != basic[0]):
            # RFC 6749 2.3: one authentication method per request (a client_id in the
            # form beside Basic may only repeat it).
            return 400, {"error": "invalid_request"}, {}, record
        if basic:
            client_id, secret = basic
            record["client_auth"] = "client_secret_basic"
        else:
            client_id, secret = form.get("client_id"), form.get("client_secret")
            record["client_auth"] = "client_secret_post" if client_id else None
        record["client_id"] = client_id
        known = self.server.clients.get(client_id or "")
        if known is None or secret is None or not hmac.compare_digest(known, secret):
            return 401, {"error": "invalid_client"}, {"WWW-Authenticate": 'Basic realm="token"'}, record
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}, {}, record
        token = mint_token(self.server.key, client_id, self.server.ttl, form.get("scope"))
        payload = {"access_token": token, "token_type": "Bearer", "expires_in": self.server.ttl}
        if form.get("scope"):
            payload["scope"] = form["scope"]
        record["token_id"] = token_claims(token)["jti"]
        return 200, payload, {}, record

    def _basic_credentials(self) -> tuple[str, str] | None:
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            return None
        # RFC 6749 2.3.1: both are form-urlencoded before Basic encoding.
        return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)


# -- the authenticating proxy -------------------------------------------------

class Modes:
    """The proxy's misbehaviours, read per request and changed through /_control.

    ``fail_uids``: SOP Instance UID -> {"times": failures left (None: always),
    "reason": Failure Reason}.  ``status``: {"code", "retry_after", "times"} or
    None, answered to every STOW request instead of forwarding it.
    """

    def __init__(self, state: Mapping | None = None):
        self.lock = threading.Lock()
        self.fail_uids: dict[str, dict] = {}
        self.status: dict | None = None
        if state:
            self.change(state)

    def snapshot(self) -> dict:
        with self.lock:
            return {"fail_uids": {k: dict(v) for k, v in self.fail_uids.items()},
                    "status": dict(self.status) if self.status else None}

    def change(self, change: Mapping) -> dict:
        """Apply a control request: ``clear``, then ``fail_uids`` merged (times 0
        removes one), then ``status`` replaced (null clears).

        Raises:
            ValueError: on an unknown key or a value out of range.
        """
        unknown = set(change) - {"clear", "fail_uids", "status"}
        if unknown:
            raise ValueError(f"unknown control keys {sorted(unknown)}")
        fail_uids = {uid: self._failure(spec) for uid, spec in (change.get("fail_uids") or {}).items()}
        status = self._status(change["status"]) if change.get("status") is not None else None
        with self.lock:
            if change.get("clear"):
                self.fail_uids.clear()
                self.status = None
            for uid, spec in fail_uids.items():
                if spec["times"] == 0:
                    self.fail_uids.pop(uid, None)
                else:
                    self.fail_uids[uid] = spec
            if "status" in change:
                self.status = status
        return self.snapshot()

    @staticmethod
    def _failure(spec: Mapping) -> dict:
        times, reason = spec.get("times", 1), spec.get("reason", int(Status.OUT_OF_RESOURCES))
        if times is not None and (not isinstance(times, int) or times < 0):
            raise ValueError(f"times must be a count >= 0 or null, not {times!r}")
        if not isinstance(reason, int) or not 0 < reason <= 0xFFFF:
            raise ValueError(f"reason must be a 16-bit status, not {reason!r}")
        return {"times": times, "reason": reason}

    @staticmethod
    def _status(spec: Mapping) -> dict:
        code, retry_after, times = spec.get("code"), spec.get("retry_after"), spec.get("times")
        if not isinstance(code, int) or not 100 <= code <= 599:
            raise ValueError(f"code must be an HTTP status, not {code!r}")
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise ValueError(f"retry_after must be seconds >= 0, not {retry_after!r}")
        if times is not None and (not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a count >= 1 or null, not {times!r}")
        return {"code": code, "retry_after": retry_after, "times": times}

    def take_status(self) -> dict | None:
        """The status to answer this STOW with (one use of it spent), or None."""
        with self.lock:
            status = self.status
            if status is None:
                return None
            if status["times"] is not None:
                status["times"] -= 1
                if status["times"] == 0:
                    self.status = None
            return dict(status)

    def take_failures(self, uids: Iterable[str | None]) -> dict[str, int]:
        """SOP Instance UID -> Failure Reason for the ``uids`` to fail now (uses spent)."""
        failing = {}
        with self.lock:
            for uid in uids:
                spec = self.fail_uids.get(uid) if uid else None
                if spec is None or uid in failing:
                    continue
                failing[uid] = spec["reason"]
                if spec["times"] is not None:
                    spec["times"] -= 1
                    if spec["times"] == 0:
                        del self.fail_uids[uid]
        return failing


class AuthProxyHandler(_KeptAliveHandler):
    """Bearer tokens checked, then STOW-RS and GETs forwarded to Orthanc with its
    Basic credentials; /_control (no token) reads and changes the modes.

    A request's record is written to the request log just before its answer is
    sent, so a client that has its answer finds the record there.
    """

    record: dict | None = None

    def do_GET(self) -> None:
        self.record = None  # one handler serves every request of a kept-alive connection
        self.read_body()
        if urllib.parse.urlsplit(self.path).path == CONTROL_PATH:
            self.answer_json(200, self.server.modes.snapshot())
            return
        self.record = {"method": "GET", "path": self.path, "parts": None, "sop_instance_uids": []}
        if self._authorized():
            headers = {k: v for k, v in (("Accept", self.headers.get("Accept")),) if v}
            self._relay("GET", headers, None)

    def do_POST(self) -> None:
        self.record = None
        body = self.read_body()
        path = urllib.parse.urlsplit(self.path).path
        if path == CONTROL_PATH:
            self._control(body)
            return
        self.record = {"method": "POST", "path": self.path, "parts": None, "sop_instance_uids": []}
        if not STOW_PATH.match(path):
            self._refuse(404, "not a STOW-RS path")
        elif self._authorized():
            self._stow(body)

    def answer(self, status: int, body: bytes = b"", content_type: str | None = None,
               headers: Mapping[str, str] | None = None) -> None:
        if self.record is not None:
            self.record.update(status=status, time=time.time())
            self.server.requests.append(self.record)
            self.record = None
        super().answer(status, body, content_type, headers)

    def _control(self, body: bytes) -> None:
        try:
            change = json.loads(body or b"{}")
            if not isinstance(change, dict):
                raise ValueError("a JSON object is needed")
            state = self.server.modes.change(change)
        except ValueError as exc:
            self.answer_json(400, {"error": str(exc)})
            return
        log.info("modes now %s", state)
        self.answer_json(200, state)

    def _authorized(self) -> bool:
        """Check the bearer token (RFC 6750 2.1); answer 401 and return False if it fails."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            # RFC 6750 3.1: no error code when the request carried no token.
            self.record["auth"] = "missing"
            self._refuse(401, "no bearer token", {"WWW-Authenticate": 'Bearer realm="dicom-web"'})
            return False
        try:
            claims = verify_token(self.server.key, token.strip())
        except InvalidToken as exc:
            self.record["auth"] = str(exc)
            challenge = f'Bearer realm="dicom-web", error="invalid_token", error_description="{exc}"'
            self._refuse(401, f"invalid_token: {exc}", {"WWW-Authenticate": challenge})
            return False
        self.record.update(auth="ok", token_id=claims.get("jti"))
        return True

    def _refuse(self, status: int, why: str, headers: Mapping[str, str] | None = None) -> None:
        error = "invalid_token" if status == 401 else why
        self.answer_json(status, {"error": error, "error_description": why}, headers=headers)

    def _stow(self, body: bytes) -> None:
        content_type = self.headers.get("Content-Type", "")
        try:
            parts = parse_related(body, content_type)
        except MultipartError as exc:
            self._refuse(400, f"bad multipart/related body: {exc}")
            return
        uids = [sop_uids(p.content) for p in parts]
        self.record.update(parts=len(parts), sop_instance_uids=[uid for _, uid in uids])
        status = self.server.modes.take_status()
        if status:
            headers = {"Retry-After": str(status["retry_after"])} if status["retry_after"] is not None else {}
            self.answer_json(status["code"], {"error": "status mode", "status": status["code"]},
                             headers=headers)
            return
        failing = self.server.modes.take_failures(uid for _, uid in uids)
        headers = {"Content-Type": content_type}
        if self.headers.get("Accept"):
            headers["Accept"] = self.headers["Accept"]
        if not failing:
            self._relay("POST", headers, body)
            return
        self.record["failed"] = sorted(failing)
        kept = [p for p, (_, uid) in zip(parts, uids) if uid not in failing]
        answer: dict = {}
        if kept:
            kept_body, headers["Content-Type"] = build_related(kept)
            got = self._orthanc("POST", headers, kept_body)
            if got is None:
                self._refuse(502, "Orthanc did not answer")
                return
            status_code, content_type_back, answer_body = got
            if status_code not in (200, 202) or "json" not in (content_type_back or ""):
                self.answer(status_code, answer_body, content_type_back)
                return
            answer = json.loads(answer_body)
        failed = answer.setdefault(FAILED_SOP_SEQUENCE, {"vr": "SQ"})
        failed_items = failed.setdefault("Value", [])  # Orthanc sends an empty one without "Value"
        reported = set()
        for sop_class, uid in uids:
            if uid in failing and uid not in reported:
                failed_items.append(failed_sop_item(sop_class, uid, failing[uid]))
                reported.add(uid)
        stored = answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
        # PS3.18 10.5.3: 202 when some were stored and some failed, 409 when none was stored.
        self.answer_json(202 if stored else 409, answer, DICOM_JSON)

    def _relay(self, method: str, headers: dict, body: bytes | None) -> None:
        """Forward the request as it came and answer what Orthanc answered."""
        got = self._orthanc(method, headers, body)
        if got is None:
            self._refuse(502, "Orthanc did not answer")
            return
        status, content_type, answer_body = got
        self.answer(status, answer_body, content_type)

    def _orthanc(self, method: str, headers: dict,
                 body: bytes | None) -> tuple[int, str | None, bytes] | None:
        """(status, Content-Type, body) of Orthanc's answer, or None when it cannot be reached."""
        target = self.server.orthanc
        conn = http.client.HTTPConnection(LOOPBACK, target["port"], timeout=120)
        try:
            # The client's Host goes along, so the Retrieve URLs Orthanc puts in
            # its answers point at the proxy, as behind any reverse proxy.
            forwarded = {**headers, "Authorization": target["authorization"]}
            if self.headers.get("Host"):
                forwarded["Host"] = self.headers["Host"]
            conn.request(method, self.path, body=body, headers=forwarded)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type"), resp.read()
        except OSError as exc:
            log.warning("Orthanc on port %s: %s", target["port"], exc)
            return None
        finally:
            conn.close()


# -- entry point --------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Run a token server or an auth proxy from a JSON config file."""
    parser = argparse.ArgumentParser(prog="python -m tests.dicomweb_servers")
    parser.add_argument("server", choices=["token-server", "auth-proxy"])
    parser.add_argument("--config", required=True, help="JSON file written by tests/dicomweb_peers.py")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads(Path(args.config).read_text())
    if args.server == "token-server":
        _serve(TokenEndpoint, config["port"], key=config["key"], clients=dict(config["clients"]),
               ttl=config["ttl"], requests=_JsonLines(config["requests_log"]))
    else:
        user, password = config["orthanc"]["username"], config["orthanc"]["password"]
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        _serve(AuthProxyHandler, config["port"], key=config["key"],
               orthanc={"port": config["orthanc"]["port"], "authorization": f"Basic {basic}"},
               modes=Modes(config.get("modes")), requests=_JsonLines(config["requests_log"]))


if __name__ == "__main__":
    main()
