"""Configuration of a router: the YAML file's schema, validated by pydantic.

Settings are built once, by :func:`load_config`, and passed into every part
that needs them; nothing re-reads the file behind the caller's back.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from rules.facts import peer_address
from rules.models import DeidSettings, Rule, UnroutedPolicy

if TYPE_CHECKING:
    from rules.loader import Loaded

AE_TITLE_MAX = 16  # PS3.5 6.2: AE is at most 16 characters


class _Strict(BaseModel):
    # A typo in a key is an error, never a silently ignored field.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not value or len(value) > AE_TITLE_MAX:
        raise ValueError(f"an AE title has 1 to {AE_TITLE_MAX} characters, got {value!r}")
    if "\\" in value or any(ord(c) < 0x20 for c in value):
        raise ValueError(f"an AE title may not contain backslashes or control characters: {value!r}")
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]
"""An AE title as a mapping key (``modalities:``): a bad one is an error at its own line."""


class AllowedCaller(_Strict):
    """One entry of ``accept.calling_ae_titles``: an AE title, or an AE title and
    the identity its TLS certificate must carry."""

    ae_title: AETitle
    tls_identity: str | None = None
    """A subject common name or subjectAltName (DNS name, IP address, e-mail,
    URI) the caller's verified certificate must carry (``router.tls``). An AE
    title alone is a word anyone can say; with this, a caller that says it
    without that certificate — on the plain port, or with another
    certificate — is refused."""


class AcceptSettings(_Strict):
    """Who may send to the ingest SCP; an empty list means anyone."""

    calling_ae_titles: list[AllowedCaller] = Field(default_factory=list)
    """AE titles (``CT_1``) or AE titles with the certificate identity they
    must present (``{ae_title: CT_1, tls_identity: ct1.example.org}``)."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)

    @field_validator("calling_ae_titles", mode="before")
    @classmethod
    def _titles_alone(cls, entries: object) -> object:
        if isinstance(entries, list):
            return [{"ae_title": entry} if isinstance(entry, str) else entry for entry in entries]
        return entries

    def caller(self, ae_title: str) -> AllowedCaller | None:
        """The entry for ``ae_title``, or None when it is not listed."""
        return next((entry for entry in self.calling_ae_titles if entry.ae_title == ae_title), None)

    def allows_address(self, address: str) -> bool:
        """Whether a peer at ``address`` may associate (True when no networks are set)."""
        if not self.networks:
            return True
        ip = peer_address(address)
        return ip is not None and any(ip in net for net in self.networks)


class IngestTLSSettings(_Strict):
    """``router.tls``: DICOM TLS (PS3.15 Annex B) on a port of its own, beside the plain one."""

    port: int = Field(2762, ge=0, le=65535)
    """2762 is the port IANA registered for DICOM over TLS."""
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    """Callers' certificates are verified against it."""
    require_client_cert: bool = True
    """Mutual authentication: a caller without a certificate that verifies
    against ``ca_file`` fails the handshake and never reaches DIMSE."""

    @model_validator(mode="after")
    def _can_verify(self) -> IngestTLSSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file, to verify callers' certificates against")
        return self


class PeerTLSSettings(_Strict):
    """``tls`` of a destination or modality: the router connects to it with DICOM TLS.

    ``tls: true`` is this with every default: the system's CAs, no client
    certificate. Nothing is ever sent in the clear to such a peer: a
    certificate that does not verify holds it with that reason.
    """

    ca_file: Path | None = None
    """The CA its certificate must verify against; omitted: the system's CAs."""
    cert_file: Path | None = None
    """The router's own certificate, for a peer that asks for one (mutual authentication)."""
    key_file: Path | None = None
    check_hostname: bool = True
    """The certificate must name ``host`` (a DNS name or IP address in its subjectAltName)."""

    @model_validator(mode="after")
    def _pair(self) -> PeerTLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


