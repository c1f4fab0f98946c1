"""A worker process: rq's non-forking worker over the router's queues.

rq's default worker forks a child per job, so an association could never
outlive a job and each fork costs ~10 ms (86 jobs/s, docs/measurements.md).
The :class:`rq.SimpleWorker` runs jobs in this process, so the senders in
the :class:`~workers.runtime.Runtime` keep their associations from one
drain job to the next.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import redis
from rq import Queue, SimpleWorker

from router.kernel import keys
from router.kernel.settings import Config
from workers import runtime
from workers.maintenance import Maintenance
from workers.runtime import Runtime

log = logging.getLogger(__name__)

COMMAND_CHANNEL_WAKE = 1.0
"""Seconds between looks of the worker's command-channel thread at whether it should stop."""


class _Worker(SimpleWorker):
    """rq's non-forking worker, whose command-channel thread stops within a second.

    rq 3.0 runs the worker's pub/sub command channel with ``sleep_time=60``.
    Once the worker has unsubscribed, redis-py 8's ``PubSub.get_message``
    waits that long for a new subscription, and ``PubSubWorkerThread.stop()``
    joins the thread without a bound: a worker told to stop took up to 60 s
    to exit (``run`` kills a child after 15 s). The same subscription, with
    the thread looking every ``COMMAND_CHANNEL_WAKE`` s.
    """

    def subscribe(self) -> None:
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=COMMAND_CHANNEL_WAKE, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)


def backlogs_for(config: Config, queues: list[str] | None) -> list[str]:
    """Backlog names for ``--queue`` values: ``route``, a destination name, or ``all``.

    Raises:
        ValueError: naming a queue that is neither.
    """
    everything = [keys.ROUTE] + [keys.forward(d) for d in config.destinations]
    if not queues or "all" in queues:
        return everything
    chosen = []
    for queue in queues:
        if queue == keys.ROUTE:
            chosen.append(keys.ROUTE)
        elif queue in config.destinations:
            chosen.append(keys.forward(queue))
        else:
            known = ", ".join([keys.ROUTE, *config.destinations])
            raise ValueError(f"unknown queue {queue!r}; choose from: all, {known}")
    return chosen


def run(config: Config, redis_url: str, queues: list[str] | None = None, burst: bool = False,
        config_path: Path | None = None) -> None:
    """Work on ``queues`` until stopped (or, with ``burst``, until they are empty).

    With ``config_path``, a worker that routes takes edited rules from that file (hot reload).
    """
    backlogs = backlogs_for(config, queues)
    if config.router.worker_nice:
        os.nice(config.router.worker_nice)  # below the ingest, whom a modality waits for (issue 20)
    rt = Runtime.build(config, redis_url, config_path if keys.ROUTE in backlogs else None)
    runtime.install(rt)
    maintenance = Maintenance(rt, backlogs)
    maintenance.start()
    for name in backlogs:
        rt.dispatcher.kick(name)  # pick up whatever waited while no worker ran
    # rq blocks in BLPOP for minutes between jobs: its connection must not
    # time out reads, unlike the runtime's, which fails fast when Redis is gone.
    connection = redis.Redis.from_url(redis_url, socket_connect_timeout=5, health_check_interval=30)
    worker = _Worker(
        [Queue(keys.rq_queue(name), connection=connection) for name in backlogs],
        connection=connection,
        name=rt.worker_id,
    )
    log.info("worker %s on %s", rt.worker_id, ", ".join(backlogs))
    try:
        worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
    finally:
        maintenance.stop()
        rt.close()
