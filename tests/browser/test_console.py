"""The web console in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) against a real
`reactor serve` process in embedded mode: live updates over the event stream, the gate buttons, the node drawer and
a read-only token. Every wait is on a condition in the page, with a timeout; the gates hold releases where a test
needs them, so nothing depends on how fast the machine is. Screenshots go to tests/artifacts/browser/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from reactor.api.auth import digest
from reactor.demo import build_package
from reactor.demo.scenario import release_plan
from reactor.executors.local import stop_all
from tests.e2e.test_serve import _first_line

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("REACTOR_TEST_ARTIFACTS", ROOT / "tests" / "artifacts")) / "browser"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WRITER, READER = "browser-ci-token", "browser-viewer-token"
WAIT_S = 60
# Each noop deploy takes this long, so a release page opened while a batch runs sees it run.
NOOP_DELAY_S = "1.0"


@dataclass
class Server:
    url: str
    stderr: Path
    tmp: Path

    def submit(self, plan: dict[str, Any]) -> None:
        """Submit a release as the writer, in structured mode."""
        release_id = plan["release_id"]
        envelope = {
            "specversion": "1.0",
            "id": f"browser-{release_id}",
            "source": "/tests/browser",
            "type": "dev.deployreactor.release.requested.v1",
            "subject": release_id,
            "correlationid": release_id,
            "time": "2026-12-01T10:00:00Z",
            "data": {"plan": plan},
        }
        response = httpx.post(
            self.url + "/api/v1/releases",
            content=json.dumps(envelope),
            headers={"authorization": f"Bearer {WRITER}", "content-type": "application/cloudevents+json"},
            timeout=30,
        )
        assert response.status_code == 202, response.text

    def state(self, release_id: str) -> str:
        response = httpx.get(
            f"{self.url}/api/v1/releases/{release_id}", headers={"authorization": f"Bearer {WRITER}"}, timeout=30
        )
        response.raise_for_status()
        state: str = response.json()["state"]
        return state


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `reactor serve --port 0` for the module: a writer `ci` and a read-only `viewer`; SIGTERM at the end."""
    tmp = tmp_path_factory.mktemp("serve")
    state = tmp / "state"
    tokens = tmp / "tokens.yaml"
    tokens.write_text(
        f"tokens:\n  {digest(WRITER)}: {{identity: ci}}\n  {digest(READER)}: {{identity: viewer, read_only: true}}\n"
    )
    stderr = tmp / "serve.stderr"
    env = {
        **os.environ,
        "REACTOR_STATE_DIR": str(state),
        "REACTOR_LOG_FORMAT": "json",
        "REACTOR_API_TOKENS": str(tokens),
        "REACTOR_NOOP_DELAY_S": NOOP_DELAY_S,
    }
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "reactor.cli.main", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
            cwd=tmp,
        )
    try:
        line = _first_line(process, 60)
        assert line.startswith("serving http://127.0.0.1:"), f"{line!r}; stderr: {stderr.read_text()}"
        yield Server(url=line.split()[1], stderr=stderr, tmp=tmp)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            stop_all(state / "nodes")
            if process.stdout is not None:
                process.stdout.close()
    assert code == 0, stderr.read_text()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium at a laptop's window size."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,860"):
        options.add_argument(argument)
    options.add_argument("--force-device-scale-factor=1")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save what the browser shows as tests/artifacts/browser/<name>.png and say where."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    return path


def wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    """A wait that looks again when the page re-rendered the element it had found (it does on every event)."""
    return WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))


def shown(driver: WebDriver, css: str) -> None:
    """Wait until `css` finds an element."""
    wait(driver).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def text(driver: WebDriver, css: str) -> str:
    """The text of the element `css` finds, once it is there with some text."""
    found: str = wait(driver).until(lambda page: page.find_element(By.CSS_SELECTOR, css).text)
    return found


def attributes(driver: WebDriver, css: str, name: str) -> list[str]:
    """Attribute `name` of every element `css` finds, read in one go in the page."""
    script = "return [...document.querySelectorAll(arguments[0])].map((element) => element.getAttribute(arguments[1]))"
    found: list[str] = driver.execute_script(script, css, name)
    return found


def click(driver: WebDriver, css: str) -> None:
    """Click the element `css` finds, once it is there and enabled."""

    def clicked(page: WebDriver) -> bool:
        element = page.find_element(By.CSS_SELECTOR, css)
        if not element.is_enabled():
            return False
        element.click()
        return True

    wait(driver).until(clicked)


