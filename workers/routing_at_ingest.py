"""Routing in the ingest process (``router.route_at_ingest``, on by default).

Most instances go everywhere untouched: a hard link per destination. For
those a separate routing worker costs more than the routing itself: a Redis
push and claim, waking another process, a second read of the header from the
file, a second directory fsync and an unlink, on a machine where the ingest
and the workers share a few cores. So the ingest routes them itself:

* before the answer, on the association's thread, the rules decide from the
  header the ingest's own check of the dataset read (no second parse); an
  instance that goes untouched everywhere is made durable straight in its
  destinations' ``out/`` folders instead of ``incoming/``
  (:meth:`router.kernel.spool.Spool.admit_temp`) — Success still only once
  it is durable there (docs/guarantees.md, G1);
* after the answer, a thread of its own records the receipts and the routes
  and announces the instances to the forwarding workers, one Redis round
  trip for whatever arrived meanwhile.

What it does not route goes to the routing worker through ``incoming/``, as
before: an instance some destination gets morphed (the ingest holds no secret
and spends no CPU on de-identification), one no rule wants (quarantine or
drop), one whose rules failed. While Redis fails, nothing is announced: the
reconciler finds every instance in ``incoming/`` or ``out/`` (G3).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from pydicom import Dataset
from redis.exceptions import RedisError

from router.kernel import history, keys, telemetry
from router.kernel.filemeta import Origin
from router.kernel.handoff import Received, RedisGate, Route
from rules.facts import AssociationFacts
from rules.matcher import decide
from workers.routing import Journal, record_route
from workers.runtime import Runtime

log = logging.getLogger(__name__)

LIMIT = 256
"""Instances that may wait in memory to be routed here; more go to the routing worker."""
BATCH = 64
GATHER = 0.05
"""Seconds a batch may wait to fill after its first instance: one association
answers an instance every millisecond or two, and each batch costs a Redis
round trip here and one in the forwarding worker that takes it."""
SUMMARY_INTERVAL = 10.0
"""At least this many seconds between the INFO lines that sum up what was routed here
(each batch is a DEBUG line)."""
STOP_TIMEOUT = 10.0


class RoutingAtIngest:
    """A thread of the ingest process that routes what the ingest received.

    Args:
        runtime: the routing side of the configuration (rules, hot reload), the spool, Redis.
        gate: the ingest's Redis gate (:class:`router.ingest.server.IngestServer` gives its
            own): a failure here closes it for the ingest too.
    """

    def __init__(self, runtime: Runtime, gate: RedisGate | None = None, limit: int = LIMIT) -> None:
        self.runtime = runtime
        self.gate = gate or RedisGate()
        self.rules_lock = threading.Lock()
        self.waiting: queue.Queue[Received | None] = queue.Queue(limit)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="route-at-ingest", daemon=True)
        self.summary: Counter[str] = Counter()
        """Destination -> instances routed to it since the last INFO summary."""
        self.summary_routed = 0
        self.summary_due = time.monotonic() + SUMMARY_INTERVAL

    def start(self) -> RoutingAtIngest:
        self.thread.start()
        return self

    def choose(self, header: Dataset | Callable[[], Dataset], origin: Origin,
               identifiers: tuple[str, ...] = ()) -> Route | None:
        """Where the rules send an instance, when every destination takes it untouched;
        None for the routing worker (a morph, no rule, a rule that fails).

        Args:
            header: the instance's header, or a function that builds it: called only
                if a rule looks at the dataset.
            identifiers: what its history is found by (the ingest's walk read them).
        """
        with self.rules_lock:  # association threads share the watcher
            config = self.runtime.routing_config()
        facts = AssociationFacts(origin.calling_ae_title, origin.called_ae_title, origin.source_ip)
        decision = decide(config.rules, config.unrouted, header, facts)
        if not decision.deliveries or any(decision.deliveries.values()):
            return None
        return Route(tuple(decision.deliveries), decision, identifiers)

    def offer(self, received: Received) -> bool:
        if self.stopped or not self.thread.is_alive():
            return False
        try:
            self.waiting.put_nowait(received)
        except queue.Full:
            return False
        return True

    def stop(self) -> None:
        """Route what was offered (for up to ``STOP_TIMEOUT`` s; the rest waits in
        ``incoming/`` for the reconciler), then end the thread."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.waiting.put(None, timeout=STOP_TIMEOUT)
        except queue.Full:
            return
        self.thread.join(STOP_TIMEOUT)

    def _run(self) -> None:
        while True:
            batch = [self.waiting.get()]
            if batch[-1] is not None and not self.stopped:
                # Let the batch fill while this thread sleeps: waiting on the queue
                # instead would wake it (and hand the GIL over) for every instance.
                time.sleep(GATHER)
            while batch[-1] is not None and len(batch) < BATCH:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            received = [item for item in batch if item is not None]
            if received:
                try:
                    self.route(received)
                except Exception:  # noqa: BLE001 - a bug must not end the thread; the files wait in the spool
                    log.exception("routing at ingest failed for %d instance(s); they wait in the spool for "
                                  "the reconciler", len(received))
            if batch[-1] is None:
                return

    def route(self, batch: list[Received]) -> None:
        """Record ``batch``'s receipts and routes and announce it: to the forwarding
        workers what was routed here, to the routing worker the rest (one round trip)."""
        if not self.gate.open():
            return  # Redis failed a moment ago: the reconciler queues these
        journal = Journal(history.Steps(self.runtime.redis.pipeline(transaction=False)))
        announce: dict[str, list[str]] = defaultdict(list)
        for item in batch:  # each receipt before its route
            item.record_receipt(journal.pipe)
            if item.route is None:
                announce[keys.ROUTE].append(item.spool_id)
                continue
            record_route(journal, item.spool_id, item.route.identifiers, item.route.decision, history.Kind.ROUTED)
            for destination in item.route.destinations:
                announce[keys.forward(destination)].append(item.spool_id)
        for caller, count in Counter(item.calling_ae for item in batch).items():
            telemetry.count_received(journal.pipe, caller, count)
        journal.close()
        try:
            self.runtime.dispatcher.submit_many(announce, journal.pipe.pipe)
        except RedisError as exc:
            self.gate.failed()
            log.warning("Redis unavailable (%s): %d instance(s) stay in the spool for the reconciler", exc,
                        len(batch))
            return
        routed = len(batch) - len(announce.get(keys.ROUTE, ()))
        log.debug("routed %d at ingest: %s; %d to the routing worker", routed,
                  ", ".join(f"{d} {len(i)}" for d, i in announce.items() if d != keys.ROUTE) or "none",
                  len(announce.get(keys.ROUTE, ())))
        self._summarize(announce, routed)

    def _summarize(self, announced: dict[str, list[str]], routed: int) -> None:
        self.summary_routed += routed
        for backlog, ids in announced.items():
            if backlog != keys.ROUTE:
                self.summary[keys.destination_of(backlog)] += len(ids)
        if time.monotonic() >= self.summary_due:
            log.info("routed %d at ingest since the last summary: %s", self.summary_routed,
                     ", ".join(f"{d} {n}" for d, n in self.summary.items()) or "none forwarded")
            self.summary.clear()
            self.summary_routed = 0
            self.summary_due = time.monotonic() + SUMMARY_INTERVAL
