"""What a configuration that validates can still get wrong, found before anything starts.

A config that starts must not then refuse or quarantine every instance for a
reason known at start (docs/guarantees.md, G5): a rule that needs the
de-identification secret without one, a ``min_free_bytes`` larger than the
spool's whole volume (every C-STORE would get 0xA700), spool storage without
an operation the spool does to every instance, a port another process holds.
Each problem names the file, line and key, like the schema's.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from router.dashboard.token import bind_problem
from router.kernel import tls
from router.kernel.settings import Config
from router.kernel.spool import HOST
from rules.context import MorphContext, SecretMissing
from rules.loader import Loaded, Problem
from rules.ops import AnonymizeOp, DateShiftOp, SetOp, UidRemapOp

SECRET_FILE = "deid-secret"
"""Under the data directory: the secret `run` generates for a single machine."""


def first_rule_needing_secret(config: Config) -> tuple[int, str, str] | None:
    """(index, name, operation) of the first rule whose morph is keyed by the secret, or None."""
    for index, rule in enumerate(config.rules):
        for op in rule.morph:
            if isinstance(op, UidRemapOp | DateShiftOp | AnonymizeOp):
                return index, rule.name, type(op).__name__.removesuffix("Op").lower()
            if isinstance(op, SetOp) and any(
                getattr(part, "filter", None) == "hash" for spec in op.set.values() for part in spec.parts
            ):
                return index, rule.name, "set with the hash filter"
    return None


def needs_secret(config: Config) -> bool:
    """Whether any rule uses an operation keyed by the de-identification secret."""
    return first_rule_needing_secret(config) is not None


def secret_problem(config: Config, loaded: Loaded[Config]) -> Problem | None:
    """The rule that would quarantine every instance for want of a secret, if any."""
    needing = first_rule_needing_secret(config)
    if needing is None:
        return None
    index, name, operation = needing
    try:
        context = MorphContext.from_config(config)
    except SecretMissing as exc:
        key = ("deid", "secret_file") if config.deid.secret_file is not None else ("rules", index, "morph")
        return loaded.problem(key, str(exc), rule=name)
    if context.secret is None:
        return loaded.problem(
            ("rules", index, "morph"),
            f"{operation} needs the de-identification secret: set ${config.deid.secret_env} "
            "or deid.secret_file (the same on every host)",
            rule=name,
        )
    return None


def spool_volume_problem(config: Config, loaded: Loaded[Config]) -> Problem | None:
    """A ``min_free_bytes`` the spool's volume cannot meet even empty."""
    wanted = config.router.min_free_bytes
    if not wanted:
        return None
    folder = Path(config.router.spool_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    size = st.f_blocks * st.f_frsize
    if size > wanted:
        return None
    return loaded.problem(
        ("router", "min_free_bytes"),
        f"router.min_free_bytes is {wanted} bytes but the spool's volume ({folder}) holds {size} in all: "
        "every C-STORE would be answered 0xA700",
    )


SPOOL_PROBE = "spool-probe"
"""The stem of the files :func:`probe_spool` makes (and removes) in the spool."""

_SPOOL_NEEDS = {
    "create": "each instance is received into a new file, made with O_EXCL",
    "write": "each instance is written to the spool",
    "fdatasync": "an instance is answered Success only once its bytes are on disk (docs/guarantees.md, G1)",
    "close": "each instance is written to the spool",
    "hard link": "a routed instance is linked into its destinations' out/ folders: one file, however many",
    "rename": "an instance enters each state by a rename, never half-written",
    "fsync of the folder": "an instance's new name must survive a crash (docs/guarantees.md, G1)",
    "remove": "delivered instances are deleted",
}
"""Why the spool needs each operation :func:`probe_spool` tries."""


@dataclass(frozen=True)
class SpoolFault:
    """An operation the spool relies on that its storage refused."""

    operation: str
    """One of ``_SPOOL_NEEDS``' keys."""
    path: Path
    error: OSError

    def __str__(self) -> str:
        code = errno.errorcode.get(self.error.errno or 0, str(self.error.errno))
        return (f"{self.operation} failed on the spool's storage ({self.path}): {code} ({self.error.strerror}); "
                f"the spool needs it because {_SPOOL_NEEDS[self.operation]} "
                '(README, "Spool storage: what it must provide")')


def probe_spool(folder: Path) -> SpoolFault | None:
    """Do in ``folder`` what the spool does to every instance, then remove what was made:
    create a file (O_EXCL), write, cut (ftruncate) and fdatasync it, hard-link it, rename the link, fsync
    the folder (router/kernel/spool.py, ``Spool._make_durable``).

    The names carry this host, this process and a random token, as the spool's
    temp files do (``Spool.open_temp``): hosts starting together on one spool
    never collide, and in ``tmp/`` the spool's sweep removes what a probe
    killed midway left.

    Returns:
        The first operation the storage refused, or None when it did them all,
        or when it is full: a full spool is answered 0xA700 while the workers
        that empty it must start (docs/guarantees.md, G5).
    """
    token = secrets.token_hex(4)

    def name(step: str) -> Path:
        return folder / f"{SPOOL_PROBE}-{step}~{HOST}~{os.getpid()}~{token}.part"

    written, linked, renamed = name("written"), name("linked"), name("renamed")
    made: list[Path] = []
    fd = None
    operation, path = "create", written
    try:
        fd = os.open(written, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        made.append(written)
        operation = "write"
        os.write(fd, b"dicom-router spool probe\n")
        operation = "ftruncate"  # a recycled file is cut at the length of the instance written over it
        os.ftruncate(fd, 16)
        operation = "fdatasync"
        os.fdatasync(fd)
        operation, closing, fd = "close", fd, None
        os.close(closing)
        operation, path = "hard link", linked
        os.link(written, linked)
        made.append(linked)
        operation, path = "rename", renamed
        os.rename(linked, renamed)
        made[-1] = renamed
        operation, path = "fsync of the folder", folder
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        operation = "remove"
        while made:
            path = made[-1]
            os.unlink(path)
            made.pop()
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        for leftover in made:
            try:
                leftover.unlink()
            except OSError:
                pass  # the fault is reported; tmp/'s sweep takes what is left there
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return None
        return SpoolFault(operation, path, exc)
    return None


def spool_problem(config: Config, loaded: Loaded[Config], serving: bool) -> Problem | None:
    """Spool storage that refuses an operation the spool does to every instance
    (:func:`probe_spool`), tried where instances are written: ``tmp/``, else the
    spool directory.

    Args:
        serving: the command starts serving. A spool not made yet is tried in
            its nearest existing parent, where it will be made; ``check``
            (possibly on a host without the spool) tries only a spool that is there.
    """
    root = Path(config.router.spool_dir)
    folder = root / "tmp" if (root / "tmp").is_dir() else root
    if not folder.is_dir():
        if not serving:
            return None
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
    fault = probe_spool(folder)
    return None if fault is None else loaded.problem(("router", "spool_dir"), str(fault))


def port_problem(config: Config, loaded: Loaded[Config]) -> Problem | None:
    """The ingest's port, when another process holds it."""
    return _port_taken(config.router.host, config.router.port, loaded, ("router", "port"))


def tls_port_problem(config: Config, loaded: Loaded[Config]) -> Problem | None:
    """The ingest's TLS port, when another process holds it."""
    if config.router.tls is None:
        return None
    return _port_taken(config.router.host, config.router.tls.port, loaded, ("router", "tls", "port"))


def _tls_problem(build, settings, loaded: Loaded[Config], key: tuple) -> Problem | None:  # noqa: ANN001
    """Why ``settings`` make no TLS context, or None: a file missing or unreadable (at
    that file's line), a key that is not its certificate's or a CA file that holds no
    certificate (at the ``tls`` key's)."""
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(settings, name)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return loaded.problem((*key, name), f"DICOM TLS: cannot read {path}: {exc.strerror}")
    try:
        build(settings)
    except (OSError, ssl.SSLError) as exc:
        return loaded.problem(key, f"DICOM TLS: {settings.cert_file or settings.ca_file} and its key or CA "
                                   f"do not make a TLS context: {exc}")
    return None


def ingest_tls_problems(config: Config, loaded: Loaded[Config]) -> list[Problem]:
    """``router.tls`` and the modalities' ``tls``, for the commands that serve the ingest."""
    found = []
    if config.router.tls is not None:
        found.append(_tls_problem(tls.server_context, config.router.tls, loaded, ("router", "tls")))
    for ae, modality in config.modalities.items():
        if modality.tls is not None:
            found.append(_tls_problem(tls.client_context, modality.tls, loaded, ("modalities", ae, "tls")))
    return [problem for problem in found if problem is not None]


def destination_tls_problems(config: Config, loaded: Loaded[Config]) -> list[Problem]:
    """The destinations' ``tls``, for the commands that forward."""
    found = [_tls_problem(tls.client_context, dest.tls, loaded, ("destinations", name, "tls"))
             for name, dest in config.destinations.items() if dest.tls is not None]
    return [problem for problem in found if problem is not None]


def dashboard_port_problem(config: Config, loaded: Loaded[Config]) -> Problem | None:
    """The dashboard's port, when another process holds it (``run`` serves it)."""
    if config.dashboard is None:
        return None
    return _port_taken(config.dashboard.host, config.dashboard.port, loaded, ("dashboard", "port"))


def dashboard_problem(config: Config, loaded: Loaded[Config]) -> Problem | None:
    """A dashboard bound beyond loopback without a token: anyone who reaches the port could retry and purge."""
    if config.dashboard is None:
        return None
    found = bind_problem(config.dashboard)
    return None if found is None else loaded.problem(("dashboard", found[0]), found[1])


def _port_taken(host: str, port: int, loaded: Loaded[Config], key: tuple[str, str]) -> Problem | None:
    if not port:
        return None
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the ingest binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise
            return loaded.problem(key, f"cannot listen on {host}:{port}: {exc.strerror}")
    return None


def dicomweb_problems(config: Config, loaded: Loaded[Config],
                      environ: dict[str, str] | os._Environ = os.environ) -> list[Problem]:
    """A DICOMweb destination whose credential is not there: its environment variable
    unset, its token file or CA file unreadable. Every instance would wait for it."""
    found = []
    for name, destination in config.destinations.items():
        web = destination.dicomweb
        if web is None:
            continue
        key = ("destinations", name, "dicomweb")
        for field, variable in (("token_env", web.token_env), ("password_env", web.password_env),
                                ("oauth2", web.oauth2.client_secret_env if web.oauth2 else None)):
            if variable and not environ.get(variable):
                found.append(loaded.problem((*key, field), f"{name}'s DICOMweb credential: set the environment "
                                                           f"variable {variable}"))
        for field, path in (("token_file", web.token_file), ("ca_file", web.ca_file)):
            if path is None:
                continue
            try:
                if not Path(path).read_bytes().strip():
                    found.append(loaded.problem((*key, field), f"{name}'s {field} {path} is empty"))
            except OSError as exc:
                found.append(loaded.problem((*key, field), f"{name}'s {field} {path}: {exc.strerror or exc}"))
    return found


def problems(config: Config, loaded: Loaded[Config], listen: bool, morphs: bool = True,
             dashboard: bool = False, ingests: bool = False, serving: bool = False) -> list[Problem]:
    """Everything that would make a router started with ``config`` fail later.

    Args:
        config: the validated configuration (paths resolved).
        loaded: the same, with where each value was written.
        listen: the command will bind the ingest's port (``run``), and the
            dashboard's when the config has one.
        morphs: the command routes and morphs (``run``, ``worker``, ``check``);
            an ``ingest`` alone on its host needs no de-identification secret.
        dashboard: the command serves the dashboard (``run``, ``dashboard``) or
            checks the whole config (``check``): its token must be there. An
            ingest or worker on another host has no need of it.
        ingests: the command serves the ingest (``run``, ``ingest``, ``check``):
            its TLS certificate and key, and the modalities', must load.
        serving: the command starts serving (every one but ``check``): the
            spool's storage is tried even before the spool is made.
    """
    checks = [spool_volume_problem]
    checks += [secret_problem] if morphs else []
    checks += [dashboard_problem] if dashboard else []
    checks += [port_problem, tls_port_problem, dashboard_port_problem] if listen else []
    found = [problem for check in checks if (problem := check(config, loaded)) is not None]
    found += [problem] if (problem := spool_problem(config, loaded, serving)) is not None else []
    found += ingest_tls_problems(config, loaded) if ingests else []
    found += destination_tls_problems(config, loaded) if morphs else []
    found += dicomweb_problems(config, loaded) if morphs else []
    return found


def notices(config: Config, loaded: Loaded[Config]) -> list[Problem]:
    """What is accepted but does not act as one might expect: said at ``check`` and at start, never silent."""
    return []


def single_machine_secret(config: Config, environ: dict[str, str] | os._Environ = os.environ) -> Path | None:
    """For ``run`` on one machine (no ``redis_url``): the secret its rules need,
    generated once and kept in the data directory, handed to the children in
    ``deid.secret_env``. Several hosts must share one secret instead: set it
    there (``secret_env`` or ``secret_file``), and this does nothing.

    Returns:
        The secret file used, or None when none was needed or one is configured.
    """
    deid = config.deid
    if config.router.redis_url is not None or not needs_secret(config):
        return None
    if deid.secret_file is not None or environ.get(deid.secret_env):
        return None
    path = config.router.redis_data_dir / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
    environ[deid.secret_env] = path.read_text().strip()
    return path
