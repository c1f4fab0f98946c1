"""Prometheus metrics, read from Redis and the spool at each scrape.

The counters live in Redis (``router/kernel/telemetry.py``), written by
every ingest and worker process into the same keys: they add up across
processes and hosts and survive restarts, which per-process
``prometheus_client`` counters would not (its multiprocess mode needs a
shared directory and loses a dead process's gauges). So the dashboard's
``/metrics`` builds the families from Redis in one custom collector.

The names and labels of the README's "Metrics" table, and a few more an operator needs
(commitment backlog, dead letters, quarantine, destination health, Redis
reachability).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from router.kernel import keys, telemetry, tls
from router.kernel.backlog import Backlog
from router.kernel.health import State, destination_health
from router.kernel.settings import Config
from router.kernel.spool import FREE, Spool

log = logging.getLogger(__name__)

SPOOL_SIZE_TTL = 15.0
"""Seconds a measured spool size is reused (walking a big spool per scrape would cost more than it tells)."""


class _SpoolSize:
    """Bytes the spool's files hold (each file once, however many hard links), measured at most every
    ``SPOOL_SIZE_TTL`` s."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._value = 0
        self._at = 0.0
        self._lock = threading.Lock()

    def value(self) -> int:
        with self._lock:
            if time.monotonic() - self._at > SPOOL_SIZE_TTL:
                self._value = self._measure()
                self._at = time.monotonic()
            return self._value

    def _measure(self) -> int:
        seen: set[tuple[int, int]] = set()
        total = 0
        for folder, subfolders, files in os.walk(self.root):
            if folder == str(self.root) and FREE in subfolders:
                subfolders.remove(FREE)  # files kept to be written over: no instance's
            for name in files:
                try:
                    st = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue  # delivered meanwhile
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total


