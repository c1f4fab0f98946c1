"""The ``dicom-router`` command line (README, "Commands")."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import click

from router.cli_rules import check, config_option, load_or_exit, refuse, test
from router.kernel.exitcodes import EXIT_CANNOT_LISTEN
from router.kernel.settings import Config

log = logging.getLogger("router")

SWEEP_INTERVAL = 30.0  # s between sweeps of partial files whose writer is gone
GAUGE_INTERVAL = 10.0  # s between publications of the ingest's open associations while none come or go
RETRIEVED_KEPT = 24 * 3600.0  # s a retrieve's folder may sit untouched before it is a crash's leftover

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    from router import logformat

    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    if os.environ.get(logformat.ENV) == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logformat.JsonFormatter())
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
                   first: Callable[[Config], object] | None = None, dashboard: bool = False,
                   ingests: bool = False) -> Config:
    """The configuration a serving command starts with, refused (exit 1, file, line and
    reason) when it would fail later (``router/preflight.py``).

    Args:
        listen: the command binds the ingest's port.
        morphs: the command routes and morphs (it needs the de-identification secret).
        dashboard: the command serves the dashboard (it needs its token beyond loopback).
        ingests: the command serves the ingest (its TLS files must load).
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
    problems = preflight.problems(config, loaded, listen=listen, morphs=morphs, dashboard=dashboard,
                                  ingests=ingests, serving=True)
    if problems:
        refuse(path, problems)
    return config


def _redis_url(config: Config, override: str | None) -> str:
    url = override or config.router.redis_url
    if url is None:
        raise click.UsageError("no Redis: set router.redis_url in the config or pass --redis-url (only `run` embeds one)")
    return url


redis_option = click.option("--redis-url", default=None, help="Overrides router.redis_url.")
_level_option = click.option(
    "--log-level", default="INFO", show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)  # fmt: skip


def _keep_log_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--log-format`` goes into the environment: the children of ``run`` inherit it."""
    from router import logformat

    if value:
        os.environ[logformat.ENV] = value


_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), default=None, envvar="DICOM_ROUTER_LOG_FORMAT",
    show_envvar=True, expose_value=False, is_eager=True, callback=_keep_log_format,
    help="text (default) or json: one JSON object per line, for log shippers.",
)  # fmt: skip


def log_option(command: Callable) -> Callable:
    """``--log-level`` and ``--log-format``."""
    return _level_option(_format_option(command))


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
                            first=lambda config: Supervisor(config, config_path.resolve()).stop_orphans(), dashboard=True,
                            ingests=True)
    sys.exit(Supervisor(config, config_path.resolve(), log_level).run())


@cli.command()
@config_option
@redis_option
@log_option
def ingest(config_path: Path, redis_url: str | None, log_level: str) -> None:
    """The ingest SCP alone."""
    from redis.exceptions import RedisError

    from router.ingest.server import IngestServer
    from router.kernel import telemetry
    from router.kernel.commitment.from_modalities import ModalityCommitments
    from router.kernel.commitment.service import CommitmentService
    from router.kernel.dispatch import Dispatcher
    from router.kernel.spool import Spool
    from router.services.registry import Services
    from workers.routing_at_ingest import RoutingAtIngest
    from workers.runtime import DRAIN_JOB, Runtime, redis_client

    _setup_logging(log_level)
    # No secret needed here (morphs are the routing worker's); its port: the
    # bind below says, with its own exit code.
    config = _load_to_start(config_path, morphs=False, ingests=True)
    url = _redis_url(config, redis_url)
    spool = Spool(config.router.spool_dir, config.router.min_free_bytes)
    spool.sweep_tmp()
    dispatcher = Dispatcher(redis_client(url), DRAIN_JOB)
    modalities = ModalityCommitments(config.router, spool, dispatcher.redis, config.modalities)
    routing = RoutingAtIngest(Runtime.build(config, url, config_path)) if config.router.route_at_ingest else None
    server = IngestServer(config.router, spool, dispatcher,
                          CommitmentService(spool, dispatcher, list(config.destinations), modalities), routing,
                          Services.of(config, spool, dispatcher.redis))
    stop = threading.Event()

    def stopping(*_: object) -> None:
        stop.set()
        server.associations_changed.set()  # ends the wait below at once

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    try:
        server.start()
    except OSError as exc:
        click.echo(f"cannot listen on {config.router.host}:{config.router.port}: {exc}", err=True)
        sys.exit(EXIT_CANNOT_LISTEN)
    next_sweep = time.monotonic() + SWEEP_INTERVAL
    while not stop.is_set():
        # Published as associations come and go, and at least every GAUGE_INTERVAL
        # (the key expires unless refreshed: a dead ingest stops counting).
        server.associations_changed.wait(GAUGE_INTERVAL)
        server.associations_changed.clear()
        if stop.is_set():
            break
        try:
            telemetry.associations(dispatcher.redis, "in", server.open_associations)
        except RedisError:
            pass  # the gauge is missing while Redis is; ingest goes on
        if time.monotonic() >= next_sweep:
            next_sweep += SWEEP_INTERVAL
            spool.sweep_tmp()  # partial files of a crashed process on this host (a routing worker's)
            spool.sweep_retrieved(older_than=RETRIEVED_KEPT)  # what a crashed retrieve left
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


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")

PROGRESS_FROM = 20
"""Retries and purges of at least this many dead letters show a progress bar (on a terminal)."""


def _console():  # noqa: ANN202
    """Rich output on stdout; wide enough off a terminal that tables are not cut into a pipe's 80 columns."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=max(console.width, 200))


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _operator(config_path: Path, redis_url: str | None):  # noqa: ANN202
    from router.operations import Operator

    return Operator.of(_load(config_path), redis_url)