def _peer_tls(value: object) -> object:
    """``tls: true`` -> every default; ``tls: false`` -> none. The config loader hands
    scalars over as YAML wrote them (``"true"``): read as pydantic reads a bool."""
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        value = value.strip().lower() in _TRUE
    if value is True:
        return PeerTLSSettings()
    if value is False:
        return None
    return value


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class RouterSettings(_Strict):
    """The ingest side and the shared plumbing."""

    ae_title: str = "DICOM_ROUTER"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    spool_dir: Path = Path("./var/spool")
    data_dir: Path | None = None
    """Where the embedded Redis keeps its files; defaults to ``<spool_dir>/../redis``."""
    redis_url: str | None = None
    """Omitted: ``dicom-router run`` starts an embedded Redis."""
    accept: AcceptSettings = Field(default_factory=AcceptSettings)
    max_pdu: int = Field(0, ge=0)
    """Maximum PDU length the ingest SCP offers; 0 means unlimited (fewer, larger PDUs)."""
    network_timeout: float = Field(60.0, gt=0)
    """Seconds an association may stay silent before it is aborted."""
    max_associations: int = Field(64, ge=1)
    """Associations the ingest serves at once; more get a transient A-ASSOCIATE-RJ (local limit exceeded)."""
    max_associations_per_peer: int = Field(16, ge=1)
    """Connections and associations one peer address may hold, so that one
    broken or hostile host cannot lock every modality out."""
    route_at_ingest: bool = True
    """Route in the ingest process, right after the answer, every instance whose
    destinations all take it unchanged (a hard link each): no Redis hop, no
    second read of its header. Instances that some destination gets morphed,
    and anything the ingest cannot route, go to the routing worker as before."""
    worker_nice: int = Field(0, ge=0, le=19)
    """How much lower the CPU priority (``nice``) of the routing and forwarding
    workers is than the ingest's: a modality waits for the ingest's answer to
    each instance, forwarding waits for nobody. Each worker lowers its own
    priority as it starts, however it is started (``run``, systemd,
    containers). 0 by default: measured on two cores (docs/measurements.md),
    niced workers let deliveries fall behind a burst, the ingest then makes
    new files instead of writing over delivered ones, and nothing was gained
    in the answers' pace."""
    reconcile_interval: float = Field(30.0, gt=0)
    """Seconds between sweeps that re-queue spool files Redis no longer knows."""
    history_days: float = Field(7.0, gt=0)
    """How long an instance's history (its journey, what a storage commitment request is
    answered from) stays in Redis after its last step. Redis holds ~1.3 KiB per instance for
    that long (README, "Redis memory")."""
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """Below this much free space in the spool, C-STORE is answered 0xA700."""
    tls: IngestTLSSettings | None = None
    """DICOM TLS on a second port; omitted: plain TCP only."""
    commitment: CommitmentScpSettings = Field(default_factory=lambda: CommitmentScpSettings())
    """Storage commitment toward modalities: on by default in ``received`` mode,
    since answering a modality's N-ACTION truthfully harms nothing."""

    @field_validator("ae_title")
    @classmethod
    def _check_title(cls, value: str) -> str:
        return _ae_title(value)

    @model_validator(mode="before")
    @classmethod
    def _one_engine(cls, data: object) -> object:
        """``engine`` chose between two ingest SCPs; one is left. ``fast`` (the one
        left) is still taken, so a working config keeps starting; ``pynetdicom``
        is refused by name rather than as an unknown key."""
        if isinstance(data, dict) and "engine" in data:
            if data["engine"] != "fast":
                raise ValueError(f"engine: {data['engine']!r} is gone: the router has one ingest engine; "
                                 "delete the key")
            data = {key: value for key, value in data.items() if key != "engine"}
        return data

    @property
    def redis_data_dir(self) -> Path:
        return self.data_dir or self.spool_dir.parent / "redis"


