"""The dashboard page in a real browser: Playwright drives the system's headless Chromium.

A supervisor runs the example services of examples/ (cwd = the repository root)
on an exchange and state folder of its own. Screenshots of the main views go to
test-output/dashboard/ in the repository root, for people to review.

Playwright never downloads a browser here: it launches /usr/bin/chromium (Debian
package `chromium`). Without it these tests are skipped, except in CI (CI=true),
where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from supkit import supervisor_kit
from test_dashboard import DashboardRun, session_broker_url, start_with_dashboard

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "test-output" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE_TIMEOUT_MS = 30_000
EXAMPLE_SERVICES = {
    "billing": {"module": "examples.billing", "replicas": 2},
    "orders": {"module": "examples.orders"},
    "notifications": {"module": "examples.notifications"},
}


def _missing_browser() -> str | None:
    """Return why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed; run `pip install -e .[dev]`"
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM}; install it with `apt-get install -y chromium`"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, test_vhost: str) -> Iterator[DashboardRun]:
    folder = tmp_path_factory.mktemp("dashboard-browser")
    with supervisor_kit(folder, session_broker_url(test_vhost), os.urandom(4).hex()) as kit:
        services = {name: {**service, "cwd": str(REPO)} for name, service in EXAMPLE_SERVICES.items()}
        yield start_with_dashboard(kit, services)


@pytest.fixture
def page(browser: Any, dash: DashboardRun) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 860})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(dash.url)
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"the page raised JavaScript errors: {errors}"


def screenshot(page: Any, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / name), full_page=True)


def row(page: Any, node: str, service: str, index: int) -> Any:
    return page.locator(f'tr.instance[data-key="{node}/{service}/{index}"]')


def wait_all_running(page: Any, count: int) -> None:
    page.wait_for_function(
        "count => { const rows = document.querySelectorAll('tr.instance');"
        " return rows.length === count && [...rows].every(r => r.dataset.state === 'running'); }",
        arg=count,
    )


@pytest.mark.timeout(120)
def test_overview_shows_every_instance_running(page: Any, dash: DashboardRun) -> None:
    wait_all_running(page, 4)
    node = dash.kit.node
    for service, index in (("billing", 0), ("billing", 1), ("orders", 0), ("notifications", 0)):
        instance = row(page, node, service, index)
        assert instance.locator(".c-state").inner_text() == "running"
        assert instance.locator(".c-pid").inner_text().isdigit()
    assert "token=" not in page.url
    assert page.locator("#live").get_attribute("data-state") == "live"
    assert page.locator("#attention").is_hidden()
    page.wait_for_timeout(1500)  # lets CPU and memory appear before the screenshot
    screenshot(page, "overview.png")


@pytest.mark.timeout(120)
def test_killed_instance_shows_exit_and_recovery(page: Any, dash: DashboardRun) -> None:
    wait_all_running(page, 4)
    page.evaluate("window.loadedOnce = true")
    victim = row(page, dash.kit.node, "billing", 1)
    old_pid = int(victim.locator(".c-pid").inner_text())
    restarts = int(victim.locator(".c-restarts").inner_text())

    os.kill(old_pid, signal.SIGKILL)

    page.wait_for_function(
        "([key, restarts]) => { const r = document.querySelector(`tr.instance[data-key='${key}']`);"
        " return r && r.querySelector('.c-exit').textContent.includes('SIGKILL')"
        " && Number(r.querySelector('.c-restarts').textContent) > restarts; }",
        arg=[f"{dash.kit.node}/billing/1", restarts],
    )
    page.wait_for_function(
        "([key, pid]) => { const r = document.querySelector(`tr.instance[data-key='${key}']`);"
        " const shown = r.querySelector('.c-pid').textContent;"
        " return r.dataset.state === 'running' && /^[0-9]+$/.test(shown) && shown !== String(pid); }",
        arg=[f"{dash.kit.node}/billing/1", old_pid],
    )
    assert page.evaluate("window.loadedOnce") is True, "the page reloaded"
    assert int(victim.locator(".c-pid").inner_text()) != old_pid
    screenshot(page, "overview-after-kill.png")

    page.locator('.tabs a[data-view="events"]').click()
    exited = page.locator('#events-body tr[data-kind="instance.exited"]', has_text="billing:1").first
    exited.wait_for()
    assert "signal=9" in exited.inner_text()


