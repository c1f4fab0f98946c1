"""The dashboard in a real browser (Debian's chromium driven by Playwright) on a real router.

`dicom-router run` serves the dashboard as one of its children; DCMTK storescu
sends a series; the destination is a port nobody listens on, then a real
storescp started on it. The page is opened once and never reloaded: every
change below reaches it by its own polling of the JSON API.
"""

from __future__ import annotations

import os
import re

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests import data
from tests.peers import LOOPBACK, free_port, storescu, wait_for_port
from tests.router_proc import ROUTER_AE, RouterProcess, destination, router_config

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (tests/run installs it): Playwright's own browser download does not work here."""
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PICTURE = "DICOM_ROUTER_DASHBOARD_PICTURE"
"""Where tools/dashboard_picture.py has the page kept as the README's picture; unset: under the test's tmp_path."""
SERIES = 6
LONG_HOLD = {"max_attempts": 3, "backoff_seconds": [600], "jitter": 0}
"""Held for ten minutes once it is found down: only the operator's retry brings it back within the test."""


@pytest.fixture
def browser_page():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            yield page
        finally:
            browser.close()


def _cell(page: Page, destination: str, field: str):
    return page.locator(f'#destinations tr[data-destination="{destination}"] td[data-field="{field}"]')


def test_the_dashboard_follows_a_down_destination_and_its_retry_button_delivers_the_backlog(
        tmp_path, redis_url, storescp_factory, small_series, browser_page):
    """Opened once, the page shows the received count and the destination's backlog grow while storescu sends
    and the destination is down, says why (held, cannot connect); once storescp listens, a click on the row's
    retry ends the hold, every instance arrives at storescp, and the row empties: all without a reload."""
    page = browser_page
    files = small_series(SERIES)
    pacs_port, dashboard_port = free_port(), free_port()
    config = router_config(tmp_path, {"pacs": destination(pacs_port, "PACS", retry=LONG_HOLD, connect_timeout=2)},
                           redis_url=redis_url)
    config["dashboard"] = {"host": LOOPBACK, "port": dashboard_port}
    with RouterProcess(tmp_path, config, log_level="INFO") as router:
        wait_for_port(LOOPBACK, dashboard_port, timeout=30, proc=router.proc)
        page.goto(f"http://{LOOPBACK}:{dashboard_port}/")
        expect(page.locator("#status")).to_contain_text("updated", timeout=10_000)
        page.evaluate("window.__opened_once = true")  # gone if the page were ever reloaded
        expect(_cell(page, "pacs", "waiting")).to_have_text(re.compile(r"^0 \(pending 0"))
        expect(page.locator("#total-received")).to_have_text("0")

        sent = storescu(LOOPBACK, router.port, files, called_ae=ROUTER_AE)
        assert sent.stdout.count("Received Store Response (Success)") == SERIES, sent.stdout[-2000:]

        expect(page.locator("#total-received")).to_have_text(str(SERIES), timeout=15_000)
        expect(_cell(page, "pacs", "state")).to_have_text("held", timeout=15_000)
        expect(_cell(page, "pacs", "waiting")).to_have_text(re.compile(rf"^{SERIES} "))
        expect(_cell(page, "pacs", "last-error")).to_contain_text("cannot connect")
        expect(_cell(page, "pacs", "held-until")).not_to_have_text("–")
        # The refused connection counts where a person looks first: the totals and the row.
        expect(page.locator("#total-failed")).to_have_text(re.compile(r"^[1-9]"))
        expect(page.locator("#error-rate")).to_have_text("100.0 %")
        expect(page.locator("#total-unavailable")).to_have_text("pacs")
        expect(_cell(page, "pacs", "failed")).to_contain_text("unreachable")

        pacs = storescp_factory(ae_title="PACS", port=pacs_port)
        page.locator('#destinations tr[data-destination="pacs"] button', has_text="retry all").click()
        received = pacs.wait_for_files(SERIES, timeout=30)
        assert {data.sop_instance_uid(f) for f in received} == {data.sop_instance_uid(f) for f in files}

        expect(_cell(page, "pacs", "state")).to_have_text("up", timeout=15_000)
        expect(_cell(page, "pacs", "waiting")).to_have_text("0 (pending 0, delayed 0, in flight 0)", timeout=15_000)
        expect(page.locator("#total-forwarded")).to_have_text(str(SERIES), timeout=15_000)
        expect(_cell(page, "pacs", "delivered")).to_have_text(str(SERIES))
        expect(_cell(page, "pacs", "last-ok")).not_to_have_text("–")
        expect(page.locator("#total-unavailable")).to_have_text("none")

        page.fill("#search-q", data.sop_instance_uid(files[0]))
        page.click("#search button")
        journey = page.locator("#journeys .journey")
        expect(journey).to_have_count(1)
        expect(journey).to_contain_text("received")
        expect(journey).to_contain_text("sent → pacs (status 0x0000)", timeout=10_000)
        page.screenshot(path=os.environ.get(PICTURE) or str(tmp_path / "dashboard.png"), full_page=True)
        assert page.evaluate("window.__opened_once") is True


