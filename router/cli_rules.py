"""``dicom-router check`` and ``dicom-router test``: for the people who write rules.

``check`` validates a configuration and its included rule files and names the
file, line and rule of every mistake. ``test`` is a dry run over files on
disk: which rules match, where each file would go, and the tag-by-tag diff of
what each destination would receive. Neither touches Redis, the spool or the
network.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import pydicom
from pydicom.errors import InvalidDicomError

from router import preflight
from router.kernel import history
from router.kernel.settings import Config, load_config_located
from router.preflight import needs_secret
from rules.context import MorphContext, MorphError, SecretMissing
from rules.diff import diff
from rules.facts import AssociationFacts
from rules.loader import ConfigError, Loaded, Problem
from rules.matcher import Decision, decide
from rules.morph import apply

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
    envvar="DICOM_ROUTER_CONFIG", show_envvar=True, help="The router's YAML configuration.",
)  # fmt: skip


def _load(path: Path) -> Config:
    return load_or_exit(path)[0]


def load_or_exit(path: Path) -> tuple[Config, Loaded[Config]]:
    """The configuration at ``path`` and where its values were written; on a problem,
    every problem with file, line and reason, then exit 1 (every command loads this way)."""
    try:
        config, loaded = load_config_located(path)
    except ConfigError as exc:
        refuse(path, exc.problems)
    except OSError as exc:
        click.echo(f"{path}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    history.keep_for(config.router.history_days * 86400)
    return config, loaded


def refuse(path: Path, problems: list[Problem]) -> NoReturn:
    """Print ``problems`` (file, line, reason each) and exit 1."""
    click.echo(str(ConfigError(problems)), err=True)
    n = len(problems)
    click.echo(f"{path}: {n} problem{'s' if n != 1 else ''}", err=True)
    sys.exit(1)


@click.command()
@config_option
def check(config_path: Path) -> None:
    """Validate the configuration and its rules; exit 1 naming file, line and rule of each problem,
    including those that would only show once running (a missing secret, a spool volume too small)."""
    config, loaded = load_or_exit(config_path)
    problems = preflight.problems(config, loaded, listen=False, dashboard=True, ingests=True)
    if problems:
        refuse(config_path, problems)
    for notice in preflight.notices(config, loaded):
        click.echo(f"warning: {notice}", err=True)
    if (busy := preflight.port_problem(config, loaded)) is not None:
        # `check` is also run beside a router that is serving this very port.
        click.echo(f"warning: {busy} (a router already running? `run` and `ingest` would refuse)", err=True)
    policy = config.unrouted if isinstance(config.unrouted, str) else f"forward to {', '.join(config.unrouted.forward)}"
    services = []
    if config.query_retrieve is not None:
        services.append(f"Q/R from {', '.join(config.query_retrieve.sources)}")
    if config.worklist is not None:
        services.append(f"worklist from {config.worklist.source}")
    if config.mpps is not None:
        services.append(f"MPPS to {', '.join(config.mpps.forward)}")
    click.echo(
        f"{config_path}: OK: {len(config.destinations)} destination(s), {len(config.rules)} rule(s), "
        f"unrouted: {policy}" + "".join(f"; {service}" for service in services)
    )


def _files(paths: tuple[Path, ...]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _facts(ds: pydicom.Dataset, calling: str | None, called: str | None, ip: str | None) -> AssociationFacts:
    """The options given, else what the spool recorded in the file meta, else nothing."""
    from router.kernel.filemeta import origin_of

    origin = origin_of(getattr(ds, "file_meta", None))
    return AssociationFacts(
        calling if calling is not None else origin.calling_ae_title,
        called if called is not None else origin.called_ae_title,
        ip if ip is not None else origin.source_ip,
    )


def dry_run(config: Config, path: Path, facts_options: tuple[str | None, str | None, str | None], ctx: MorphContext) -> dict[str, Any]:
    """What the router would do with one file, as plain data (for text or JSON output)."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return {"file": str(path), "error": f"not readable as DICOM: {exc}"}
    facts = _facts(ds, *facts_options)
    decision: Decision = decide(config.rules, config.unrouted, ds, facts)
    deliveries: dict[str, Any] = {}
    for destination, ops in decision.deliveries.items():
        entry: dict[str, Any] = {"morph": [op.model_dump(by_alias=True, mode="json") for op in ops], "changes": []}
        if ops:
            try:
                morphed = apply(ds, ops, ctx)
            except MorphError as exc:
                entry["error"] = str(exc)
            else:
                entry["changes"] = [c.as_dict() for c in diff(ds, morphed)]
        deliveries[destination] = entry
    return {
        "file": str(path),
        "facts": {"CallingAETitle": facts.calling_ae_title, "CalledAETitle": facts.called_ae_title, "SourceIP": facts.source_ip},
        "matched": list(decision.matched),
        "unrouted": decision.unrouted,
        "deliveries": deliveries,
    }


def _print(result: dict[str, Any]) -> None:
    click.echo(result["file"])
    if "error" in result:
        click.echo(f"  error: {result['error']}")
        return
    click.echo(f"  matched: {', '.join(result['matched']) or '(no rule)'}")
    if result["unrouted"]:
        click.echo(f"  unrouted: {result['unrouted']}")
    for destination, entry in result["deliveries"].items():
        if "error" in entry:
            click.echo(f"  -> {destination}: morph fails: {entry['error']}")
        elif not entry["morph"]:
            click.echo(f"  -> {destination}: as received")
        elif not entry["changes"]:
            click.echo(f"  -> {destination}: morphed, no attribute changes")
        else:
            click.echo(f"  -> {destination}: {len(entry['changes'])} change(s)")
            width = max(len(_label(c)) for c in entry["changes"])
            for c in entry["changes"]:
                before = c["before"] if c["before"] is not None else "(absent)"
                after = c["after"] if c["after"] is not None else "(removed)"
                click.echo(f"       {c['tag']} {_label(c):<{width}}  {before} -> {after}")


def _label(change: dict[str, Any]) -> str:
    """The path, unless it only repeats the tag (private attributes have no keyword)."""
    return "" if change["path"] == change["tag"] else change["path"]


@click.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts.")
@click.option("--calling-ae", default=None, help="CallingAETitle to assume (default: the file meta's, if spooled).")
@click.option("--called-ae", default=None, help="CalledAETitle to assume.")
@click.option("--source-ip", default=None, help="SourceIP to assume.")
def test(
    config_path: Path, paths: tuple[Path, ...], as_json: bool,
    calling_ae: str | None, called_ae: str | None, source_ip: str | None,
) -> None:  # fmt: skip
    """Dry run: which rules match each FILE (or every file under DIR), where it goes, and what changes."""
    config = _load(config_path)
    try:
        ctx = MorphContext.from_config(config)
    except SecretMissing as exc:
        click.echo(f"warning: {exc}", err=True)
        ctx = MorphContext()
    if ctx.secret is None and needs_secret(config):
        # A dry run still shows what changes; the remapped values just differ from production.
        click.echo("warning: no de-identification secret here; remapped UIDs and dates use a throwaway one", err=True)
        ctx = MorphContext(secrets.token_bytes(32))
    results = [dry_run(config, path, (calling_ae, called_ae, source_ip), ctx) for path in _files(paths)]
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            _print(result)
    if any("error" in r or any("error" in d for d in r.get("deliveries", {}).values()) for r in results):
        sys.exit(1)