def _acting() -> str:
    """Who runs a command that changes or deletes data, for its record (log and journeys):
    ``user@host``. Its INFO lines go to stderr (unless the caller set logging up), the
    command's answer to stdout."""
    if not logging.getLogger().handlers:
        _setup_logging("INFO")
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a container's bare uid)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@cli.command()
@config_option
@redis_option
@click.argument("identifier")
@json_option
def journey(config_path: Path, redis_url: str | None, identifier: str, as_json: bool) -> None:
    """Each instance received with this SOP, Series or Study Instance UID or Accession Number
    (or this spool id), and its journey in time order."""
    from router.operations import RedisUnavailable

    operator = _operator(config_path, redis_url)
    try:
        found = operator.journeys(identifier)
    except RedisUnavailable as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    if as_json:
        _print_json(found)
        return
    console = _console()
    if not found:
        console.print(f"no instance recorded for {identifier} (journeys are kept for 7 days)")
        sys.exit(1)
    from rich.table import Table

    from router.kernel.status import describe

    for instance in found:
        title = f"{instance['sop_instance_uid'] or 'SOP Instance UID unknown'} (spool id {instance['spool_id']})"
        table = Table(title=title, title_justify="left")
        for column in ("time", "step", "destination", "status", "detail"):
            table.add_column(column)
        for step in instance["journey"]:
            status = step["status"]
            table.add_row(_local(step["at"]), step["step"], step["destination"] or "",
                          describe(status) if status is not None else "", step["detail"])
        console.print(table)


@cli.command()
@config_option
@redis_option
@click.option("--ready", is_flag=True, help="Ready for work: Redis answers, the spool takes a file, the ingest listens.")
@click.option("--ingest/--no-ingest", default=True, show_default=True,
              help="With --ready: check the ingest's port (--no-ingest on a host that runs only workers).")
@json_option
def health(config_path: Path, redis_url: str | None, ready: bool, ingest: bool, as_json: bool) -> None:
    """Exit 0 when this router is alive (with --ready: ready for work), 1 naming what is not.

    For probes of processes that serve no HTTP (the dashboard serves /healthz
    and /readyz). Alive asks nothing beyond this host: the configuration
    loads and the spool is there.
    """
    from router import readiness
    from router.embedded_redis import running_url

    config = _load(config_path)
    if ready:
        url = redis_url or config.router.redis_url or running_url(config.router.redis_data_dir)
        checks = readiness.ready(config, url, ingest)
    else:
        checks = readiness.alive(config)
    ok = all(found.ok for found in checks)
    if as_json:
        _print_json({"ok": ok, "ready" if ready else "alive": ok, "checks": [c.as_dict() for c in checks]})
    else:
        for found in checks:
            click.echo(f"{found.name}: {'ok' if found.ok else 'FAILED'}: {found.detail}", err=not found.ok)
    sys.exit(0 if ok else 1)


