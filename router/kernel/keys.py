"""Every Redis key and rq queue name the router uses, in one place.

Redis only accelerates the spool: the files on disk are the truth, and
everything under these keys can be rebuilt from them (docs/guarantees.md, G3).
"""

from __future__ import annotations

PREFIX = "dicom-router"

ROUTE = "route"
"""The backlog of received instances waiting for the rules."""


_FORWARD = "forward."


def forward(destination: str) -> str:
    """The backlog name of one destination."""
    return f"{_FORWARD}{destination}"


def destination_of(backlog: str) -> str | None:
    """The destination whose backlog this is, or None for the route backlog."""
    return backlog[len(_FORWARD) :] if backlog.startswith(_FORWARD) else None


def rq_queue(backlog: str) -> str:
    """The rq queue whose jobs drain ``backlog``: one per destination (docs/guarantees.md, G4)."""
    return f"{PREFIX}.{backlog}"


def pending(backlog: str) -> str:
    """LIST of spool ids waiting, oldest at the head."""
    return f"{PREFIX}:pending:{backlog}"


def wake(backlog: str) -> str:
    """LIST of at most one token, pushed with new ids: a drain waiting for work blocks on it."""
    return f"{PREFIX}:wake:{backlog}"


def delayed(backlog: str) -> str:
    """ZSET of spool ids waiting for a retry, scored by the time they are due."""
    return f"{PREFIX}:delayed:{backlog}"


def inflight(backlog: str, worker_id: str) -> str:
    """HASH spool id -> claim time, of the ids one worker process is working on."""
    return f"{PREFIX}:inflight:{backlog}:{worker_id}"


def inflight_pattern(backlog: str) -> str:
    return f"{PREFIX}:inflight:{backlog}:*"


def attempts(backlog: str) -> str:
    """HASH spool id -> failed attempts that counted against the instance."""
    return f"{PREFIX}:attempts:{backlog}"


def kick(backlog: str, slot: int = 0) -> str:
    """Held while drain job number ``slot`` for ``backlog`` is queued or running
    (slots 1.. let a destination with ``max_associations`` > 1 drain in parallel)."""
    return f"{PREFIX}:kick:{backlog}" + (f":{slot}" if slot else "")


def hold(backlog: str) -> str:
    """Set while a whole destination is backing off (it refused or was unreachable)."""
    return f"{PREFIX}:hold:{backlog}"


def health(backlog: str) -> str:
    """HASH of what a destination did last: ``last_ok`` (epoch seconds of its last
    acknowledged instance), ``last_error`` and ``last_error_at`` (its last send failure),
    ``refusing_since`` (when it last refused every instance tried), ``last_echo``,
    ``last_echo_ok`` and ``last_echo_error`` (its last C-ECHO); router/kernel/health.py reads it."""
    return f"{PREFIX}:health:{backlog}"


def probe(backlog: str) -> str:
    """Held by the one worker process probing a held destination with C-ECHO."""
    return f"{PREFIX}:probe:{backlog}"


def busy(backlog: str, slot: int) -> str:
    """Set for a while when a destination refused association number ``slot`` + 1
    (it takes fewer than ``max_associations``): no helper job for that slot meanwhile."""
    return f"{PREFIX}:busy:{backlog}:{slot}"


def alive(worker_id: str) -> str:
    """Heartbeat of a worker process; its inflight ids are abandoned once this expires."""
    return f"{PREFIX}:alive:{worker_id}"


RECONCILE_LOCK = f"{PREFIX}:lock:reconcile"


# -- history (router/kernel/history.py) --------------------------------------


def instance(spool_id: str) -> str:
    """HASH of one received instance's history: its state and the steps of its journey."""
    return f"{PREFIX}:instance:{spool_id}"


def find(value: str) -> str:
    """ZSET of spool ids received with this SOP/Series/Study Instance UID or Accession Number."""
    return f"{PREFIX}:find:{value}"


RECENT_STEPS = f"{PREFIX}:recent-steps"
"""STREAM of the latest steps of any instance, capped."""


# -- telemetry (router/kernel/telemetry.py) ------------------------------------

COUNT_RECEIVED = f"{PREFIX}:count:received"
"""HASH calling AE title -> instances received."""
COUNT_FORWARDED = f"{PREFIX}:count:forwarded"
"""HASH destination -> instances it acknowledged."""
COUNT_FAILED = f"{PREFIX}:count:failed"
"""HASH destination + status class -> failed sends."""
COUNT_RULES = f"{PREFIX}:count:rules"
"""HASH rule name -> instances it matched."""
LAST_RELOAD = f"{PREFIX}:reload"
"""HASH of the configuration's last reload: at, generation, ok, message."""


def send_seconds(destination: str) -> str:
    """HASH of the send duration histogram of one destination: bucket bound -> count, sum, count."""
    return f"{PREFIX}:count:send:{destination}"


def minute(start: int) -> str:
    """HASH of totals (received, forwarded, failed) in the minute starting at ``start`` (epoch s)."""
    return f"{PREFIX}:minute:{start}"


def associations(direction: str, process: str) -> str:
    """How many associations one process has open in ``direction`` (in, out); expires unless refreshed."""
    return f"{PREFIX}:assoc:{direction}:{process}"


def associations_direction(key: str) -> str:
    """The direction an :func:`associations` key counts: the word after ``assoc:``
    (the process name that ends the key, ``host:pid``, holds colons of its own)."""
    return key[len(f"{PREFIX}:assoc:"):].split(":", 1)[0]


def host_alive(host: str) -> str:
    """STRING with a TTL: the host's ingest is alive (a shared spool's commitment requests
    of a host without it are taken over)."""
    return f"{PREFIX}:host-alive:{host}"


RETRIEVE_SEQUENCE = f"{PREFIX}:retrieve:sequence"
"""INCR: Message IDs of the router's C-MOVEs to sources, unique across its hosts."""


def retrieve_origin(ae_title: str, message_id: int) -> str:
    """STRING: the retrieve a C-MOVE the router sent as ``ae_title`` with ``message_id`` serves,
    so that whichever host receives its sub-operations (Move Originator AE Title and
    Message ID) passes them to it (router/services/retrieve.py)."""
    return f"{PREFIX}:retrieve:origin:{ae_title}:{message_id}"


def retrieve_arrivals(operation: str) -> str:
    """LIST of the file names (in the spool's ``retrieved/OP/``) of instances retrieved for
    ``operation``, in arrival order."""
    return f"{PREFIX}:retrieve:arrivals:{operation}"


# -- MPPS (router/services/mpps.py) -------------------------------------------

COUNT_MPPS = f"{PREFIX}:count:mpps"
"""HASH destination + outcome (relayed, held, delivered, refused) -> MPPS messages."""


def mpps_delivery(destination: str) -> str:
    """STRING with a TTL: held by the one host delivering ``destination``'s held MPPS messages."""
    return f"{PREFIX}:mpps:delivery:{destination}"
