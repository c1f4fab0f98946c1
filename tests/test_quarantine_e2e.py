"""The quarantine re-routed and purged by an operator, end to end: DCMTK's storescu as the
modality, a truncated dataset from a pynetdicom modality, DCMTK's storescp as the archive, the
router as a real process (``dicom-router run``) and the operator's real command line."""

from __future__ import annotations

import getpass
import json
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from router.kernel.status import Status
from tests import data
from tests.peers import LOOPBACK, store_as_it_is, storescu, wait_until
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

ME = f"{getpass.getuser()}@{socket.gethostname()}"


def _quarantine(router: RouterProcess) -> list[Path]:
    return sorted(p for p in (router.spool / "quarantine").iterdir() if p.suffix in (".dcm", ".bin"))


def _dicom_router(router: RouterProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", *args[:1], "-c", str(router.config_path), *args[1:]],
                          capture_output=True, text=True, timeout=120)


def _send(router: RouterProcess, files: list[Path]) -> None:
    sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE, calling_ae="CT_SCANNER")
    assert sent.returncode == 0, sent.stdout[-3000:]


def _until_the_worker_routes_by_the_new_rules(router: RouterProcess, pacs, small_series) -> list[Path]:
    """Send one instance at a time until one reaches ``pacs``: the routing worker takes an edit of
    its rules when it routes the next instance after its periodic look at the file, so a probe
    either arrives (the edit is taken) or joins the quarantine (not yet). Returns every probe."""
    probes: list[Path] = []
    while len(probes) < 20:
        probe = small_series(1)
        probes += probe
        arrived, held = len(pacs.files()), len(_quarantine(router))
        _send(router, probe)
        wait_until(lambda: len(pacs.files()) > arrived or len(_quarantine(router)) > held, 60, "the probe routed")
        if len(pacs.files()) > arrived:
            return probes
    raise AssertionError("the routing worker never took the edited rules")


def test_an_operator_re_routes_the_quarantine_after_a_rules_edit_and_purges_what_cannot_route(
        tmp_path, redis_url, storescp_factory, small_series):
    """A CT series no rule wants is kept in quarantine with a truncated dataset; `quarantine re-route`
    keeps them all while the rules are unchanged; once the rules send CT to the archive, it delivers
    the series to a real storescp and keeps the truncated dataset, saying why; each instance's journey
    shows the operator's step with who did it, in time order; `quarantine purge` removes the truncated
    one with a log line naming who."""
    pacs = storescp_factory(ae_title="PACS")
    config = router_config(tmp_path, {"pacs": destination(pacs.port, "PACS")},
                           rules=[{"name": "MR only", "when": {"Modality": "MR"}, "forward": ["pacs"]}],
                           redis_url=redis_url)
    config["unrouted"] = "keep"
    series = small_series(3)
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        _send(router, series)
        truncated = Path(pydicom.data.get_testdata_file("MR_truncated.dcm"))
        assert store_as_it_is(LOOPBACK, router.port, truncated, ROUTER_AE, "BROKEN") == Status.CANNOT_UNDERSTAND
        wait_until(lambda: len(_quarantine(router)) == 4, 60, "the series and the truncated dataset in quarantine")
        (undecodable,) = [p.stem for p in _quarantine(router) if p.suffix == ".bin"]

        unchanged = _dicom_router(router, "quarantine", "re-route", "--json")
        assert unchanged.returncode == 0, unchanged.stderr
        assert json.loads(unchanged.stdout)["requeued"] == 0 and len(_quarantine(router)) == 4

        config["rules"] = [{"name": "CT too", "forward": ["pacs"]}]
        router.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        probes = _until_the_worker_routes_by_the_new_rules(router, pacs, small_series)

        rerouted = _dicom_router(router, "quarantine", "re-route", "--json")
        assert rerouted.returncode == 0, rerouted.stderr
        outcome = json.loads(rerouted.stdout)
        assert outcome["requeued"] == len(series) + len(probes) - 1 and outcome["redis_problem"] is None
        ((kept, why),) = outcome["kept"]
        assert kept == undecodable and why.startswith("still not a whole dataset"), why
        assert f"operator {ME}: re-routed quarantined instance" in rerouted.stderr
        everything = {data.sop_instance_uid(p) for p in series + probes}
        wait_until(lambda: set(pacs.received()) == everything, 60, "the series delivered to storescp")

        journey = json.loads(_dicom_router(router, "journey", data.sop_instance_uid(series[0]), "--json").stdout)
        steps = [(s["step"], s["destination"]) for s in journey[0]["journey"]]
        assert steps == [("received", ""), ("quarantined", ""), ("re-routed", ""), ("routed", ""), ("sent", "pacs")]
        assert journey[0]["journey"][2]["detail"] == f"by {ME}"

        purged = _dicom_router(router, "quarantine", "purge", "--yes")
        assert purged.returncode == 0 and "purged 1 quarantined instance(s)" in purged.stdout, purged.stderr
        assert f"operator {ME}: purged quarantined instance {undecodable}" in purged.stderr
        assert _quarantine(router) == []
        (gone,) = json.loads(_dicom_router(router, "journey", undecodable, "--json").stdout)
        assert [s["step"] for s in gone["journey"]] == ["purged"]