class RouterCollector(Collector):
    """Args:
    config: the router's configuration (its destinations name the labels).
    connection: the router's Redis.
    spool: its spool.
    """

    def __init__(self, config: Config, connection: redis.Redis, spool: Spool) -> None:
        self.config = config
        self.redis = connection
        self.spool = spool
        self._size = _SpoolSize(str(spool.root))

    def collect(self) -> Iterator[Metric]:
        spool_bytes = GaugeMetricFamily("dicom_router_spool_bytes", "Bytes of instances held in the spool")
        spool_bytes.add_metric([], self._size.value())
        yield spool_bytes
        yield from self._from_disk()
        up = GaugeMetricFamily("dicom_router_redis_up", "Whether the router's Redis answered this scrape")
        try:
            families = list(self._from_redis())
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _from_disk(self) -> Iterator[Metric]:
        dead = GaugeMetricFamily("dicom_router_dead_letters", "Dead letters waiting, per destination",
                                 labels=["destination"])
        counts: dict[str, int] = {name: 0 for name in self.config.destinations}
        for letter in self.spool.dead_letters():
            counts[letter.destination] = counts.get(letter.destination, 0) + 1
        for name, count in counts.items():
            dead.add_metric([name], count)
        yield dead
        quarantine = GaugeMetricFamily("dicom_router_quarantined", "Instances in quarantine")
        quarantine.add_metric([], len(self.spool.quarantine_reasons()))
        yield quarantine
        waiting = GaugeMetricFamily("dicom_router_commitment_pending",
                                    "Instances a destination stored and has not yet committed", labels=["destination"])
        for name, settings in self.config.destinations.items():
            if settings.commitment is not None:
                waiting.add_metric([name], len(self.spool.ids_awaiting_commitment(name)))
        yield waiting
        expiry = GaugeMetricFamily("dicom_router_tls_certificate_expiry_timestamp_seconds",
                                   "When each of the router's own TLS certificates expires (epoch seconds)",
                                   labels=["certificate"])
        for label, path in tls.own_certificates(self.config).items():
            try:
                expiry.add_metric([label], tls.certificate_expiry(path))
            except (OSError, ValueError) as exc:
                log.warning("metrics: cannot read the certificate %s: %s", path, exc)
        yield expiry
        if self.config.mpps is not None:
            from router.services.mpps_hold import MppsHold

            hold = MppsHold(self.spool)
            held = GaugeMetricFamily("dicom_router_mpps_held", "MPPS messages held for a destination, to be "
                                     "delivered in order", labels=["destination"])
            set_aside = GaugeMetricFamily("dicom_router_mpps_refused", "MPPS messages a destination refused for "
                                          "good from the hold (kept under mpps/refused/)", labels=["destination"])
            for name in self.config.mpps.forward:
                held.add_metric([name], hold.count(name))
                set_aside.add_metric([name], hold.refused_count(name))
            yield held
            yield set_aside

    def _from_redis(self) -> Iterator[Metric]:
        destinations = list(self.config.destinations)
        counts = telemetry.counters(self.redis, destinations)
        received = CounterMetricFamily("dicom_router_instances_received",
                                       "Instances received and made durable, per calling AE title",
                                       labels=["calling_ae"])
        for ae, value in sorted(counts.received.items()):
            received.add_metric([ae], value)
        yield received
        forwarded = CounterMetricFamily("dicom_router_instances_forwarded",
                                        "Deliveries: instances a destination acknowledged (C-STORE success), "
                                        "counted per destination", labels=["destination"])
        for name in destinations:
            forwarded.add_metric([name], counts.forwarded.get(name, 0))
        yield forwarded
        failed = CounterMetricFamily("dicom_router_instances_failed",
                                     "Sends that failed, per destination and class of status "
                                     f"({', '.join(telemetry.FailureClass)})",
                                     labels=["destination", "status_class"])
        for (name, status_class), value in sorted(counts.failed.items()):
            failed.add_metric([name, status_class], value)
        yield failed
        duration = HistogramMetricFamily("dicom_router_send_duration_seconds",
                                         "Seconds from a C-STORE's request to its response, per destination",
                                         labels=["destination"])
        for name, histogram in counts.send_seconds.items():
            buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in histogram.buckets]
            duration.add_metric([name], buckets, histogram.sum)
        yield duration
        depth = GaugeMetricFamily("dicom_router_queue_depth", "Instances waiting in a queue (pending, due for "
                                  "retry, or being sent)", labels=["queue"])
        oldest = GaugeMetricFamily("dicom_router_queue_oldest_age_seconds",
                                   "Seconds the oldest waiting instance of a queue has waited since received",
                                   labels=["queue"])
        for queue, backlog in [(keys.ROUTE, keys.ROUTE)] + [(name, keys.forward(name)) for name in destinations]:
            depth.add_metric([queue], sum(Backlog(self.redis, backlog).depth().values()))
            age = telemetry.oldest_age(self.redis, backlog)
            oldest.add_metric([queue], age or 0.0)
        yield depth
        yield oldest
        associations = GaugeMetricFamily("dicom_router_associations_open", "Associations open now (in: ingest, "
                                         "out: toward destinations)", labels=["direction"])
        for direction, value in sorted(telemetry.associations_open(self.redis).items()):
            associations.add_metric([direction], value)
        yield associations
        health = GaugeMetricFamily("dicom_router_destination_up",
                                   "0 while a destination is held or its last C-ECHO failed, else 1",
                                   labels=["destination"])
        for name in destinations:
            state = destination_health(self.redis, name).state
            health.add_metric([name], 0 if state in (State.HELD, State.DOWN) else 1)
        yield health
        hits = CounterMetricFamily("dicom_router_rule_hits", "Instances each rule matched", labels=["rule"])
        for rule, value in sorted(telemetry.rule_hit_counts(self.redis).items()):
            hits.add_metric([rule], value)
        yield hits
        if self.config.mpps is not None:
            mpps = CounterMetricFamily("dicom_router_mpps_messages", "MPPS messages (N-CREATE, N-SET) per destination "
                                       f"and outcome ({', '.join(telemetry.MppsOutcome)})",
                                       labels=["destination", "outcome"])
            for (name, outcome), value in sorted(telemetry.mpps_counts(self.redis).items()):
                mpps.add_metric([name, outcome], value)
            yield mpps


def registry(config: Config, connection: redis.Redis, spool: Spool) -> CollectorRegistry:
    """A registry holding only the router's collector (no process metrics of the dashboard itself)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(RouterCollector(config, connection, spool))
    return found


def exposition(config: Config, connection: redis.Redis, spool: Spool) -> bytes:
    """The metrics in Prometheus's text format, as ``/metrics`` serves them."""
    return generate_latest(registry(config, connection, spool))