@cli.command()
@config_option
@click.argument("destination")
@json_option
def echo(config_path: Path, destination: str, as_json: bool) -> None:
    """C-ECHO a configured destination (as the router probes a held one)."""
    from router.operations import UnknownDestination

    operator = _operator(config_path, None)
    try:
        outcome = operator.echo(destination)
    except UnknownDestination as exc:
        raise click.BadParameter(str(exc), param_hint="DESTINATION") from exc
    if as_json:
        _print_json(asdict(outcome))
    elif outcome.ok:
        _console().print(outcome.message)
    else:
        click.echo(outcome.message, err=True)
    sys.exit(0 if outcome.ok else 1)


@cli.command()
@config_option
@redis_option
@json_option
def queues(config_path: Path, redis_url: str | None, as_json: bool) -> None:
    """Queue depths, destination health, commitment reports owed to modalities, MPPS messages held,
    dead letters and quarantine; works (from the spool alone) when Redis is down."""
    operator = _operator(config_path, redis_url)
    view = operator.queues()
    letters = operator.dead_letters(limit=50, with_study=False)
    view["dead_letter_list"] = letters
    view["quarantine_list"] = operator.quarantine(limit=20)
    operator.close()
    if as_json:
        _print_json(view)
        return
    from rich.table import Table

    console = _console()
    if view["redis"]["problem"]:
        console.print(f"[bold red]{view['redis']['problem']}[/]")
    table = Table("queue", box=None, header_style="bold")
    for heading in ("on disk", "pending", "delayed", "in flight", "dead", "oldest waiting"):
        table.add_column(heading, justify="right")
    for row in view["queues"]:
        table.add_row(row["queue"], str(row["on_disk"]), _dash(row["pending"]), _dash(row["delayed"]),
                      _dash(row["inflight"]), _dash(row["dead"]), _age(row["oldest_age_seconds"]))
    console.print(table)
    for row in view["destinations"]:
        if row["commitment"] is not None:
            _commitment_rows(console, row["name"], row["commitment"])
    if view["redis"]["reachable"] and view["destinations"]:
        health = Table("destination", "state", "held until", "failures", "last success", "last send error",
                       "last C-ECHO", box=None, header_style="bold")
        for row in view["destinations"]:
            error = f"{_local(row['last_error_at'])} {row['last_error']}" if row["last_error"] else "-"
            echo = "reached" if row["last_echo_ok"] else row["last_echo_error"] or "failed"
            probe = "-" if row["last_echo"] is None else f"{_local(row['last_echo'])}: {echo}"
            health.add_row(row["name"], row["state"], _local(row["held_until"]), str(row["failures"]),
                           _local(row["last_ok"]), error, probe)
        console.print(health)
    if view["commitment_reports"]:
        reports = Table("transaction UID", "from", "references", "asked", "state", "attempts", "next attempt",
                        "problem", "host", box=None, header_style="bold",
                        title="storage commitment reports owed to modalities", title_justify="left")
        for report in view["commitment_reports"]:
            reports.add_row(report["transaction_uid"], f"{report['calling_ae']}@{report['address']}",
                            str(report["references"]), _local(report["created"]), report["state"],
                            str(report["attempts"]), _local(report["next_attempt"]), report["problem"] or "-",
                            report["host"])
        console.print(reports)
    if view["mpps"]:
        mpps = Table("destination", "held", "oldest held", "refused", box=None, header_style="bold",
                     title="MPPS messages held for destinations (docs/mpps.md)", title_justify="left")
        for row in view["mpps"]:
            mpps.add_row(row["destination"], str(row["held"]), _age(row["oldest_age_seconds"]), str(row["refused"]))
        console.print(mpps)
    console.print(f"quarantine: {view['quarantine']}")
    for item in view["quarantine_list"]:
        console.print(f"  {item['spool_id']}  {item['sop_instance_uid'] or '?'}  {item['reason']}", markup=False)
    if letters:
        dead = Table("destination", "SOP Instance UID", "spool id", "attempts", "status", "reason",
                     box=None, header_style="bold", title="dead letters", title_justify="left")
        for letter in letters:
            dead.add_row(letter["destination"], letter["sop_instance_uid"] or "?", letter["spool_id"],
                         str(letter["attempts"]), letter["status_text"] or "-", letter["reason"])
        console.print(dead)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _commitment_rows(console, name: str, commitment: dict) -> None:  # noqa: ANN001
    """A committing destination: what it stored and has not committed yet, and the open transactions."""
    console.print(f"storage commitment {name}: {commitment['awaiting']} stored, not yet committed; "
                  f"{commitment['open_transactions']} open transaction(s)")
    for tx in commitment["transactions"]:
        due = tx["due_in_seconds"]
        when = f"report due in {due:.0f} s" if due >= 0 else f"report overdue by {-due:.0f} s"
        console.print(f"  {tx['uid']}  {tx['instances']} instance(s)  request {tx['request']}  {when}")
        for sop, spool_id in zip(tx["sop_instance_uids"], tx["spool_ids"], strict=True):
            console.print(f"    {sop}  ({spool_id})")