def sign_in(driver: WebDriver, url: str, token: str) -> None:
    """Open `url` and give the console its token through the token field."""
    driver.get(url)
    shown(driver, "#token")
    driver.find_element(By.CSS_SELECTOR, "#token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    shown(driver, "#who[data-read-only]")


def release_state(driver: WebDriver, state: str) -> None:
    shown(driver, f'#release-state [data-state="{state}"]')


def node(driver: WebDriver, node_key: str, progress: str) -> None:
    shown(driver, f'[data-node="{node_key}"][data-progress="{progress}"]')


def gated(release_id: str, count: int, **strategy: Any) -> dict[str, Any]:
    """A release of `count` noop nodes: batches of 2 then the rest, an approval gate after the first."""
    service = release_id.rsplit("-", 1)[0]
    return {
        "release_id": release_id,
        "service": service,
        "version": "2.0.0",
        "image": "example/app:2.0.0",
        "nodes": [{"node_key": f"noop/web-{number:02d}/{service}"} for number in range(1, count + 1)],
        "strategy": {"batches": [2, "100%"], "max_parallel": 3, "approval_after_batches": [1], **strategy},
    }


def test_release_page_follows_the_release_live_and_approves_its_gate(server: Server, browser: WebDriver) -> None:
    """Opened while the release waits at its gate, the page shows batch 1 succeeded and batch 2 queued; approved
    from the page, batch 2's nodes turn succeeded and the release completed, all without a reload; the timeline
    names who approved, and the release list shows it completed with its progress."""
    server.submit(gated("checkout-1", 8))
    sign_in(browser, f"{server.url}/releases/checkout-1", WRITER)
    release_state(browser, "awaiting_approval")
    node(browser, "noop/web-01/checkout", "succeeded")
    node(browser, "noop/web-02/checkout", "succeeded")
    assert set(attributes(browser, '[data-batch="2"] .node', "data-progress")) == {"queued"}
    shown(browser, '#live[data-live="true"]')
    # A reload would drop this mark: it proves the page changed by itself.
    browser.execute_script("window.stillThisPage = true")

    shown(browser, "#reason")
    browser.find_element(By.CSS_SELECTOR, "#reason").send_keys("canary looks fine")
    click(browser, '[data-action="approve"]')
    shown(browser, '[data-batch="2"] .node[data-progress="dispatched"]')
    screenshot(browser, "release-running")
    for number in range(3, 9):
        node(browser, f"noop/web-{number:02d}/checkout", "succeeded")
    release_state(browser, "completed")
    assert browser.execute_script("return window.stillThisPage") is True
    assert text(browser, '#timeline li[data-type="ReleaseApproved"] .actor') == "ci"
    assert "canary looks fine" in text(browser, '#timeline li[data-type="ReleaseApproved"] .summary')
    assert attributes(browser, "#budget", "data-spent") == ["0"]
    screenshot(browser, "release-completed")

    browser.get(server.url + "/")
    assert text(browser, '#releases tr[data-release="checkout-1"] [data-state]') == "completed"
    assert "8/8" in text(browser, '#releases tr[data-release="checkout-1"]')
    screenshot(browser, "release-list")


def test_a_reason_being_typed_keeps_its_focus_and_its_keys_across_live_updates(
    server: Server, browser: WebDriver
) -> None:
    """Live updates re-render the page around the command bar: the reason field being typed in keeps the focus, so
    the keys typed after an update still land in it, and the approval carries the whole reason."""
    server.submit(gated("ledger-1", 4, batches=[1, 1, "100%"], approval_after_batches=[1, 2]))
    sign_in(browser, f"{server.url}/releases/ledger-1", WRITER)
    release_state(browser, "awaiting_approval")
    shown(browser, "#reason")
    browser.find_element(By.CSS_SELECTOR, "#reason").send_keys("canary ")
    browser.execute_script("document.querySelector('#budget').dataset.beforeUpdate = 'yes'")
    # Approved by the API, not the page: its events make the page render again while the field has the focus.
    response = httpx.post(
        f"{server.url}/api/v1/releases/ledger-1/approve", headers={"authorization": f"Bearer {WRITER}"}, timeout=30
    )
    assert response.status_code == 202, response.text
    wait(browser).until(lambda page: page.find_elements(By.CSS_SELECTOR, "#budget[data-before-update]") == [])
    assert browser.execute_script("return document.activeElement.id") == "reason"
    # Typed into whatever has the focus, as a person's keys are, not into the element.
    ActionChains(browser).send_keys("looks fine").perform()
    assert browser.execute_script("return document.getElementById('reason').value") == "canary looks fine"

    node(browser, "noop/web-02/ledger", "succeeded")
    release_state(browser, "awaiting_approval")
    click(browser, '[data-action="approve"]')
    release_state(browser, "completed")
    script = "return [...document.querySelectorAll(arguments[0])].map((element) => element.textContent)"
    approvals = '#timeline li[data-type="ReleaseApproved"] .summary'
    wait(browser).until(lambda page: len(page.execute_script(script, approvals)) == 2)
    # Newest first: the page's approval with the whole reason, then the API's without one.
    assert browser.execute_script(script, approvals) == [
        "release approved by ci: canary looks fine",
        "release approved by ci",
    ]


def test_abort_then_rollback_from_the_page(server: Server, browser: WebDriver) -> None:
    """A release held at its gate is aborted from its page after the confirmation: it ends aborted, its second
    batch never dispatched, and the timeline says ci aborted it. Rolled back from the page, its deployed nodes
    turn rolled back live and the release ends rolled back."""
    # Version 1.0.0 first, without a gate, so the nodes have a version to roll back to.
    first = gated("search-0", 4, approval_after_batches=[])
    server.submit({**first, "version": "1.0.0", "image": "example/search:1.0.0"})
    sign_in(browser, f"{server.url}/releases/search-0", WRITER)
    release_state(browser, "completed")
    server.submit(gated("search-1", 4))
    browser.get(f"{server.url}/releases/search-1")
    release_state(browser, "awaiting_approval")
    click(browser, '[data-action="abort"]')
    wait(browser).until(expected_conditions.alert_is_present()).accept()
    release_state(browser, "aborted")
    assert text(browser, '#timeline li[data-type="ReleaseAborted"] .actor') == "ci"
    assert set(attributes(browser, '[data-batch="2"] .node', "data-progress")) == {"queued"}
    assert server.state("search-1") == "aborted"
    screenshot(browser, "release-aborted")

    click(browser, '[data-action="rollback"]')
    wait(browser).until(expected_conditions.alert_is_present()).accept()
    node(browser, "noop/web-01/search", "rolled_back")
    node(browser, "noop/web-02/search", "rolled_back")
    release_state(browser, "rolled_back")
    click(browser, '[data-node="noop/web-01/search"]')
    wait(browser).until(lambda page: "NodeRolledBack" in page.find_element(By.CSS_SELECTOR, "#node-history").text)
    assert "2.0.0 → 1.0.0" in text(browser, "#node-history")
    assert text(browser, '#timeline li[data-type="ReleaseRollbackRequested"] .actor') == "ci"
    screenshot(browser, "release-rolled-back")


def test_the_drawer_shows_a_failed_nodes_error_step_and_versions(server: Server, browser: WebDriver) -> None:
    """A local node given a package whose SHA256 does not match fails at `verify`; its drawer shows the step, the
    error and the node's events, and the spent failure budget halts the release."""
    package = build_package(server.tmp / "dist", "1.0.0")
    plan = release_plan("broken-1", package, {"node-1": 1}, bad_node="node-1")
    server.submit(plan.model_dump(mode="json", exclude_defaults=True))
    sign_in(browser, f"{server.url}/releases/broken-1", WRITER)
    node(browser, "local/node-1/hello", "failed")
    click(browser, '[data-node="local/node-1/hello"]')
    assert text(browser, "#node-step") == "verify"
    assert "sha256 mismatch" in text(browser, "#node-error")
    wait(browser).until(lambda page: "NodeFailed" in page.find_element(By.CSS_SELECTOR, "#node-history").text)
    history = text(browser, "#node-history")
    assert "DeployRequested" in history
    assert "NodeFailed" in history
    release_state(browser, "halted")
    assert (attributes(browser, "#budget", "data-spent"), attributes(browser, "#budget", "data-left")) == (["1"], ["0"])
    screenshot(browser, "node-drawer-failed")


def test_a_read_only_token_sees_no_buttons_and_its_commands_are_refused(server: Server, browser: WebDriver) -> None:
    """The viewer's page has no command buttons; a command sent from the page anyway is 403 and changes nothing."""
    server.submit(gated("billing-1", 3))
    sign_in(browser, f"{server.url}/releases/billing-1", READER)
    release_state(browser, "awaiting_approval")
    shown(browser, "#read-only")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-action]") == []
    assert text(browser, "#who") == "viewer · read-only"
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch("/api/v1/releases/billing-1/approve", {
          method: "POST",
          headers: {Authorization: `Bearer ${sessionStorage.getItem("reactor.token")}`},
        }).then((response) => done(response.status), (error) => done(String(error)));
        """
    )
    assert status == 403
    assert server.state("billing-1") == "awaiting_approval"
    screenshot(browser, "read-only")


def test_without_a_token_the_console_asks_for_one(server: Server, browser: WebDriver) -> None:
    """The API answers 401 without a token: the console says so and shows no data."""
    browser.get(server.url + "/")
    assert "needs a token" in text(browser, "#notice.error")
    assert browser.find_elements(By.CSS_SELECTOR, "#releases") == []