@pytest.mark.timeout(120)
def test_restart_button_asks_then_restarts_service(page: Any, dash: DashboardRun) -> None:
    wait_all_running(page, 4)
    node = dash.kit.node
    before = {i: row(page, node, "billing", i).locator(".c-pid").inner_text() for i in (0, 1)}

    group = page.locator(f'tbody[data-service="billing"][data-node="{node}"]')
    group.locator('tr.service button[data-action="restart"]').click()
    dialog = page.locator("dialog#confirm")
    dialog.wait_for(state="visible")
    assert "Restart billing" in dialog.locator("#confirm-title").inner_text()
    dialog.locator("#confirm-ok").click()

    done = page.locator(".toast", has_text="restart billing: done")
    done.wait_for(timeout=90_000)
    assert "billing:0 running" in done.inner_text()
    assert "billing:1 running" in done.inner_text()
    wait_all_running(page, 4)
    for index, pid in before.items():
        page.wait_for_function(
            "([key, pid]) =>"
            " document.querySelector(`tr.instance[data-key='${key}'] .c-pid`).textContent !== pid",
            arg=[f"{node}/billing/{index}", pid],
        )


@pytest.mark.timeout(120)
def test_restart_dialog_cancel_changes_nothing(page: Any, dash: DashboardRun) -> None:
    wait_all_running(page, 4)
    node = dash.kit.node
    pid = row(page, node, "orders", 0).locator(".c-pid").inner_text()
    row(page, node, "orders", 0).locator('button[data-action="stop"]').click()
    page.locator("dialog#confirm").wait_for(state="visible")
    page.locator("#confirm-cancel").click()
    page.wait_for_timeout(2500)
    assert row(page, node, "orders", 0).get_attribute("data-state") == "running"
    assert row(page, node, "orders", 0).locator(".c-pid").inner_text() == pid
    assert page.locator(".toast").count() == 0


@pytest.mark.timeout(120)
def test_console_call_shows_reply_and_keeps_history(page: Any) -> None:
    wait_all_running(page, 4)
    page.locator('.tabs a[data-view="console"]').click()
    page.locator('#route-chips button[title="billing.quote"]').click()
    assert page.locator("#route").input_value() == "billing.quote"
    page.locator("#body").fill('[{"item": "tea", "quantity": 2}]')
    page.locator("#console-submit").click()

    page.locator("#result-head .badge.ok").wait_for()
    assert '"total_cents": 800' in page.locator("#result-body").inner_text()
    assert re.fullmatch(r"\d+\.\d ms", page.locator("#result-head .rtt").inner_text())
    screenshot(page, "console.png")

    page.locator("#body").fill('[{"item": "caviar", "quantity": 1}]')
    page.locator("#console-submit").click()
    page.locator("#result-head .badge.err", has_text="RemoteError").wait_for()
    assert "unknown items: caviar" in page.locator("#result-body").inner_text()

    history = page.locator("#history li")
    assert history.count() >= 2
    history.nth(1).locator(".h-replay").click()  # the tea quote again
    page.locator("#result-head .badge.ok").wait_for()
    assert '"total_cents": 800' in page.locator("#result-body").inner_text()
    page.reload()
    page.locator('.tabs a[data-view="console"]').click()
    assert page.locator("#history li").count() >= 3


@pytest.mark.timeout(120)
def test_logs_view_follows_instance(page: Any, dash: DashboardRun) -> None:
    wait_all_running(page, 4)
    row(page, dash.kit.node, "billing", 0).locator('button[data-action="logs"]').click()
    page.locator("#log div", has_text="billing.0").first.wait_for()
    assert page.locator("#log-target").input_value() == f"{dash.kit.node}|billing:0"
    assert "following" in page.locator("#log-status").inner_text()
    screenshot(page, "logs.png")


@pytest.mark.timeout(120)
def test_events_view_filters_by_service(page: Any) -> None:
    wait_all_running(page, 4)
    page.locator('.tabs a[data-view="events"]').click()
    page.locator('#events-body tr[data-kind="instance.running"]').first.wait_for()
    page.locator("#event-service").select_option("orders")
    rows = page.locator("#events-body tr")
    assert rows.count() > 0
    for text in rows.all_inner_texts():
        assert "orders:" in text
    page.locator("#event-service").select_option("")
    screenshot(page, "events.png")


@pytest.mark.timeout(120)
def test_page_without_token_refused(browser: Any, dash: DashboardRun) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        for path in ("/", "/api/status", "/metrics", "/static/app.js"):
            response = page.goto(dash.base + path)
            assert response is not None
            assert response.status == 401, path
            assert "token" in page.content()
    finally:
        context.close()
