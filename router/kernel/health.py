"""A destination's health as one value: what the CLI shows and the dashboard will show.

The state is written where it is owned — the hold and what sending met by
``workers/forwarding.py``, the C-ECHO probes of a held destination and the
periodic C-ECHO of an idle one by ``workers/probe.py`` — into two Redis
hashes (``keys.hold``, ``keys.health``); this module names their fields once
and reads both into a :class:`DestinationHealth`. It writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import redis

from router.kernel import keys

# Fields of the hold hash (keys.hold): set while the destination is held.
HOLD_UNTIL = "until"
"""Epoch seconds when the hold is over and the destination is probed; absent
once a probe proved it reachable and its instances are being tried."""
HOLD_FAILURES = "failures"
"""Back-off steps taken so far: the next hold is ``retry.delay(failures + 1)``."""

# Fields of the health hash (keys.health).
LAST_OK = "last_ok"
"""Epoch seconds of the last instance the destination acknowledged."""
LAST_ERROR = "last_error"
"""Why the last send failed (no association, or an instance refused or unanswered); C-ECHOs keep
theirs apart (``LAST_ECHO_ERROR``), so that an echo never hides what sending met."""
LAST_ERROR_AT = "last_error_at"
REFUSING_SINCE = "refusing_since"
"""When it last refused every instance tried (``forwarding.REFUSING_STREAK``)."""
LAST_ECHO = "last_echo"
"""Epoch seconds of the last C-ECHO (a probe of a held destination, or the periodic one)."""
LAST_ECHO_OK = "last_echo_ok"
"""``1`` when that C-ECHO reached the destination, ``0`` when it did not."""
LAST_ECHO_ERROR = "last_echo_error"
"""Why the last C-ECHO that failed did (read only while ``LAST_ECHO_OK`` is ``0``)."""


class State(StrEnum):
    UP = "up"
    """Not held: instances are sent to it (it may still refuse some of them)."""
    HELD = "held"
    """Unreachable, hung or refusing everything: nothing is sent until a C-ECHO probe reaches it."""
    DOWN = "down"
    """Not held, but its last C-ECHO did not reach it and it acknowledged nothing since:
    the next instance will most likely find it unreachable (and hold it)."""
    UNKNOWN = "unknown"
    """Nothing was ever tried (or Redis forgot it)."""


@dataclass(frozen=True, slots=True)
class DestinationHealth:
    """What is known of one destination; times are epoch seconds, None when never."""

    destination: str
    state: State
    held_until: float | None
    failures: int
    """Back-off steps of the current hold (0 when none)."""
    last_error: str | None
    last_error_at: float | None
    last_ok: float | None
    last_echo: float | None
    last_echo_ok: bool | None
    last_echo_error: str | None
    """Why the last C-ECHO failed; None when it reached the destination (or none was made)."""


def _float(value: bytes | None) -> float | None:
    return float(value) if value is not None else None


def destination_health(connection: redis.Redis, destination: str) -> DestinationHealth:
    """Read ``destination``'s health in one round trip.

    Raises:
        redis.exceptions.RedisError: Redis is not reachable.
    """
    name = keys.forward(destination)
    pipe = connection.pipeline(transaction=False)
    pipe.hgetall(keys.hold(name))
    pipe.hgetall(keys.health(name))
    hold, health = ({k.decode(): v for k, v in h.items()} for h in pipe.execute())
    until = _float(hold.get(HOLD_UNTIL))
    echo_ok = health.get(LAST_ECHO_OK)
    last_echo, last_ok = _float(health.get(LAST_ECHO)), _float(health.get(LAST_OK))
    if until is not None:
        state = State.HELD
    elif echo_ok == b"0" and last_echo is not None and (last_ok is None or last_ok < last_echo):
        state = State.DOWN
    elif hold or health:
        state = State.UP
    else:
        state = State.UNKNOWN
    error, echo_error = health.get(LAST_ERROR), health.get(LAST_ECHO_ERROR)
    return DestinationHealth(
        destination=destination,
        state=state,
        held_until=until,
        failures=int(hold.get(HOLD_FAILURES, 0)),
        last_error=error.decode("utf-8", "replace") if error is not None else None,
        last_error_at=_float(health.get(LAST_ERROR_AT)),
        last_ok=last_ok,
        last_echo=last_echo,
        last_echo_ok=None if echo_ok is None else echo_ok == b"1",
        last_echo_error=echo_error.decode("utf-8", "replace") if echo_ok == b"0" and echo_error else None,
    )
