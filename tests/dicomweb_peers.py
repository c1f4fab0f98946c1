"""DICOMweb peers for tests: Orthanc with STOW-RS behind HTTP Basic, an OAuth2
token server, and an authenticating proxy that can fail chosen instances.

Each is a separate process with loopback ports chosen free, its PID kept and
stopped by PID (``tests.peers._Server``); a restart comes back on the same
ports.  The token server and the proxy are Python programs of their own
(``tests/dicomweb_servers.py``), started with the interpreter running the tests.

A chain for a router's STOW-RS destination with OAuth2::

    orthanc = OrthancWeb(tmp / "orthanc").start()
    tokens = TokenServer(tmp / "tokens", ttl=3).start()
    proxy = AuthProxy(tmp / "proxy", orthanc, tokens.signing_key).start()
    # the router: token URL tokens.url, client tokens.client_id/client_secret,
    # STOW-RS URL proxy.dicomweb_url
    proxy.fail([uid], reason=Status.OUT_OF_RESOURCES, times=1)
    proxy.answer_stow_with(503, retry_after=2, times=2)
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from router.kernel.status import Status
from tests.peers import LOOPBACK, Orthanc, PeerError, _Server, free_port, peer_env, wait_for_listen

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
"""The Debian package orthanc-dicomweb's plugin (a link to /usr/lib/orthanc/libOrthancDicomWeb.so.1.7)."""

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)


class _BasicAuth(urllib.request.BaseHandler):
    """Send HTTP Basic credentials with every request, without waiting for a 401 challenge."""

    def __init__(self, username: str, password: str):
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self.header = f"Basic {token}"

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        request.add_unredirected_header("Authorization", self.header)
        return request


class OrthancWeb(Orthanc):
    """A private Orthanc with the DICOMweb plugin, its REST API and DICOMweb behind HTTP Basic.

    The REST helpers of ``tests.peers.Orthanc`` (``rest``, ``post``,
    ``sop_instance_uids``, ``wait_for_instances``...) send the credentials.

    Args:
        workdir: config, storage, index and log go here (kept across restarts).
        username, password: the one registered user (``RegisteredUsers``).
        config: further keys merged into the JSON config, over the DICOMweb ones.
        **kwargs: the other ``Orthanc`` arguments (ae_title, ports, verbose...).
    """

    name = "orthanc-web"

    def __init__(self, workdir: str | os.PathLike, username: str = "router",
                 password: str = "router-password", config: dict | None = None, **kwargs):
        web_config = {
            "Plugins": [DICOMWEB_PLUGIN],
            "AuthenticationEnabled": True,
            "RegisteredUsers": {username: password},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        web_config.update(config or {})
        super().__init__(workdir, config=web_config, **kwargs)
        self.username = username
        self.password = password
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                 _BasicAuth(username, password))

    @property
    def credentials(self) -> tuple[str, str]:
        """(username, password): ``requests``' ``auth=`` takes it as it is."""
        return self.username, self.password

    @property
    def dicomweb_url(self) -> str:
        """``http://127.0.0.1:PORT/dicom-web``: STOW-RS is ``POST {this}/studies``."""
        return f"{self.url}/dicom-web"

    def start(self):
        if not Path(DICOMWEB_PLUGIN).exists():
            raise PeerError(f"{DICOMWEB_PLUGIN} missing: apt-get install orthanc-dicomweb "
                            "(tests/run does)")
        return super().start()

    def _wait_ready(self) -> None:
        super()._wait_ready()
        if "dicom-web" not in self.rest("/plugins"):
            raise PeerError(f"Orthanc did not load {DICOMWEB_PLUGIN}\n{self.log_tail()}")