def _local(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _selected(operator, destination: str | None, ids: tuple[str, ...], study: str | None):  # noqa: ANN001, ANN202
    from router.operations import UnknownDestination

    try:
        return operator.select(destination, ids, study)
    except UnknownDestination as exc:
        raise click.BadParameter(str(exc), param_hint="DESTINATION") from exc


def _progress(total: int, what: str):  # noqa: ANN202
    """A rich progress bar on stderr for long work (off for a handful, and off a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=total < PROGRESS_FROM)


def _with_progress(what: str, total: int, act: Callable[[Callable[[object], None]], T]) -> T:
    """``act(progress)``, its progress (one call per instance done) shown by :func:`_progress`."""
    with _progress(total, what) as bar:
        task = bar.add_task(what, total=total)
        return act(lambda _: bar.advance(task))


def _kept(outcome, as_json: bool, kept: str):  # noqa: ANN001, ANN202
    """Print a re-queueing's ``outcome`` as JSON (and return None), or each instance it left
    where it was, with why (and return the console for the rest)."""
    if as_json:
        _print_json(asdict(outcome))
        return None
    console = _console()
    for spool_id, why in outcome.kept:
        console.print(f"{spool_id}: {kept}: {why}", markup=False)
    return console


study_option = click.option("--study", default=None, metavar="STUDY_INSTANCE_UID",
                            help="Only the dead letters of this study (read from each file's header).")
ids_option = click.option("--id", "ids", multiple=True, help="Only these spool ids (repeatable).")


@cli.command()
@config_option
@redis_option
@click.argument("destination", required=False)
@ids_option
@study_option
@json_option
def retry(config_path: Path, redis_url: str | None, destination: str | None, ids: tuple[str, ...],
          study: str | None, as_json: bool) -> None:
    """Send dead letters again (all, one destination's, one study's, or chosen ids), and end
    the back-off of destinations that were unreachable, so they are tried now."""
    operator = _operator(config_path, redis_url)
    letters = _selected(operator, destination, ids, study)
    scope = [destination] if destination else list(operator.config.destinations)
    outcome = _with_progress("retry", len(letters),
                             lambda progress: operator.retry(letters, scope, actor=_acting(), progress=progress))
    operator.close()
    if (console := _kept(outcome, as_json, "kept")) is None:
        return
    for name in outcome.holds_ended:
        console.print(f"{name}: back-off ended, trying now")
    if outcome.redis_problem:
        console.print(f"moved {outcome.requeued} dead letter(s) back; {outcome.redis_problem}", markup=False)
    else:
        console.print(f"re-queued {outcome.requeued} dead letter(s)")


yes_option = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")


@cli.command()
@config_option
@redis_option
@click.argument("destination", required=False)
@ids_option
@study_option
@yes_option
@json_option
def purge(config_path: Path, redis_url: str | None, destination: str | None, ids: tuple[str, ...],
          study: str | None, yes: bool, as_json: bool) -> None:
    """Delete dead letters for good."""
    operator = _operator(config_path, redis_url)
    letters = _selected(operator, destination, ids, study)
    _purge(letters, "dead letter", operator.purge, yes, as_json)
    operator.close()


def _purge(found: list, what: str, purge: Callable[..., int], yes: bool, as_json: bool) -> None:
    """Delete ``found`` with ``purge`` after the operator confirms (unless ``--yes``), and say how many."""
    if not found:
        _print_json({"purged": 0}) if as_json else click.echo(f"no {what}s")
        return
    if not yes:
        click.confirm(f"delete {len(found)} {what}(s) for good?", abort=True)
    purged = _with_progress("purge", len(found), lambda progress: purge(found, actor=_acting(), progress=progress))
    if as_json:
        _print_json({"purged": purged})
    else:
        click.echo(f"purged {purged} {what}(s)")


@cli.command()
@config_option
@redis_option
@click.argument("action", type=click.Choice(["list", "re-route", "purge"]), default="list")
@ids_option
@yes_option
@json_option
def quarantine(config_path: Path, redis_url: str | None, action: str, ids: tuple[str, ...], yes: bool,
               as_json: bool) -> None:
    """List the quarantine with why each instance is there (list, the default); route them again
    under the current rules (re-route: one that would only come back stays, with why); or delete
    them for good (purge). All of them, or the spool ids given with --id."""
    from router.operations import NotQuarantined

    operator = _operator(config_path, redis_url)
    if action == "list":
        listing = operator.quarantine(limit=None)
        operator.close()
        if as_json:
            _print_json(listing)
            return
        from rich.table import Table

        table = Table("spool id", "SOP Instance UID", "received", "reason", box=None, header_style="bold",
                      title=f"quarantine: {len(listing)}", title_justify="left")
        for item in listing:
            table.add_row(item["spool_id"], item["sop_instance_uid"] or "?", _local(item["since"]), item["reason"])
        _console().print(table)
        return
    try:
        items = operator.select_quarantined(ids)
    except NotQuarantined as exc:
        raise click.BadParameter(str(exc), param_hint="--id") from exc
    if action == "purge":
        _purge(items, "quarantined instance", operator.purge_quarantined, yes, as_json)
        operator.close()
        return
    outcome = _with_progress("re-route", len(items),
                             lambda progress: operator.reroute(items, actor=_acting(), progress=progress))
    operator.close()
    if (console := _kept(outcome, as_json, "stays in quarantine")) is None:
        return
    done = f"{outcome.requeued} quarantined instance(s) back to routing"
    console.print(f"{done}; {outcome.redis_problem}" if outcome.redis_problem else done, markup=False)


@cli.command()
@config_option
@redis_option
@log_option
@click.option("--ingest-here", is_flag=True, help="The ingest runs on this host (as under `run`): /readyz checks its port.")
def dashboard(config_path: Path, redis_url: str | None, log_level: str, ingest_here: bool) -> None:
    """The web dashboard, its JSON API, /metrics, /healthz and /readyz (on any host that reaches
    the Redis and the spool)."""
    from router.dashboard.app import serve

    _setup_logging(log_level)
    config = _load_to_start(config_path, morphs=False, dashboard=True)
    if config.dashboard is None:
        raise click.UsageError(f"{config_path} has no dashboard: section")
    try:
        serve(config, redis_url, ingest_here)
    except OSError as exc:
        click.echo(f"cannot listen on {config.dashboard.host}:{config.dashboard.port}: {exc}", err=True)
        sys.exit(EXIT_CANNOT_LISTEN)


cli.add_command(check)
cli.add_command(test)


def main() -> None:
    cli()
