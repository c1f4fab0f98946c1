"""Where the dashboard's token comes from, and when it is required.

Kept free of the web framework: ``check`` (``router/preflight.py``) reads it
without importing FastAPI.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

from router.kernel.settings import DashboardSettings

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the dashboard on this machine (127.0.0.0/8, ::1, localhost).

    ``0.0.0.0`` and ``::`` bind every interface: not loopback.
    """
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class TokenUnavailable(Exception):
    """The configured token source names a file that cannot be read, or an empty one."""


def read_token(settings: DashboardSettings, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token, from ``token_file`` when set, else from ``$token_env``; None when neither yields one.

    Raises:
        TokenUnavailable: ``token_file`` is set but unreadable or empty (a
            typo there must not silently leave the dashboard open).
    """
    if settings.token_file is not None:
        try:
            token = settings.token_file.read_text().strip()
        except OSError as exc:
            raise TokenUnavailable(f"dashboard.token_file {settings.token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise TokenUnavailable(f"dashboard.token_file {settings.token_file} is empty")
        return token
    return environ.get(settings.token_env, "").strip() or None


def bind_problem(settings: DashboardSettings, environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(key, reason) when the dashboard would be reachable from other hosts without a token; else None."""
    try:
        token = read_token(settings, environ)
    except TokenUnavailable as exc:
        return "token_file", str(exc)
    if token is None and not is_loopback(settings.host):
        return "host", (f"dashboard.host {settings.host} is beyond loopback: set ${settings.token_env} "
                        "or dashboard.token_file so that the dashboard requires a token")
    return None