class RetrySettings(_Strict):
    """How often and how patiently something is tried again.

    As a destination's ``retry``: the back-off while it cannot be reached,
    refuses associations, or refuses every instance (0xA7xx to all), and the
    attempts an instance gets while it refuses everything. As its
    ``instance_retry``: the short schedule of one instance it refuses while
    it accepts others.
    """

    max_attempts: int = Field(12, ge=1)
    """Attempts per instance before it becomes a dead letter."""
    backoff_seconds: list[float] = Field(default_factory=lambda: [5, 30, 120, 600, 3600])
    jitter: float = Field(0.2, ge=0, le=1)
    """Each delay is spread by up to this fraction, so retries do not stampede."""

    @field_validator("backoff_seconds")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value or any(v < 0 for v in value):
            raise ValueError("backoff_seconds needs at least one non-negative number")
        return value

    def delay(self, attempt: int) -> float:
        """The base delay before retry number ``attempt`` (1-based), without jitter."""
        return self.backoff_seconds[min(attempt, len(self.backoff_seconds)) - 1]


# Every choice is a syntax the sender can transcode to faithfully
# (workers/transcode.py): the uncompressed ones, and the lossless compressed
# ones: RLE (1.2.840.10008.1.2.5), JPEG Lossless SV1 (.4.70), JPEG-LS lossless
# (.4.80), JPEG 2000 lossless (.4.90). Explicit VR Big Endian, retired in
# 2006, is not one: a destination is sent it only as-received.
TransferSyntaxChoice = Literal[
    "as-received", "explicit-le", "implicit-le", "deflate",
    "rle", "jpeg-lossless", "jpeg-ls-lossless", "jpeg-2000-lossless",
]


class StorageCommitmentSettings(_Strict):
    """Storage commitment toward a destination (``storage_commitment: {...}``)."""

    timeout_seconds: float = Field(600.0, gt=0)
    """How long a report may take after the N-ACTION; then it is asked again."""
    max_requests: int = Field(5, ge=1)
    """Requests per instance (the first and the re-requests after a timeout) before
    an instance the destination stored but never reported becomes a dead letter."""


class CommitmentScpSettings(_Strict):
    """The router as Storage Commitment SCP toward modalities (``router.commitment``).

    ``received``: an instance is reported committed once it is durably in
    the spool. ``delivered``: only once every destination the rules chose
    has acknowledged it (and committed it, where that destination commits);
    what is still missing after ``timeout_seconds`` is reported failed.
    """

    mode: Literal["received", "delivered"] = "received"
    timeout_seconds: float = Field(3600.0, gt=0)
    """How long a request may wait for its instances before what is missing is reported failed."""
    report_retry: RetrySettings = Field(
        default_factory=lambda: RetrySettings(max_attempts=10, backoff_seconds=[5, 30, 120, 600, 3600])
    )
    """Delivering the report to a modality that cannot be reached: tried this
    often on this back-off, then dropped with an error in the log."""


class Modality(_Strict):
    """A peer the router knows by AE title (``modalities:``): where its commitment
    reports go when its own association is gone, and where a C-MOVE that names it as
    Move Destination sends the instances (``query_retrieve:``)."""

    host: str
    port: int = Field(ge=1, le=65535)
    tls: PeerTLSSettings | None = None
    """Reports and retrieved instances go to it over DICOM TLS (``true`` or settings, as a destination's)."""
    transfer_syntaxes: list[TransferSyntaxChoice] = Field(
        default_factory=lambda: ["as-received", "explicit-le", "implicit-le"]
    )
    """For instances retrieved for it by C-MOVE: as a destination's ``transfer_syntaxes``."""

    _tls_shorthand = field_validator("tls", mode="before")(_peer_tls)


class OAuth2Settings(_Strict):
    """OAuth 2.0 client credentials (RFC 6749 §4.4): the router fetches a token from
    ``token_url``, keeps it, and fetches a new one before it expires and once when the
    destination answers 401."""

    token_url: str
    client_id: str
    client_secret_env: str
    """The environment variable holding the client secret (never the config file)."""
    scope: str | None = None

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)


def _http_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an http:// or https:// URL with a host, got {value!r}")
    return value.rstrip("/")