class DashboardProcess(RouterProcess):
    """``dicom-router dashboard`` alone: ready once its port listens."""

    def _wait_ready(self) -> None:
        wait_for_port(LOOPBACK, self.config["dashboard"]["port"], timeout=30, proc=self.proc)


def test_the_dashboard_alone_asks_the_browser_for_its_token(tmp_path, redis_url, monkeypatch, browser_page):
    """`dicom-router dashboard` with a token: the API is 401 without it, the page sends the browser to the
    login form, a wrong token is refused there, and the right one opens the page, which then loads its data."""
    page = browser_page
    monkeypatch.setenv("DICOM_ROUTER_TOKEN", "e2e-token")
    port = free_port()
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url)
    config["dashboard"] = {"host": LOOPBACK, "port": port}
    with DashboardProcess(tmp_path, config, command="dashboard", log_level="INFO"):
        base = f"http://{LOOPBACK}:{port}"
        assert page.request.get(f"{base}/api/overview").status == 401
        page.goto(base + "/")
        expect(page).to_have_url(base + "/login")
        page.fill("input[name=token]", "wrong")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("not the token")
        page.fill("input[name=token]", "e2e-token")
        page.click("button[type=submit]")
        expect(page).to_have_url(base + "/")
        expect(page.locator("#status")).to_contain_text("updated", timeout=10_000)
        expect(_cell(page, "pacs", "state")).to_have_text("unknown")


def test_the_api_docs_render_every_operation_behind_the_token_with_nothing_fetched_elsewhere(
        tmp_path, redis_url, monkeypatch, browser_page):
    """/api/docs of `dicom-router dashboard` with a token, every request to another origin refused by the
    browser: the page sends the browser to the login form, then Swagger UI lists every operation of the
    OpenAPI document, and the page asked no other host for anything."""
    page = browser_page
    monkeypatch.setenv("DICOM_ROUTER_TOKEN", "e2e-token")
    port = free_port()
    config = router_config(tmp_path, {"pacs": destination(free_port(), "PACS")}, redis_url=redis_url)
    config["dashboard"] = {"host": LOOPBACK, "port": port}
    base = f"http://{LOOPBACK}:{port}"
    elsewhere: list[str] = []

    def only_the_dashboard(route):
        if route.request.url.startswith(base + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_dashboard)
    with DashboardProcess(tmp_path, config, command="dashboard", log_level="INFO"):
        page.goto(base + "/api/docs")
        expect(page).to_have_url(base + "/login")
        page.fill("input[name=token]", "e2e-token")
        page.click("button[type=submit]")
        expect(page).to_have_url(base + "/")
        page.goto(base + "/api/docs")
        document = page.request.get(base + "/api/openapi.json").json()
        operations = sum(len(methods) for methods in document["paths"].values())
        expect(page.locator(".opblock")).to_have_count(operations, timeout=15_000)
        expect(page.locator(".opblock-summary-path", has_text="/api/overview")).to_be_visible()
    assert elsewhere == []
