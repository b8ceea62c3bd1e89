"""The web dashboard in a real browser (headless Chromium driven by Playwright) against a real
platform: NATS, gateway, scheduler, local executor, optimizer and llm-proxy as child processes.

One platform and one browser for the module. Screenshots of every page go to
`test-artifacts/dashboard/<page>.png` (desktop) and `<page>-phone.png`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, expect, sync_playwright

from fabrik_common.testing import ServiceProcess
from fabrik_gateway.auth.jwt import mint_hs256

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
JWT_SECRET = "dashboard-test-secret-of-at-least-32-bytes"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")


def _load_support() -> Any:
    path = Path(__file__).parent / "support" / "platform_stack.py"
    spec = importlib.util.spec_from_file_location("fabrik_test_platform", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fabrik_test_platform", module)
    spec.loader.exec_module(module)
    return module


support = _load_support()


# --------------------------------------------------------------------------------------------
# Chromium (Debian's package), the platform, the browser


def _find_chromium() -> str | None:
    configured = os.environ.get("FABRIK_CHROMIUM")
    for candidate in (configured, shutil.which("chromium"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _install_chromium() -> str:
    """`apt-get install chromium chromium-driver` when running as root; the output when it fails."""
    command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
    if result.returncode != 0:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, env=env, check=False)
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
    return result.stdout[-2000:] + result.stderr[-2000:]


@pytest.fixture(scope="session")
def chromium() -> str:
    found = _find_chromium()
    why = "no Chromium found (install Debian's `chromium` package, or set FABRIK_CHROMIUM)"
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        output = _install_chromium()
        found = _find_chromium()
        why = f"`apt-get install chromium` did not provide one: {output.strip()[-500:]}"
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return found


@dataclass
class Stack:
    platform: Any
    locked: ServiceProcess
    """A second gateway without anonymous access, on the same NATS: the sign-in view."""
    python: str = sys.executable
    runs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.platform.gateway_url)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}/api/v1/{path}", timeout=10, **kwargs)
        assert response.status_code < 300, response.text
        return response.json()

    def submit_hello(self, *, steps: int, step_seconds: float, project: str = "demo") -> str:
        run = self.api(
            "POST",
            "runs",
            json={
                "project": project,
                "spec": json.loads((HELLO / "spec.json").read_text()),
                "repo": {"url": str(HELLO)},
                "workload": {
                    "command": [self.python, "workload.py"],
                    "env": {"HELLO_STEPS": str(steps), "HELLO_STEP_SECONDS": str(step_seconds)},
                },
                "labels": {"example": "hello"},
            },
        )
        return str(run["run_id"])

    def wait_for_state(self, run_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run: dict[str, Any] = self.api("GET", f"runs/{run_id}")
            if run["state"] in states:
                return run
            assert time.monotonic() < deadline, f"run {run_id} still {run['state']}, wanted {states}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dashboard")
    platform = support.start_platform(
        root,
        # One running run per project: a second one waits in the queue (the Queue page shows it).
        # Local runs cost what a cx32 node would, so that the Costs page has spend to draw.
        env={
            "FABRIK_JWT_HS256_SECRET": JWT_SECRET,
            "FABRIK_PROJECT_MAX_RUNNING": "1",
            "FABRIK_COST_LOCAL_NODE_TYPE": "cx32",
        },
        extra={"gateway-locked": ("gateway", {"FABRIK_ANONYMOUS_ROLE": "none"})},
    )
    try:
        yield Stack(platform, platform.services["gateway-locked"])
    finally:
        platform.stop()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = _launch(playwright, chromium)
        try:
            yield launched
        finally:
            launched.close()


def _launch(playwright: Playwright, executable: str) -> Browser:
    return playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])


@dataclass
class Console:
    """What the page said: console messages and uncaught errors."""

    messages: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.messages.append(f"{message.type}: {message.text} ({message.location.get('url', '')})")

    def on_error(self, error: Exception) -> None:
        self.messages.append(f"pageerror: {error}")

    def problems(self, *, allowed: tuple[str, ...] = ()) -> list[str]:
        return [m for m in self.messages if not any(a in m for a in allowed)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Browser, console: Console) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    tab.on("console", console.on_console)
    tab.on("pageerror", console.on_error)
    try:
        yield tab
    finally:
        context.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _mark_document(page: Page) -> None:
    """A marker on the window: still there later means the page was never reloaded."""
    page.evaluate("window.__fabrikNoReload = true")


def _not_reloaded(page: Page) -> bool:
    return bool(page.evaluate("window.__fabrikNoReload === true"))


# --------------------------------------------------------------------------------------------
# The flows


def test_submit_from_the_form_and_watch_it_succeed_with_logs_without_reload(
    stack: Stack, page: Page, console: Console
) -> None:
    page.goto(f"{stack.url}/submit")
    _mark_document(page)
    page.fill("#s-project", "demo")
    page.set_input_files("#s-spec", str(HELLO / "spec.json"))
    page.fill('[id="s-repo.url"]', str(HELLO))
    page.fill('[id="s-workload.command"]', f'"{stack.python}" workload.py')
    page.fill('[id="s-workload.env"]', "HELLO_STEPS=6\nHELLO_STEP_SECONDS=0.5")
    page.fill("#s-labels", "example=hello\nsource=dashboard")
    page.click("button[type=submit]")

    page.wait_for_url(re.compile(r"/runs/[0-9A-Z]{26}$"))
    run_id = page.url.rsplit("/", 1)[1]
    stack.runs["submitted"] = run_id
    badge = page.locator(".run-header .badge").first
    expect(badge).to_be_visible()
    first_state = badge.inner_text()
    assert first_state in {"queued", "starting", "running"}, first_state

    expect(badge).to_have_text("succeeded", timeout=45_000)
    log = page.locator(".log")
    expect(log).to_contain_text("hello: wrote hello.txt", timeout=10_000)
    expect(page.locator(".phase-list")).to_contain_text("implement")
    expect(page.locator("table.events")).to_contain_text("running → succeeded")
    expect(page.locator("#h-llm + *")).to_contain_text("1 call", timeout=20_000)
    expect(page.locator(".facts")).to_contain_text("source=dashboard")
    assert _not_reloaded(page)

    # The list shows it too, reached by a client-side link.
    page.click("nav >> text=Runs")
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row).to_contain_text("succeeded")
    assert _not_reloaded(page)
    assert console.problems() == []


def test_a_new_run_appears_in_the_list_and_changes_state_live(
    stack: Stack, page: Page, console: Console
) -> None:
    page.goto(f"{stack.url}/")
    _mark_document(page)
    expect(page.locator(".live")).to_have_text("live")
    run_id = stack.submit_hello(steps=3, step_seconds=0.3, project="search")
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row).to_be_visible()
    expect(row.locator(".badge").first).to_have_text("succeeded", timeout=45_000)
    assert _not_reloaded(page)

    # Filters: the project narrows the list, the text finds the run by a piece of its id.
    page.select_option("#f-project", "search")
    expect(page.locator("tbody tr[data-run-id]")).not_to_have_count(0)
    for project in page.locator("tbody tr[data-run-id] td:nth-child(3)").all_inner_texts():
        assert project.startswith("search")
    page.select_option("#f-project", "")
    page.fill("#f-q", run_id[-10:].lower())
    expect(page.locator("tbody tr[data-run-id]")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"[?&]q="))
    # Keyboard: the row's link is reachable and opens the run.
    page.locator(f'tr[data-run-id="{run_id}"] a').focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/runs/{run_id}")
    assert console.problems() == []


def test_cancel_a_long_run_from_its_page(stack: Stack, page: Page, console: Console) -> None:
    run_id = stack.submit_hello(steps=400, step_seconds=0.5)
    stack.runs["cancelled"] = run_id
    stack.wait_for_state(run_id, {"running"})
    page.goto(f"{stack.url}/runs/{run_id}")
    badge = page.locator(".run-header .badge").first
    expect(badge).to_have_text("running")
    expect(page.locator(".log")).to_contain_text("step 1/400")

    page.click("text=Cancel run")
    dialog = page.locator("dialog.confirm")
    expect(dialog).to_be_visible()
    dialog.locator("text=Keep it").click()  # the first answer changes nothing
    expect(dialog).to_have_count(0)
    assert stack.api("GET", f"runs/{run_id}")["state"] == "running"

    page.click("text=Cancel run")
    page.locator("dialog.confirm button.danger").click()
    expect(badge).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("button", has_text="Resume run")).to_be_visible()
    expect(page.locator("table.events")).to_contain_text("run.cancel_requested")
    assert console.problems() == []


def test_validation_errors_are_shown_at_their_fields(stack: Stack, page: Page, console: Console) -> None:
    page.goto(f"{stack.url}/submit")
    project_error = page.locator("#s-project-error")
    page.fill("#s-project", "Bad_Project")
    expect(project_error).to_contain_text("DNS-1123")
    expect(page.locator("#s-project")).to_have_attribute("aria-invalid", "true")
    page.click("button[type=submit]")
    expect(page.locator("#s-project")).to_be_focused()
    page.fill("#s-project", "demo")
    expect(project_error).to_be_hidden()

    # What only the API knows: its 422 names the field, shown next to it.
    page.select_option("#s-spec_mode", "none")
    page.fill('[id="s-workload.command"]', "true")
    page.fill('[id="s-workload.env"]', "FABRIK_TOKEN=x")
    page.fill("#s-labels", "fabrik.sh/run-id=x")
    page.click("button[type=submit]")
    expect(page.locator('[id="s-workload.env-error"]')).to_contain_text("reserved")
    expect(page.locator("#s-labels-error")).to_contain_text("labels.")
    expect(page.locator("#s-form-error")).to_contain_text("The run was not started")
    assert page.url.endswith("/submit")
    # The browser reports the refused request itself; nothing else may appear.
    assert console.problems(allowed=("status of 422",)) == []


def test_sign_in_roles_and_sign_out(stack: Stack, page: Page, console: Console) -> None:
    url = stack.locked.base_url
    page.goto(f"{url}/")
    expect(page.locator("h1")).to_have_text("Sign in to Fabrik")
    expect(page.locator("#nav")).to_be_hidden()
    expect(page.locator("#credential")).to_be_focused()
    _shot(page, "sign-in")

    page.fill("#credential", "fbk_01jh3z9w4r8q0m6y2v5t7k1b3c_not-a-real-secret")
    page.click("button[type=submit]")
    expect(page.locator(".signin")).to_contain_text("refused")

    viewer = mint_hs256(JWT_SECRET, "viewer@example.com", "viewer", ttl_seconds=600)
    page.fill("#credential", viewer)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Runs")
    expect(page.locator(".who")).to_contain_text("viewer")
    expect(page.locator('#nav a[data-page="submit"]')).to_be_hidden()
    expect(page.locator(".live")).to_have_text("live")
    run_id = stack.runs.get("cancelled") or stack.submit_hello(steps=1, step_seconds=0.1)
    page.goto(f"{url}/runs/{run_id}")  # a reload keeps the credential (session storage)
    expect(page.locator(".run-header .badge").first).to_be_visible()
    expect(page.locator("button", has_text="Resume run")).to_have_count(0)
    expect(page.locator("button", has_text="Cancel run")).to_have_count(0)
    page.goto(f"{url}/submit")
    expect(page.locator("main")).to_contain_text("needs the developer role")

    page.click("text=Sign out")
    expect(page.locator("h1")).to_have_text("Sign in to Fabrik")
    assert page.evaluate("sessionStorage.length") == 0

    # Authenticated without any role: the dashboard says so and offers another credential.
    nobody = mint_hs256(JWT_SECRET, "nobody@example.com", [], ttl_seconds=600)
    page.fill("#credential", nobody)
    page.click("button[type=submit]")
    refusal = page.locator("main .notice.error")
    expect(refusal).to_contain_text("Not allowed")
    expect(refusal).to_contain_text("no role")
    page.click("text=Sign in with another credential")
    expect(page.locator("h1")).to_have_text("Sign in to Fabrik")
    assert page.evaluate("sessionStorage.length") == 0
    # The refused credential (401) and the refusals (403) are reported by the browser itself.
    assert console.problems(allowed=("status of 401", "status of 403")) == []


PAGES = {
    "runs": ("/", "tbody tr[data-run-id]"),
    "queue": ("/queue", "td.mono a"),
    "submit": ("/submit", "form.submit"),
    "schedules": ("/schedules", "main .notice, main table"),
    "costs": ("/costs", ".stat"),
    "experiments": ("/experiments", "table.experiments tbody tr[data-experiment-id]"),
}
EXPERIMENT = {
    "name": "more memory for lab",
    "target": {"project": "lab"},
    "parameter": "resources.memory_limit",
    "control": {"name": "control"},
    "treatments": [{"name": "6gi", "overrides": {"resources.memory_limit": "6Gi"}}],
}


@pytest.fixture(scope="module")
def backlog(stack: Stack) -> Iterator[list[str]]:
    """Two long runs of one project: one running, one queued behind it."""
    runs = [stack.submit_hello(steps=400, step_seconds=0.5, project="backlog") for _ in range(2)]
    stack.wait_for_state(runs[0], {"running"})
    try:
        yield runs
    finally:
        for run_id in runs:
            httpx.post(f"{stack.url}/api/v1/runs/{run_id}/cancel", timeout=10)


@pytest.fixture(scope="module")
def experiment(stack: Stack) -> str:
    """An experiment on a project without runs (the Experiments page lists it)."""
    return str(stack.api("POST", "experiments", json=EXPERIMENT)["experiment"]["id"])


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_every_page_renders_without_console_errors(
    stack: Stack, browser: Browser, backlog: list[str], experiment: str, viewport: str
) -> None:
    if not stack.runs:
        run_id = stack.submit_hello(steps=2, step_seconds=0.1)
        stack.wait_for_state(run_id, {"succeeded"})
        stack.runs["submitted"] = run_id
    size = {"width": 1280, "height": 900} if viewport == "desktop" else {"width": 390, "height": 844}
    context = browser.new_context(viewport=size, is_mobile=viewport == "phone", has_touch=viewport == "phone")
    context.set_default_timeout(15_000)
    tab = context.new_page()
    console = Console()
    tab.on("console", console.on_console)
    tab.on("pageerror", console.on_error)
    suffix = "" if viewport == "desktop" else "-phone"
    try:
        run_id = stack.runs.get("submitted") or next(iter(stack.runs.values()))
        pages = {**PAGES, "run": (f"/runs/{run_id}", "#h-llm + * table, #h-llm + * .notice")}
        for name, (path, ready) in pages.items():
            tab.goto(f"{stack.url}{path}")
            expect(tab.locator(ready).first).to_be_visible()
            expect(tab.locator("main")).not_to_contain_text("Loading…")
            if name == "run":
                expect(tab.locator(".log .line").first).to_be_visible()
            _shot(tab, f"{name}{suffix}")
            width = tab.evaluate("document.documentElement.scrollWidth")
            assert width <= size["width"] + 1, f"{name} scrolls sideways at {size['width']} px ({width} px)"
            if name == "experiments":  # the created experiment, and its page reached from its row
                tab.locator(f'tr[data-experiment-id="{experiment}"] a').click()
                expect(tab.locator("table.arms")).to_contain_text("6Gi")
                expect(tab.locator("#h-history + *")).not_to_contain_text("Loading…")
                _shot(tab, f"experiment{suffix}")
                width = tab.evaluate("document.documentElement.scrollWidth")
                assert width <= size["width"] + 1, f"experiment scrolls sideways ({width} px)"
        # Keyboard: the first tab stop is the skip link, then the navigation.
        tab.goto(f"{stack.url}/")
        tab.keyboard.press("Tab")
        assert tab.evaluate("document.activeElement.className") == "skip"
    finally:
        context.close()
    assert console.problems() == [], console.messages