class DicomWebSettings(_Strict):
    """``dicomweb`` of a destination: it receives instances by STOW-RS (PS3.18 §10.5),
    ``POST {url}/studies`` with ``multipart/related; type="application/dicom"`` bodies.

    Authentication, at most one: ``token_env`` or ``token_file`` (a bearer token),
    ``username`` and ``password_env`` (Basic), or ``oauth2`` (client credentials).
    """

    url: str
    """The DICOMweb service's base URL (the STOW-RS path ``/studies`` is added)."""
    token_env: str | None = None
    """``Authorization: Bearer`` with the token in this environment variable."""
    token_file: Path | None = None
    """``Authorization: Bearer`` with the token in this file (read again when it changes)."""
    username: str | None = None
    password_env: str | None = None
    """With ``username``: HTTP Basic, the password in this environment variable."""
    oauth2: OAuth2Settings | None = None
    ca_file: Path | None = None
    """For ``https://``: the CA the server's certificate must verify against; omitted: the system's CAs."""
    max_instances: int = Field(50, ge=1, le=10000)
    """Instances per request at most."""
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Bytes of instances per request at most (an instance larger than this goes alone)."""
    timeout: float = Field(120.0, gt=0)
    """Seconds a request may take to connect, and then between any two reads of its answer."""

    _url = field_validator("url")(classmethod(lambda cls, value: _http_url(value)))

    @model_validator(mode="after")
    def _one_authentication(self) -> DicomWebSettings:
        chosen = [name for name, on in (("token_env", self.token_env), ("token_file", self.token_file),
                                        ("username", self.username), ("oauth2", self.oauth2)) if on]
        if len(chosen) > 1:
            raise ValueError(f"one authentication at most, got {' and '.join(chosen)}")
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together (HTTP Basic)")
        return self


class Destination(_Strict):
    """A peer that receives instances: by C-STORE (``ae_title``, ``host``, ``port``), or
    by STOW-RS (``dicomweb``)."""

    ae_title: str = ""
    host: str = ""
    port: int = Field(0, ge=0, le=65535)
    dicomweb: DicomWebSettings | None = None
    """Send by STOW-RS to this DICOMweb service instead of C-STORE (README, "DICOMweb destinations")."""
    calling_ae_title: str | None = None
    """The AE title the router presents; defaults to ``router.ae_title``."""
    transfer_syntaxes: list[TransferSyntaxChoice] = Field(
        default_factory=lambda: ["as-received", "explicit-le", "implicit-le"]
    )
    """In preference order: the sender sends in the first one the destination
    accepted (``as-received``: the instance's own syntax), and as it is when
    the destination accepted none of them but its own syntax."""
    max_associations: int = Field(1, ge=1, le=16)
    idle_timeout: float = Field(10.0, gt=0)
    """Seconds an unused association stays open for the next instance."""
    connect_timeout: float = Field(10.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    """Seconds to wait for other DIMSE answers (storage commitment's N-ACTION)."""
    store_timeout: float = Field(30.0, gt=0)
    """Seconds a destination may take to answer a C-STORE; one that does not is
    hung or far too slow, and is held on its ``retry`` schedule instead of
    costing this long for every instance."""
    max_pdu: int = Field(0, ge=0)
    tls: PeerTLSSettings | None = None
    """Connect with DICOM TLS: ``true`` (the system's CAs) or settings."""
    echo_interval_seconds: float = Field(60.0, ge=0)
    """Seconds between C-ECHOs that check the destination's health while
    nothing else does: not while it is held (it is probed on its ``retry``
    schedule then) nor while it acknowledges instances. 0: never."""
    storage_commitment: bool | StorageCommitmentSettings = False
    """``true`` (or its settings): ask the destination to commit what it stored
    (Storage Commitment Push Model); the spool keeps each instance until it has."""
    retry: RetrySettings = Field(default_factory=RetrySettings)
    instance_retry: RetrySettings = Field(
        default_factory=lambda: RetrySettings(max_attempts=4, backoff_seconds=[10, 60, 300])
    )
    """One instance refused (0xA7xx, or the association lost while it was in
    flight) while the destination accepts others: that instance's problem, a
    dead letter after minutes, not after the destination's hours."""

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _check_title(cls, value: str | None) -> str | None:
        return None if value is None or value == "" else _ae_title(value)

    @model_validator(mode="after")
    def _dimse_or_dicomweb(self) -> Destination:
        dimse = [name for name, value in (("ae_title", self.ae_title), ("host", self.host), ("port", self.port))
                 if value]
        if self.dicomweb is not None:
            if dimse:
                raise ValueError(f"a DICOMweb destination has no {', '.join(dimse)} (those are for C-STORE)")
            if self.storage_commitment:
                raise ValueError("storage_commitment is DIMSE's (N-ACTION): a DICOMweb destination has none")
            if self.tls is not None:
                raise ValueError("tls is DICOM TLS: a DICOMweb destination takes https:// and dicomweb.ca_file")
            return self
        missing = [name for name in ("ae_title", "host", "port") if name not in dimse]
        if missing:
            raise ValueError(f"a destination needs ae_title, host and port (C-STORE) or dicomweb (STOW-RS); "
                             f"missing {', '.join(missing)}")
        return self

    _tls_shorthand = field_validator("tls", mode="before")(_peer_tls)

    @property
    def commitment(self) -> StorageCommitmentSettings | None:
        """The storage commitment settings, or None when the destination is not asked to commit."""
        if isinstance(self.storage_commitment, StorageCommitmentSettings):
            return self.storage_commitment
        return StorageCommitmentSettings() if self.storage_commitment else None


class QueryRetrieveSettings(_Strict):
    """The router as Query/Retrieve SCP (``query_retrieve:``; README, "Query/Retrieve,
    worklist and MPPS"): Patient Root and Study Root C-FIND, C-MOVE and C-GET,
    answered from ``sources``."""

    sources: list[str] = Field(min_length=1)
    """Destinations that are Q/R SCPs: a C-FIND is asked of each and the answers
    merged; a retrieve takes each instance from the first source that has it."""
    find_timeout: float = Field(60.0, gt=0)
    """Seconds a source may take between two answers to a C-FIND; then it is left out."""
    retrieve_timeout: float = Field(600.0, gt=0)
    """Seconds a source may take between two answers (or instances) of a retrieve."""


class WorklistSettings(_Strict):
    """Modality Worklist (``worklist:``): a worklist C-FIND relayed to ``source``."""

    source: str
    """The destination that is the worklist SCP (a RIS, a broker)."""
    timeout: float = Field(30.0, gt=0)
    """Seconds the source may take between two answers; then the caller gets a failure."""


class MppsSettings(_Strict):
    """Modality Performed Procedure Step (``mpps:``): each N-CREATE and N-SET relayed to
    every destination in ``forward``, in the order received."""

    forward: list[str] = Field(min_length=1)
    retry: RetrySettings = Field(
        default_factory=lambda: RetrySettings(max_attempts=1000, backoff_seconds=[5, 30, 120, 600])
    )
    """How a destination that cannot be reached is tried again; a message it refuses
    for good is a dead letter and the ones after it go on (its status is in the journey)."""
    timeout: float = Field(20.0, gt=0)
    """Seconds a destination may take to answer a relayed message (after its
    ``connect_timeout`` to associate); one that does not is sent it again later
    from the hold, so a modality's own DIMSE timeout should be longer than both."""


class DashboardSettings(_Strict):
    """The web dashboard, its JSON API and ``/metrics`` (``dicom-router dashboard``; ``run`` serves it too).

    Bound to loopback by default: only someone on the router's host sees it.
    Bound beyond loopback it requires the token (``check`` and ``run`` refuse
    such a bind without one), from ``token_file`` when set, else from the
    environment variable ``token_env``.
    """

    host: str = "127.0.0.1"
    port: int = Field(8484, ge=1, le=65535)
    token_env: str = "DICOM_ROUTER_TOKEN"
    token_file: Path | None = None


class Config(_Strict):
    """A whole router configuration file."""

    router: RouterSettings = Field(default_factory=RouterSettings)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    modalities: dict[AETitle, Modality] = Field(default_factory=dict)
    """Modalities by AE title: where a storage commitment report goes on a new association."""
    unrouted: UnroutedPolicy = "keep"
    rules: list[Rule] = Field(default_factory=list)
    deid: DeidSettings = Field(default_factory=DeidSettings)
    """Where the secret for uid_remap, date_shift and anonymize comes from."""
    dashboard: DashboardSettings | None = None
    """Omitted: no dashboard (``run`` starts none)."""
    query_retrieve: QueryRetrieveSettings | None = None
    """Omitted: the router answers no C-FIND, C-MOVE or C-GET."""
    worklist: WorklistSettings | None = None
    """Omitted: no Modality Worklist."""
    mpps: MppsSettings | None = None
    """Omitted: no MPPS."""

    @field_validator("destinations")
    @classmethod
    def _check_names(cls, value: dict[str, Destination]) -> dict[str, Destination]:
        for name in value:
            # Destination names become Redis keys and directory names.
            if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
                raise ValueError(f"destination name {name!r}: use letters, digits, '-', '_' and '.'")
        return value

    @model_validator(mode="after")
    def _services_name_dimse_destinations(self) -> Config:
        named = []
        if self.query_retrieve is not None:
            named += [("query_retrieve.sources", name) for name in self.query_retrieve.sources]
        if self.worklist is not None:
            named.append(("worklist.source", self.worklist.source))
        if self.mpps is not None:
            named += [("mpps.forward", name) for name in self.mpps.forward]
        for where, name in named:
            destination = self.destinations.get(name)
            if destination is None:
                raise ValueError(f"{where}: {name!r} is not one of destinations: "
                                 f"{', '.join(sorted(self.destinations)) or 'none'}")
            if destination.dicomweb is not None:
                raise ValueError(f"{where}: {name!r} is a DICOMweb destination; this needs a DIMSE peer "
                                 f"(ae_title, host, port)")
        return self

    def relative_to(self, base: Path) -> Config:
        """This config with relative paths taken from ``base`` (the config file's folder).

        A config then works whatever directory the service is started from.
        """
        router = self.router
        spool = router.spool_dir if router.spool_dir.is_absolute() else base / router.spool_dir
        data = router.data_dir
        if data is not None and not data.is_absolute():
            data = base / data
        update = {"spool_dir": spool.resolve(), "data_dir": data.resolve() if data else None,
                  "tls": _files_from(router.tls, base)}
        changes: dict[str, object] = {"router": router.model_copy(update=update)}
        dashboard = self.dashboard
        if dashboard is not None and dashboard.token_file is not None and not dashboard.token_file.is_absolute():
            changes["dashboard"] = dashboard.model_copy(update={"token_file": (base / dashboard.token_file).resolve()})
        changes["destinations"] = {name: dest.model_copy(update={"tls": _files_from(dest.tls, base)})
                                   for name, dest in self.destinations.items()}
        changes["modalities"] = {ae: modality.model_copy(update={"tls": _files_from(modality.tls, base)})
                                 for ae, modality in self.modalities.items()}
        return self.model_copy(update=changes)


_TLSSettings = TypeVar("_TLSSettings", IngestTLSSettings, PeerTLSSettings)


def _files_from(tls: _TLSSettings | None, base: Path) -> _TLSSettings | None:
    """``tls`` with its relative certificate and key paths taken from ``base``."""
    if tls is None:
        return None
    update = {}
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, name)
        if path is not None and not path.is_absolute():
            update[name] = (base / path).resolve()
    return tls.model_copy(update=update)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file.

    Raises:
        rules.loader.ConfigError: naming the file, line and reason of every problem.
    """
    return load_config_located(path)[0]


def load_config_located(path: str | os.PathLike[str]) -> tuple[Config, Loaded[Config]]:
    """:func:`load_config`, and where each value was written (for later problems, ``router/preflight.py``).

    Raises:
        rules.loader.ConfigError: naming the file, line and reason of every problem.
    """
    from rules.loader import load_located

    path = Path(path)
    loaded = load_located(path, Config)
    return loaded.model.relative_to(path.resolve().parent), loaded