class _PythonServer(_Server):
    """A server of ``tests/dicomweb_servers.py`` in its own interpreter, configured by a JSON file."""

    program = ""

    def __init__(self, workdir: str | os.PathLike, port: int | None = None):
        super().__init__(workdir)
        self.fixed_port = port
        self.port: int | None = port
        self.config_path = self.workdir / f"{self.name}.json"
        self.requests_path = self.workdir / f"{self.name}.requests.jsonl"

    def _choose_ports(self) -> None:
        self.port = self.fixed_port or free_port()
        self.config_path.write_text(json.dumps(
            {"port": self.port, "requests_log": str(self.requests_path), **self._config()}, indent=2))

    def _config(self) -> dict:
        raise NotImplementedError

    def _command(self) -> list[str]:
        return [sys.executable, "-u", "-m", "tests.dicomweb_servers", self.program,
                "--config", str(self.config_path)]

    def _env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return peer_env(PYTHONPATH=_REPO_ROOT + (os.pathsep + path if path else ""))

    def _wait_ready(self) -> None:
        wait_for_listen(self.proc, self.port, timeout=15)

    def _records(self) -> list[dict]:
        try:
            lines = self.requests_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line]

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


class TokenServer(_PythonServer):
    """An OAuth2 token endpoint for the client credentials grant (RFC 6749 4.4).

    ``POST /token`` with ``grant_type=client_credentials`` (form-encoded), the
    client authenticated by HTTP Basic or by ``client_id``/``client_secret``
    form fields, optional ``scope``, answers ``{"access_token", "token_type":
    "Bearer", "expires_in": ttl}``; a wrong client or secret is 401
    ``{"error": "invalid_client"}``, another grant 400 ``unsupported_grant_type``.
    Tokens are HMAC-signed with ``signing_key`` and carry their expiry: give the
    key to an ``AuthProxy``.  Every token request is one JSON line in
    ``requests_path`` (client_id, client_auth, grant_type, scope, status,
    token_id, time).

    Args:
        workdir: its config, request log and log go here.
        client_id, client_secret: the one registered client.
        ttl: token lifetime in seconds (``expires_in``).
        signing_key: hex HMAC key (default: a random one, kept across restarts).
        port: a fixed port; default a free one.
    """

    name = "token-server"
    program = "token-server"

    def __init__(self, workdir: str | os.PathLike, client_id: str = "router",
                 client_secret: str = "router-secret", ttl: int = 300,
                 signing_key: str | None = None, port: int | None = None):
        super().__init__(workdir, port)
        self.client_id = client_id
        self.client_secret = client_secret
        self.ttl = ttl
        self.signing_key = signing_key or secrets.token_hex(32)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/token``"""
        return f"{self.base_url}/token"

    def _config(self) -> dict:
        return {"key": self.signing_key, "clients": {self.client_id: self.client_secret},
                "ttl": self.ttl}

    def token_requests(self) -> int:
        """How many token requests it answered, refused ones included."""
        return len(self._records())

    def token_log(self) -> list[dict]:
        """The token requests, one dict each, oldest first (see the class docstring)."""
        return self._records()


class AuthProxy(_PythonServer):
    """A reverse proxy in front of an ``OrthancWeb``'s DICOMweb that wants bearer tokens.

    Every request except ``/_control`` needs ``Authorization: Bearer TOKEN``
    signed with ``signing_key`` and unexpired, else 401 with ``WWW-Authenticate:
    Bearer`` (``error="invalid_token"`` when a token was sent, RFC 6750 3.1).
    STOW-RS (``POST /dicom-web/studies[/UID]``) and every GET go on to Orthanc
    with its Basic credentials; its answer comes back as it is (502 when
    Orthanc cannot be reached, e.g. stopped for a test).

    Modes, set here at start and changed while it runs with the methods below
    (a ``POST /_control`` JSON request, effective for the next request; a
    restart starts from the modes as last set through this object):

    * failing instances (``fail``): a STOW request carrying them is parsed, the
      other parts go to Orthanc, and the answer is 202 with Orthanc's
      ReferencedSOPSequence and a FailedSOPSequence item (class, instance,
      Failure Reason) per failed one; 409 when nothing was stored (PS3.18
      10.5.3).  Each instance fails ``times`` requests (None: always).
    * a fixed status (``answer_stow_with``): every STOW request (token checked
      first) is answered that status, with ``Retry-After`` if given, and not
      forwarded, ``times`` times or until cleared.

    Every request except ``/_control`` is one JSON line in ``requests_path``:
    method, path, parts, sop_instance_uids, failed (the UIDs it failed),
    status, auth (ok, missing, expired, bad signature, malformed), token_id, time.

    Args:
        workdir: its config, request log and log go here.
        orthanc: the Orthanc behind it (started: its ports are read at start).
        signing_key: the token server's ``signing_key``.
        fail_uids, failure_reason, fail_times: instances to fail from the start.
        status, retry_after, status_times: a fixed STOW status from the start.
        port: a fixed port; default a free one.
    """

    name = "auth-proxy"
    program = "auth-proxy"

    def __init__(self, workdir: str | os.PathLike, orthanc: OrthancWeb, signing_key: str,
                 fail_uids: Iterable[str] = (), failure_reason: int = Status.OUT_OF_RESOURCES,
                 fail_times: int | None = 1, status: int | None = None,
                 retry_after: int | None = None, status_times: int | None = None,
                 port: int | None = None):
        super().__init__(workdir, port)
        self.orthanc = orthanc
        self.signing_key = signing_key
        self._modes: dict = {
            "fail_uids": {uid: {"times": fail_times, "reason": int(failure_reason)} for uid in fail_uids},
            "status": ({"code": status, "retry_after": retry_after, "times": status_times}
                       if status is not None else None),
        }
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``"""
        return self.base_url

    @property
    def dicomweb_url(self) -> str:
        """``http://127.0.0.1:PORT/dicom-web``: the STOW-RS base URL the router is given."""
        return f"{self.base_url}/dicom-web"

    def _config(self) -> dict:
        if self.orthanc.http_port is None:
            raise PeerError("start the Orthanc before its proxy")
        return {"key": self.signing_key, "modes": self._modes,
                "orthanc": {"port": self.orthanc.http_port, "username": self.orthanc.username,
                            "password": self.orthanc.password}}

    # -- modes ------------------------------------------------------------------

    def fail(self, uids: Iterable[str], reason: int = Status.OUT_OF_RESOURCES,
             times: int | None = 1) -> dict:
        """Fail these SOP Instance UIDs in the next ``times`` STOW requests carrying
        each (None: always; 0: stop failing it) with Failure Reason ``reason``.

        Returns:
            The proxy's modes after the change (see ``modes``).
        """
        return self._control({"fail_uids": {uid: {"times": times, "reason": int(reason)}
                                            for uid in uids}})

    def answer_stow_with(self, status: int, retry_after: int | None = None,
                         times: int | None = None) -> dict:
        """Answer the next ``times`` STOW requests (None: all, until cleared) with
        ``status`` and no forwarding; ``Retry-After: retry_after`` when given."""
        return self._control({"status": {"code": status, "retry_after": retry_after, "times": times}})

    def clear_status(self) -> dict:
        """Forward STOW requests again."""
        return self._control({"status": None})

    def clear(self) -> dict:
        """No failing instances, no fixed status."""
        return self._control({"clear": True})

    def modes(self) -> dict:
        """The modes as the proxy holds them now, with the uses left:
        ``{"fail_uids": {uid: {"times", "reason"}}, "status": {"code", "retry_after", "times"} | None}``."""
        return self._call("GET", None)

    def _control(self, change: dict) -> dict:
        state = self._call("POST", json.dumps(change).encode())
        self._modes = state
        return state

    def _call(self, method: str, body: bytes | None) -> dict:
        if self.proc is None:
            raise PeerError("the proxy is not running")
        req = urllib.request.Request(f"{self.base_url}/_control", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with self._http.open(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise PeerError(f"proxy control {method}: HTTP {exc.code} {exc.read()[:200]!r}") from exc

    # -- what it saw ------------------------------------------------------------

    def requests(self) -> list[dict]:
        """Every request it answered (except /_control), one dict each, oldest first."""
        return self._records()

    def stow_requests(self) -> list[dict]:
        """The STOW-RS requests among ``requests()``."""
        return [r for r in self._records() if r["method"] == "POST"]
