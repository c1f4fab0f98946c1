"""Hot reload in a running router: edited rules are taken, broken ones are not.

``dicom-router run`` routes instances sent by DCMTK's storescu to two
storescp; the test edits the config file under it between sends.
"""

from __future__ import annotations

import time

import pytest
import yaml

from tests import data
from tests.peers import LOOPBACK, free_port, storescu
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

RELOAD_INTERVAL = 2.0  # rules.reload.ConfigWatcher's default: files are checked at most this often


def _send_one(router: RouterProcess, path) -> None:
    result = storescu(LOOPBACK, router.port, [path], called_ae=ROUTER_AE, calling_ae="MODALITY")
    assert result.returncode == 0, result.stdout[-3000:]


def _rewrite(router: RouterProcess, config: dict) -> None:
    router.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    time.sleep(RELOAD_INTERVAL + 0.5)  # the next routed instance makes the worker look


def _received(scp, n: int) -> set[str]:
    """SOP Instance UIDs ``scp`` holds once it has ``n`` files."""
    scp.wait_for_files(n, timeout=30)
    return set(scp.received())


def _wait_log(router: RouterProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in router.log_text():
        assert time.monotonic() < deadline, f"no {text!r} in the router's log:\n{router.log_tail()}"
        time.sleep(0.1)


def test_routing_takes_an_edited_rules_file_and_keeps_running_rules_on_a_broken_edit(
    tmp_path, redis_url, storescp_factory, ct_series
):
    """A valid edit reroutes the next instance; an invalid edit, or one adding a destination, keeps the running rules."""
    files = ct_series(4, size_kib=16)
    uids = [data.sop_instance_uid(p) for p in files]
    first = storescp_factory(ae_title="FIRST")
    second = storescp_factory(ae_title="SECOND")
    config = router_config(
        tmp_path,
        {"first": destination(first.port, "FIRST"), "second": destination(second.port, "SECOND")},
        rules=[{"name": "to first", "forward": ["first"]}],
        redis_url=redis_url,
    )
    with RouterProcess(tmp_path, config) as router:
        _send_one(router, files[0])
        assert _received(first, 1) == {uids[0]}

        config["rules"] = [{"name": "to second", "forward": ["second"]}]
        _rewrite(router, config)
        _send_one(router, files[1])
        assert _received(second, 1) == {uids[1]}
        _wait_log(router, "reloaded (generation 2)")

        broken = dict(config, rules=[{"name": "typo", "fowrard": ["first"]}])
        _rewrite(router, broken)
        _send_one(router, files[2])
        assert _received(second, 2) == {uids[1], uids[2]}
        _wait_log(router, "is invalid; keeping the running rules")

        third_port = free_port()
        grown = dict(
            config,
            destinations={**config["destinations"], "third": destination(third_port, "THIRD")},
            rules=[{"name": "to third", "forward": ["third"]}],
        )
        _rewrite(router, grown)
        _send_one(router, files[3])
        assert _received(second, 3) == {uids[1], uids[2], uids[3]}
        _wait_log(router, "adds destinations third: restart the router")
        assert set(first.received()) == {uids[0]}
