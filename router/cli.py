"""The ``dicom-router`` command line (README, "Commands")."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import click

from router.cli_rules import check, load_or_exit, refuse, test
from router.kernel.exitcodes import EXIT_CANNOT_LISTEN
from router.kernel.settings import Config

log = logging.getLogger("router")

SWEEP_INTERVAL = 30.0  # s between sweeps of partial files whose writer is gone
GAUGE_INTERVAL = 10.0  # s between publications of the ingest's open associations

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    # pynetdicom logs every PDU at DEBUG and datasets at INFO; keep it at WARNING
    # so patient data stays out of the logs (docs/guarantees.md, G6).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("rq").setLevel(logging.WARNING)
    logging.getLogger("redis").setLevel(logging.INFO)
    if level.upper() != "DEBUG":
        # pydicom's warnings quote the offending value ("Invalid value for VR
        # PN: 'DOE^JOHN'"), which can be patient data (docs/guarantees.md, G6).
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    # A codec failure is logged by pydicom with its traceback at ERROR; the
    # router says the same once, in the instance's dead-letter line.
    logging.getLogger("pydicom.pixels").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL)


def _load(path: Path) -> Config:
    return load_or_exit(path)[0]


def _load_to_start(path: Path, listen: bool = False, single_machine: bool = False, morphs: bool = True,
                   first: Callable[[Config], object] | None = None) -> Config:
    """The configuration a serving command starts with, refused (exit 1, file, line and
    reason) when it would fail later (``router/preflight.py``).

    Args:
        listen: the command binds the ingest's port.
        morphs: the command routes and morphs (it needs the de-identification secret).
        single_machine: ``run``: generate the de-identification secret the
            rules need when the config names none and no Redis is shared.
        first: done before the checks (``run`` stops what an earlier run
            left holding its port).
    """
    from router import preflight

    config, loaded = load_or_exit(path)
    if single_machine and (generated := preflight.single_machine_secret(config)) is not None:
        log.info("de-identification secret: %s (kept with the data; hosts sharing this router need the same)",
                 generated)
    if first is not None:
        first(config)
    for notice in preflight.notices(config, loaded):
        log.warning("%s", notice)
    problems = preflight.problems(config, loaded, listen=listen, morphs=morphs)
    if problems:
        refuse(path, problems)
    return config


def _redis_url(config: Config, override: str | None) -> str:
    url = override or config.router.redis_url
    if url is None:
        raise click.UsageError("no Redis: set router.redis_url in the config or pass --redis-url (only `run` embeds one)")
    return url


config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="The router's YAML configuration.",
)  # fmt: skip
redis_option = click.option("--redis-url", default=None, help="Overrides router.redis_url.")
log_option = click.option(
    "--log-level", default="INFO", show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dicom-router")
def cli() -> None:
    """DICOM routing and forwarding: receive once, deliver everywhere the rules say."""


@cli.command()
@config_option
@log_option
def run(config_path: Path, log_level: str) -> None:
    """Everything on one machine: ingest, routing and forwarding workers
    (and an embedded Redis when the config names none)."""
    from router.supervisor import Supervisor

    _setup_logging(log_level)
    config = _load_to_start(config_path, listen=True, single_machine=True,
                            first=lambda config: Supervisor(config, config_path.resolve()).stop_orphans())
    sys.exit(Supervisor(config, config_path.resolve(), log_level).run())


@cli.command()
@config_option
@redis_option
@log_option
def ingest(config_path: Path, redis_url: str | None, log_level: str) -> None:
    """The ingest SCP alone."""
    from router.ingest import IngestEngine
    from redis.exceptions import RedisError

    from router.ingest.commitment import CommitmentService
    from router.kernel import telemetry
    from router.ingest.commitment_scp import ModalityCommitments
    from router.kernel.dispatch import Dispatcher
    from router.kernel.spool import Spool
    from workers.runtime import redis_client

    _setup_logging(log_level)
    # No secret needed here; its port: the bind below says, with its own exit code.
    config = _load_to_start(config_path, morphs=False)
    spool = Spool(config.router.spool_dir, config.router.min_free_bytes)
    spool.sweep_tmp()
    engine: type[IngestEngine]
    if config.router.engine == "fast":
        from router.ingest.server import FastIngestServer as engine
    else:
        from router.ingest.pynetdicom_scp import IngestServer as engine
    dispatcher = Dispatcher(redis_client(_redis_url(config, redis_url)))
    modalities = ModalityCommitments(config.router, spool, dispatcher.redis, config.modalities)
    server = engine(config.router, spool, dispatcher,
                    CommitmentService(spool, dispatcher, list(config.destinations), modalities))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        server.start()
    except OSError as exc:
        click.echo(f"cannot listen on {config.router.host}:{config.router.port}: {exc}", err=True)
        sys.exit(EXIT_CANNOT_LISTEN)
    next_sweep = time.monotonic() + SWEEP_INTERVAL
    while not stop.wait(GAUGE_INTERVAL):
        try:
            telemetry.associations(dispatcher.redis, "in", server.open_associations)
        except RedisError:
            pass  # the gauge is missing while Redis is; ingest goes on
        if time.monotonic() >= next_sweep:
            next_sweep += SWEEP_INTERVAL
            spool.sweep_tmp()  # partial files of a crashed process on this host (a routing worker's)
    server.stop()


@cli.command()
@config_option
@redis_option
@log_option
@click.option("--queue", "queues", multiple=True, help="route, a destination name, or all (default). Repeatable.")
@click.option("--burst", is_flag=True, help="Stop when the queues are empty.")
def worker(config_path: Path, redis_url: str | None, log_level: str, queues: tuple[str, ...], burst: bool) -> None:
    """Routing and forwarding workers (run several, on several hosts, to scale out)."""
    from workers.worker import backlogs_for
    from workers.worker import run as run_worker

    _setup_logging(log_level)
    config = _load_to_start(config_path)
    try:
        backlogs_for(config, list(queues))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--queue") from exc
    run_worker(config, _redis_url(config, redis_url), list(queues), burst=burst, config_path=config_path)


@cli.command()
@config_option
@click.argument("destination")
def echo(config_path: Path, destination: str) -> None:
    """C-ECHO a configured destination (as the router probes a held one)."""
    from router.kernel.errors import TransientSendError
    from router.kernel.status import Status
    from workers.probe import echo as c_echo

    config = _load(config_path)
    if destination not in config.destinations:
        raise click.BadParameter(f"choose from {', '.join(config.destinations) or 'none configured'}", param_hint="DESTINATION")
    try:
        answer = c_echo(destination, config.destinations[destination], config.router.ae_title)
    except TransientSendError as exc:
        click.echo(f"{exc}", err=True)
        sys.exit(1)
    if answer.status is None:
        click.echo(f"{destination}: association accepted, but not the Verification SOP class", err=True)
        sys.exit(1)
    if answer.status != Status.SUCCESS:
        click.echo(f"{destination}: C-ECHO failed (status 0x{answer.status:04X})", err=True)
        sys.exit(1)
    click.echo(f"{destination}: C-ECHO success in {answer.seconds * 1000:.0f} ms")


def _spool_and_dispatcher(config: Config, redis_url: str | None):  # noqa: ANN202
    from router.embedded_redis import running_url
    from router.kernel.dispatch import Dispatcher
    from router.kernel.spool import Spool
    from workers.runtime import redis_client

    url = redis_url or config.router.redis_url or running_url(config.router.redis_data_dir)
    return Spool(config.router.spool_dir), (Dispatcher(redis_client(url)) if url else None)


@cli.command()
@config_option
@redis_option
def queues(config_path: Path, redis_url: str | None) -> None:
    """Queue depths, dead letters and quarantine, per destination."""
    from router.kernel import keys

    config = _load(config_path)
    spool, dispatcher = _spool_and_dispatcher(config, redis_url)
    rows = [("route", keys.ROUTE, spool.incoming)] + [
        (name, keys.forward(name), spool.out_dir(name)) for name in config.destinations
    ]
    letters = list(spool.dead_letters())
    dead: dict[str, int] = {}
    for letter in letters:
        dead[letter.destination] = dead.get(letter.destination, 0) + 1
    click.echo(f"{'queue':<20} {'on disk':>8} {'pending':>8} {'delayed':>8} {'inflight':>8} {'dead':>6}")
    for label, name, folder in rows:
        depth = dispatcher.backlog(name).depth() if dispatcher else {}
        click.echo(
            f"{label:<20} {len(spool.ids_in(folder)):>8} {depth.get('pending', '-'):>8} "
            f"{depth.get('delayed', '-'):>8} {depth.get('inflight', '-'):>8} {dead.get(label, 0) if label != 'route' else '':>6}"
        )
    _commitment_rows(config, spool)
    if dispatcher is not None and config.destinations:
        _show_health(dispatcher.redis, list(config.destinations))
    quarantined = spool.quarantined()
    click.echo(f"quarantine: {len(quarantined)}")
    for spool_id, reason in quarantined[:20]:
        click.echo(f"  {spool_id}  {reason}")
    if letters:
        click.echo("dead letters:")
        for letter in letters[:50]:
            click.echo(f"  {letter.destination:<16} {letter.sop_instance_uid or '?'}  ({letter.spool_id})  "
                       f"attempts={letter.attempts}  {letter.reason}")


def _commitment_rows(config: Config, spool) -> None:  # noqa: ANN001
    """Per destination that commits: what it stored and has not committed yet, and the open transactions."""
    from router.kernel.transactions import Transactions

    book = Transactions(spool)
    now = time.time()
    for name, destination in config.destinations.items():
        if destination.commitment is None:
            continue
        waiting = spool.awaiting_commitment(name)
        open_tx = book.of(name)
        click.echo(f"storage commitment {name}: {len(waiting)} stored, not yet committed; "
                   f"{len(open_tx)} open transaction(s)")
        for tx in open_tx[:10]:
            due = tx.deadline - now
            when = f"report due in {due:.0f} s" if due >= 0 else f"report overdue by {-due:.0f} s"
            click.echo(f"  {tx.uid}  {len(tx.refs)} instance(s)  request {tx.request}  {when}")
            for spool_id, ref in tx.refs[:5]:
                click.echo(f"    {ref.sop_instance}  ({spool_id})")


def _local(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _show_health(connection, destinations: list[str]) -> None:  # noqa: ANN001
    """One line per destination: state, until when it is held, its last error, its last probe."""
    from router.kernel.health import destination_health

    click.echo(f"{'destination':<20} {'state':<8} {'held until':<19} {'failures':>8}  last error")
    for name in destinations:
        health = destination_health(connection, name)
        error = f"{_local(health.last_error_at)} {health.last_error}" if health.last_error else "-"
        click.echo(f"{name:<20} {health.state:<8} {_local(health.held_until):<19} {health.failures:>8}  {error}")
        if health.last_echo is not None:
            click.echo(f"{'':<20} last C-ECHO probe {_local(health.last_echo)}: "
                       f"{'reached' if health.last_echo_ok else 'failed'}")


def _chosen_letters(config: Config, spool, destination: str | None, ids: tuple[str, ...]):  # noqa: ANN001, ANN202
    """The dead letters of ``destination`` (all when None), only ``ids`` when given."""
    if destination and destination not in config.destinations:
        raise click.BadParameter(f"choose from {', '.join(config.destinations)}", param_hint="DESTINATION")
    return [d for d in spool.dead_letters(destination) if not ids or d.spool_id in ids]


@cli.command()
@config_option
@redis_option
@click.argument("destination", required=False)
@click.option("--id", "ids", multiple=True, help="Only these spool ids (repeatable).")
def retry(config_path: Path, redis_url: str | None, destination: str | None, ids: tuple[str, ...]) -> None:
    """Send dead letters again (all, one destination's, or chosen ids), and end
    the back-off of destinations that were unreachable, so they are tried now."""
    from redis.exceptions import RedisError

    from router.kernel import keys
    from workers.forwarding import end_hold

    config = _load(config_path)
    spool, dispatcher = _spool_and_dispatcher(config, redis_url)
    letters = _chosen_letters(config, spool, destination, ids)
    by_destination: dict[str, list[str]] = {}
    for letter in letters:
        if letter.unmorphed:
            # Its morph failed at routing: morph it again, never send it as received.
            from rules.context import MorphContext, SecretMissing
            from workers.routing import remorph

            try:
                why = remorph(config, spool, letter, MorphContext.from_config(config))
            except SecretMissing as exc:
                why = str(exc)
            if why is not None:
                click.echo(f"{letter.destination} {letter.sop_instance_uid or letter.spool_id}: kept: {why}")
                continue
        else:
            spool.resurrect(letter)
        by_destination.setdefault(letter.destination, []).append(letter.spool_id)
    try:
        if dispatcher is None:
            raise RedisError("no Redis configured or running")
        for name, spool_ids in by_destination.items():
            dispatcher.submit(keys.forward(name), spool_ids)
        for name in [destination] if destination else list(config.destinations):
            if end_hold(dispatcher.redis, keys.forward(name)):
                dispatcher.kick(keys.forward(name))
                click.echo(f"{name}: back-off ended, trying now")
    except RedisError as exc:
        # The files are back in out/DEST: the router's reconciliation sends them.
        click.echo(f"moved {sum(map(len, by_destination.values()))} dead letter(s) back; Redis not reachable ({exc}): "
                   "the router queues them at its next reconciliation")
        return
    click.echo(f"re-queued {sum(map(len, by_destination.values()))} dead letter(s)")


@cli.command()
@config_option
@click.argument("destination", required=False)
@click.option("--id", "ids", multiple=True, help="Only these spool ids (repeatable).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(config_path: Path, destination: str | None, ids: tuple[str, ...], yes: bool) -> None:
    """Delete dead letters for good."""
    from router.kernel.spool import Spool

    config = _load(config_path)
    spool = Spool(config.router.spool_dir)
    letters = _chosen_letters(config, spool, destination, ids)
    if not letters:
        click.echo("no dead letters")
        return
    if not yes:
        click.confirm(f"delete {len(letters)} dead letter(s) for good?", abort=True)
    for letter in letters:
        spool.purge(letter)
    click.echo(f"purged {len(letters)} dead letter(s)")


cli.add_command(check)
cli.add_command(test)


def main() -> None:
    cli()
