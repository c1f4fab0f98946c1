"""C-ECHO: ``dicom-router echo``, the probe of a held destination, and the
periodic check of an idle one.

A destination that could not be reached is held (``workers/forwarding.py``)
and, when its hold is over, probed with a C-ECHO (Verification SOP Class,
PS3.4 Annex A) instead of with real instances: while it is down no
instance is claimed, opened or charged an attempt. A probe that reaches it
lifts the hold and its backlog is drained at once; one that does not holds
it for the next step of its ``retry.backoff_seconds``.

A destination that is neither held nor acknowledging instances is echoed
every ``echo_interval_seconds`` (:func:`checkup`), so that its health is
known before an instance needs it: one it cannot reach is shown down, and
is held only when an instance is tried and fails.

A C-ECHO proves reachability only: that the destination accepts an
association from the router's AE title and answers. A destination held
because it hangs on instances or refuses every one (0xA7xx to all) answers
C-ECHO fine; its probe lifts the hold, the drain tries its instances, and
if they fail again it is held one step further (the back-off steps are
kept until it acknowledges an instance).

The echo goes on the router's own upper layer (``router/kernel/requestor.py``,
one blocking socket in the caller's thread), as every association it requests.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import NamedTuple

from router.kernel import keys
from router.kernel.dimse import STATUS, VERIFICATION, c_echo_rq, command_us
from router.kernel.errors import DestinationBusy, TransientSendError
from router.kernel.health import LAST_ECHO, LAST_ECHO_ERROR, LAST_ECHO_OK, LAST_OK
from router.kernel.requestor import RELEASE_TIMEOUT, RequestedAssociation
from router.kernel.settings import Destination
from router.kernel.status import Status
from workers.forwarding import held_until, hold, lift_hold_keep_backoff
from workers.runtime import Runtime
from workers.stow import StowSender

log = logging.getLogger(__name__)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
"""The default transfer syntax every DICOM peer accepts (PS3.5 §10.1)."""


class Echo(NamedTuple):
    """A destination's answer to C-ECHO.

    ``status`` is None when it accepted the association but not the
    Verification SOP class: it is reachable, it just does not do C-ECHO.
    """

    status: int | None
    seconds: float


def echo(name: str, destination: Destination, calling_ae_title: str, runtime: Runtime | None = None) -> Echo:
    """Associate with ``destination`` and C-ECHO it, within its ``connect_timeout``
    for the connection, the association and the answer each.

    Args:
        name: the destination's name (for messages).
        calling_ae_title: the router's AE title; the destination's own
            ``calling_ae_title`` wins, as for C-STORE.
        runtime: the worker's runtime, whose sender a DICOMweb destination's check
            goes through (its token kept); None: a sender of its own.

    A DICOMweb destination gets its health check instead: one authenticated
    ``GET`` (``StowSender.check``), answered ``Echo(0, seconds)``.

    Raises:
        DestinationUnavailable: no connection, association rejected or aborted
            (``DestinationBusy``: rejected for now).
        DestinationTimeout: the C-ECHO was not answered in time.
        TransientSendError: the association broke during the C-ECHO.
    """
    if destination.dicomweb is not None:
        stow = runtime.sender(name) if runtime is not None else StowSender(name, destination)
        return Echo(Status.SUCCESS, stow.check())
    started = time.monotonic()
    assoc = RequestedAssociation.negotiate(
        destination.host,
        destination.port,
        calling_ae_title=destination.calling_ae_title or calling_ae_title,
        called_ae_title=destination.ae_title,
        contexts=[(VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)],
        max_pdu=destination.max_pdu,
        connect_timeout=destination.connect_timeout,
        dimse_timeout=destination.connect_timeout,
        label=name,
        tls=destination.tls,
    )
    context_id = assoc.contexts.get((VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN))
    if context_id is None:
        assoc.release()
        return Echo(None, time.monotonic() - started)
    message_id = assoc.next_message_id()
    rsp = assoc.request(context_id, c_echo_rq(message_id), message_id)  # aborts itself on failure
    assoc.release()
    return Echo(command_us(rsp, STATUS), time.monotonic() - started)


def lock_seconds(destination: Destination) -> int:
    """How long one process's probe keeps others from probing the same destination:
    the longest a probe can take (connection, association, answer, release)."""
    return math.ceil(3 * destination.connect_timeout + RELEASE_TIMEOUT) + 1


def probe(runtime: Runtime, destination: str) -> bool | None:
    """C-ECHO ``destination`` if it is held and its hold is over.

    Every worker process serving the destination's backlog may call this
    when the hold is over; a Redis lock lets one of them probe per step.

    Returns:
        True when the probe reached it (the hold is lifted: drain now),
        False when it did not (held for the next step), None when no probe
        was due or another process is probing.
    """
    settings = runtime.config.destinations[destination]
    name = keys.forward(destination)
    with _echo_lock(runtime, name, settings) as mine:
        if not mine:
            return None
        until = held_until(runtime.redis, name)
        if until is None or until > time.time():
            return None  # another process's probe settled this step already
        try:
            answer = echo(destination, settings, runtime.config.router.ae_title, runtime)
        except TransientSendError as exc:  # unreachable, rejected, timed out, broken
            return _failed(runtime, destination, str(exc))
        if answer.status not in (Status.SUCCESS, None):
            return _failed(runtime, destination, f"{destination}: C-ECHO answered 0x{answer.status:04X}")
        runtime.redis.hset(keys.health(name), mapping={LAST_ECHO: time.time(), LAST_ECHO_OK: 1})
        lift_hold_keep_backoff(runtime.redis, name)
        check = "authenticated GET" if settings.dicomweb is not None else "C-ECHO"
        log.info("probe %s: %s %s in %.0f ms; hold lifted, sending again", destination, check,
                 "answered" if answer.status is not None else "not offered, association accepted",
                 answer.seconds * 1000)
        return True


def checkup(runtime: Runtime, destination: str) -> bool | None:
    """The periodic C-ECHO of a destination nothing else shows the health of.

    Due when the destination is not held (a held one is probed on its own
    schedule), acknowledged no instance and was not echoed within its
    ``echo_interval_seconds`` (by any process: a Redis lock lets one echo).
    It records what it found and holds nothing: a destination it cannot
    reach is shown down, and the next instance tried decides whether to hold it.

    Returns:
        True when the C-ECHO reached it, False when it did not, None when none was due.
    """
    settings = runtime.config.destinations[destination]
    interval = settings.echo_interval_seconds
    if not interval:
        return None
    name = keys.forward(destination)
    recent = time.time() - interval
    if held_until(runtime.redis, name) is not None or _seen_since(runtime, name, recent):
        return None
    with _echo_lock(runtime, name, settings) as mine:
        if not mine or _seen_since(runtime, name, recent):
            return None  # another process is echoing it, or echoed it meanwhile
        why = None
        try:
            answer = echo(destination, settings, runtime.config.router.ae_title, runtime)
            if answer.status not in (Status.SUCCESS, None):
                why = f"{destination}: C-ECHO answered 0x{answer.status:04X}"
        except DestinationBusy as exc:  # reachable, only not taking another association now
            log.info("health %s: %s", destination, exc)
        except TransientSendError as exc:
            why = str(exc)
        now = time.time()
        if why is None:
            runtime.redis.hset(keys.health(name), mapping={LAST_ECHO: now, LAST_ECHO_OK: 1})
            return True
        runtime.redis.hset(keys.health(name), mapping={LAST_ECHO: now, LAST_ECHO_OK: 0, LAST_ECHO_ERROR: why})
        log.warning("health %s: %s", destination, why)
        return False


@contextlib.contextmanager
def _echo_lock(runtime: Runtime, name: str, settings: Destination) -> Iterator[bool]:
    """The probe lock of backlog ``name``, for one C-ECHO across every process: yields
    whether this process holds it (and releases it after)."""
    lock = keys.probe(name)
    if not runtime.redis.set(lock, runtime.worker_id.encode(), nx=True, ex=lock_seconds(settings)):
        yield False
        return
    try:
        yield True
    finally:
        runtime.redis.delete(lock)


def _seen_since(runtime: Runtime, name: str, since: float) -> bool:
    """Whether the destination was echoed, or acknowledged an instance, after ``since``."""
    last_echo, last_ok = runtime.redis.hmget(keys.health(name), LAST_ECHO, LAST_OK)
    return any(value is not None and float(value) > since for value in (last_echo, last_ok))


def _failed(runtime: Runtime, destination: str, why: str) -> bool:
    name = keys.forward(destination)
    runtime.redis.hset(keys.health(name), mapping={LAST_ECHO: time.time(), LAST_ECHO_OK: 0, LAST_ECHO_ERROR: why})
    delay = hold(runtime.redis, name, runtime.config.destinations[destination].retry, None)
    log.warning("probe %s: %s; holding %.1f s", destination, why, delay)
    return False
