"""Shared fixtures: a real Redis, DCMTK and Orthanc peers, real DICOM data.

Helpers live in ``tests/peers.py`` and ``tests/data.py``; import them as
``from tests.peers import StoreSCP, storescu`` and ``from tests import data``
(the repository root is put on ``sys.path`` below, so this works under
``python -m pytest`` and plain ``pytest`` alike).  Every server a fixture
starts is stopped, by PID, at teardown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from router.kernel.dispatch import Dispatcher  # noqa: E402
from router.kernel.spool import Spool  # noqa: E402
from tests import data, peers  # noqa: E402
from workers.runtime import DRAIN_JOB  # noqa: E402

# DCMTK reads TCP_NODELAY from its environment (Debian leaves Nagle on: ~45 ms
# per C-STORE otherwise); any DCMTK program a test starts inherits it.
os.environ.setdefault("TCP_NODELAY", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end test against real peers (DCMTK, Orthanc, Redis)")


# -- Redis --------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """The session's Redis: ``REDIS_URL`` when set, else a private redis-server.

    Yields an object with ``.url``; a private server is a ``peers.RedisServer``.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        yield SimpleNamespace(url=_database_of_this_worker(url), pid=None)
        return
    with peers.RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _database_of_this_worker(url: str) -> str:
    """``url`` with its database number moved by this xdist worker's index (gw0: as
    given, gw1: the next…), so that parallel test processes sharing one Redis never
    flush each other's data."""
    from urllib.parse import urlsplit, urlunsplit

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{base + index}"))


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session Redis, its database flushed before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_conn(redis_url):
    """A redis-py client on the flushed database (closed after the test)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_factory(tmp_path: Path):
    """Start extra private redis-servers: ``redis_factory(persistent=False, port=None)``.

    For tests that restart or kill Redis.  All are stopped at teardown.
    """
    started: list[peers.RedisServer] = []

    def make(persistent: bool = False, port: int | None = None,
             workdir: str | os.PathLike | None = None) -> peers.RedisServer:
        workdir = workdir or tmp_path / f"redis{len(started)}"
        server = peers.RedisServer(workdir, persistent=persistent, port=port)
        started.append(server)
        return server.start()

    yield make
    peers.stop_all(started)


# -- DICOM peers --------------------------------------------------------------

@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A fresh directory for this test (pytest's tmp_path)."""
    return tmp_path


def _started_servers(tmp_path: Path, prefix: str, build, folder: str = "workdir"):
    """A factory fixture's body: ``make(folder=None, **kwargs)`` builds a server with
    ``build(folder or tmp_path/prefixN, **kwargs)`` (its folder given by position or by
    the name ``folder``), starts and returns it; every one is stopped at teardown
    (concurrently)."""
    started: list[peers._Server] = []

    def make(first: str | os.PathLike | None = None, /, **kwargs):
        first = first or kwargs.pop(folder, None)
        server = build(first or tmp_path / f"{prefix}{len(started)}", **kwargs)
        started.append(server)
        return server.start()

    yield make
    peers.stop_all(started)


@pytest.fixture
def storescp_factory(tmp_path: Path):
    """Start DCMTK storescp destinations: ``storescp_factory(out_dir=None, **StoreSCP kwargs)``,
    ``out_dir`` by default ``tmp_path/storescpN``."""
    yield from _started_servers(tmp_path, "storescp", peers.StoreSCP, folder="out_dir")


@pytest.fixture
def orthanc_factory(tmp_path: Path):
    """Start private Orthancs: ``orthanc_factory(workdir=None, **Orthanc kwargs)``,
    ``workdir`` by default ``tmp_path/orthancN`` (each takes ~3 s to stop)."""
    yield from _started_servers(tmp_path, "orthanc", peers.Orthanc)


# -- DICOMweb peers -------------------------------------------------------------

@pytest.fixture
def orthanc_web(tmp_path: Path):
    """Start Orthancs with DICOMweb behind HTTP Basic: ``orthanc_web(workdir=None, **OrthancWeb kwargs)``."""
    from tests.dicomweb_peers import OrthancWeb

    yield from _started_servers(tmp_path, "orthanc_web", OrthancWeb)


@pytest.fixture
def token_server(tmp_path: Path):
    """Start OAuth2 token endpoints: ``token_server(workdir=None, **TokenServer kwargs)``
    (client_id, client_secret, ttl...)."""
    from tests.dicomweb_peers import TokenServer

    yield from _started_servers(tmp_path, "token_server", TokenServer)


@pytest.fixture
def auth_proxy(tmp_path: Path):
    """Start bearer-token proxies: ``auth_proxy(orthanc, token_server, workdir=None, **AuthProxy kwargs)``;
    ``orthanc`` is a started OrthancWeb, and the proxy checks tokens with ``token_server.signing_key``."""
    from tests.dicomweb_peers import AuthProxy

    servers = _started_servers(tmp_path, "auth_proxy",
                               lambda workdir, orthanc, tokens, **kw: AuthProxy(workdir, orthanc, tokens.signing_key,
                                                                                **kw))
    start = next(servers)

    def make(orthanc, tokens, workdir: str | os.PathLike | None = None, **kwargs):
        return start(workdir, orthanc=orthanc, tokens=tokens, **kwargs)

    yield make
    next(servers, None)


# -- DICOM data ---------------------------------------------------------------

@pytest.fixture(scope="session")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Fresh copies of ``data.real_files()``: distinct UIDs, sent by storescu byte for byte.

    Session-scoped: treat them as read-only.
    """
    return data.fresh_copies(data.real_files(), tmp_path_factory.mktemp("real_files"))


@pytest.fixture(scope="session")
def faithful_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The wide real-file corpus (``tests/corpus.py``), built once per session.

    Every real DICOM file of pydicom, pydicom-data and deid-data that
    storescu sends as stored, plus DCMTK conversions, each a copy with fresh
    UIDs; a ``corpus.Corpus`` (entries, exclusions with reasons).  Read-only.
    """
    from tests import corpus

    return corpus.build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def ct_series(tmp_path: Path):
    """Generate CT series: ``ct_series(n, size_kib=512, study_uid=None, **kw)`` -> paths.

    Each call writes a new series into its own directory under tmp_path.
    """
    calls = [0]

    def make(n: int, size_kib: int = 512, **kwargs) -> list[Path]:
        calls[0] += 1
        return data.ct_series(tmp_path / f"ct_series{calls[0]}", n, size_kib=size_kib,
                              **kwargs)

    return make


@pytest.fixture
def small_series(tmp_path: Path):
    """Generate series of ~9 KiB instances: ``small_series(n, **kw)`` -> paths."""
    calls = [0]

    def make(n: int, **kwargs) -> list[Path]:
        calls[0] += 1
        return data.small_series(tmp_path / f"small_series{calls[0]}", n, **kwargs)

    return make


# -- the kernel's parts, for the kernel's and the workers' unit tests -------------

@pytest.fixture
def connection(redis_conn):
    """The flushed session database through a client made as the workers make theirs
    (bytes, as rq needs): the suite's ``redis_conn``."""
    return redis_conn


@pytest.fixture
def dispatcher(connection) -> Dispatcher:
    return Dispatcher(connection, DRAIN_JOB)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A real spool under tmp_path (no free-space floor: tmp volumes vary)."""
    return Spool(tmp_path / "spool", min_free_bytes=0)
