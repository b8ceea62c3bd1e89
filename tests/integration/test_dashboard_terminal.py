"""`fabrik dashboard` driven through Textual's test harness (`App.run_test` and its pilot) against a
real platform: NATS, gateway, scheduler and the local executor as processes (the `platform`
fixture of test_cli_runs.py).

The flow is the browser dashboard's: open the help, see the live check and the API's validation
error in the new-run form, start a run from the form and watch it succeed and its log appear
without any refresh, cancel a second, long run with `c` and a confirmation, and quit. Then a viewer's
credential is refused cancel and new runs, with a message naming the role.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Input, Static

from fabrik_cli.client import ApiClient, ApiTarget
from fabrik_cli.dashboard.api import DashboardApi
from fabrik_cli.dashboard.app import (
    ConfirmScreen,
    DashboardApp,
    HelpScreen,
    NewRunScreen,
    RunScreen,
    RunsScreen,
)
from fabrik_common.ids import DNS1123_RULE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HELLO = ROOT / "examples" / "hello"
SIZE = (200, 60)


def _load_cli_runs() -> Any:
    """The module with the `platform` fixture, loaded by path (the tests are not a package)."""
    name = "fabrik_integration_cli_runs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "test_cli_runs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


platform = _load_cli_runs().platform  # the fixture: gateway (anonymous admin), scheduler, executor


async def wait_until(
    pilot: Pilot[Any],
    condition: Callable[[], bool],
    what: str,
    timeout: float = 30,
    detail: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {detail()}"
        await pilot.pause(0.05)


async def type_text(pilot: Pilot[Any], selector: str, text: str) -> None:
    """Focus an input, empty it and type `text` key by key."""
    box = pilot.app.screen.query_one(selector, Input)
    box.focus()
    box.value = ""
    await pilot.press(*text)


def dashboard(api: str, token: str | None = None) -> DashboardApp:
    client = ApiClient(ApiTarget(api, "--api"), token=token)
    return DashboardApp(DashboardApi(client))


def current(app: DashboardApp) -> Screen[Any]:
    """The screen on top (a call, so that a type checker does not keep an earlier narrowing)."""
    return app.screen


def on_top(app: DashboardApp, screen: Screen[Any]) -> bool:
    return app.screen is screen


def rendered(widget: Static) -> str:
    return str(widget.render())


@pytest.mark.slow
async def test_terminal_dashboard_flow(platform: Any) -> None:
    app = dashboard(platform.api)
    async with app.run_test(size=SIZE) as pilot:
        runs = app.runs_screen
        await wait_until(pilot, lambda: runs.loaded and runs.stream_status.state == "live", "the list")
        await wait_until(pilot, lambda: app.caller is not None, "whoami")
        assert app.caller is not None and app.caller.role == "admin"
        status = rendered(runs.query_one("#status", Static))
        assert "stream: live" in status and "0 runs" in status

        # help
        await pilot.press("question_mark")
        help_screen = current(app)
        assert isinstance(help_screen, HelpScreen)
        help_text = rendered(help_screen.query_one("#help-text", Static))
        assert "cancel the run" in help_text and "start a new run" in help_text
        await pilot.press("escape")
        assert on_top(app, runs)

        # the new-run form: a bad project is caught as it is typed, and nothing is sent
        await pilot.press("n")
        form = current(app)
        assert isinstance(form, NewRunScreen)
        await type_text(pilot, "#f-project", "Bad_Project")
        assert form.field_error("project") == DNS1123_RULE
        await pilot.press("ctrl+s")
        assert on_top(app, form)
        assert app.api.client.list_runs()["items"] == []

        # ... and a field the API refuses is shown under that field
        await type_text(pilot, "#f-project", "demo")
        assert form.field_error("project") == ""
        await type_text(pilot, "#f-spec_path", "../spec.json")
        await type_text(pilot, "#f-repo", str(HELLO))
        await type_text(pilot, "#f-command", f"{sys.executable} workload.py")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: form.field_error("spec_path") != "", "the API's field error")
        assert "without '..'" in form.field_error("spec_path")
        assert "Validation failed (422)" in form.field_error("general")
        assert on_top(app, form)

        # submit a run from the form
        await type_text(pilot, "#f-spec_path", "spec.json")
        await pilot.press("enter")
        await wait_until(pilot, lambda: on_top(app, runs), "the form to close")
        assert len(app.submitted) == 1
        run_id = app.submitted[0]
        await wait_until(pilot, lambda: runs.selected_run_id() == run_id, "the new run under the cursor")

        # open it and watch it succeed, its log arriving live
        await pilot.press("enter")
        screen = current(app)
        assert isinstance(screen, RunScreen) and screen.run_id == run_id
        await wait_until(
            pilot,
            lambda: (screen.run or {}).get("state") == "succeeded",
            "the run to succeed",
            timeout=60,
            detail=lambda: (screen.run, screen.stream_status, screen.error, screen.log_lines()[-5:]),
        )
        await wait_until(pilot, lambda: "hello: wrote hello.txt" in screen.log_lines(), "the last log line")
        lines = screen.log_lines()
        assert "step 6/6: verify" in lines
        assert len(lines) == len(set(lines)), "a log line was shown twice"
        assert screen.streamed_lines > 0, "no log line came from the live stream"
        assert screen.reloads == 1
        header = rendered(screen.query_one("#run-header", Static))
        assert "succeeded" in header and run_id in header
        assert "6/6" in rendered(screen.query_one("#run-progress", Static))
        await wait_until(
            pilot,
            lambda: any(item.get("type") == "run.finished" for item in screen.events.items),
            "run.finished",
        )
        await pilot.press("l")  # the log alone
        assert not screen.query_one("#summary").display
        await pilot.press("q")
        assert on_top(app, runs)

        # the list followed the run without being read again
        await wait_until(pilot, lambda: runs.row_cells().get(run_id, ("",))[0] == "succeeded", "the list row")
        assert runs.reloads == 1
        row = runs.row_cells()[run_id]
        assert row[1] == "demo" and row[3] == "verify · done" and row[4].endswith("100% 6/6")

        # a second, long run appears by itself; cancel it with c and a confirmation
        long_run = app.api.client.submit_run(
            {
                "project": "demo",
                "workload": {
                    "command": [
                        sys.executable,
                        "-c",
                        "import time; print('long run', flush=True); time.sleep(120)",
                    ]
                },
            }
        )
        long_id = long_run["run_id"]
        # running in the store and drawn in the table (the row is added after the store has it)
        await wait_until(
            pilot,
            lambda: (runs.store.get(long_id) or {}).get("state") == "running" and long_id in runs.row_cells(),
            "the long run",
        )
        await pilot.press("up")
        assert runs.selected_run_id() == long_id
        await pilot.press("c")
        assert isinstance(current(app), ConfirmScreen)
        assert long_id in rendered(current(app).query_one("#question", Static))
        await pilot.press("y")
        assert on_top(app, runs)
        await wait_until(
            pilot,
            lambda: (runs.store.get(long_id) or {}).get("state") == "cancelled",
            "the cancel",
            timeout=30,
        )
        await wait_until(pilot, lambda: f"cancel requested for run {long_id}" in app.notices, "the notice")
        # cancelling a finished run is refused here, before anything is sent
        await pilot.press("c")
        assert not isinstance(current(app), ConfirmScreen)
        assert app.notices[-1] == f"run {long_id} has already finished (cancelled): nothing to cancel"
        assert runs.reloads == 1

        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running, "the dashboard to quit", timeout=5)

    # a viewer sees the runs but is refused cancel and new runs, with the reason
    admin = app.api.client
    token = admin.create_token({"name": "dashboard-viewer", "role": "viewer"})["token"]
    viewer = dashboard(platform.api, token=token)
    async with viewer.run_test(size=SIZE) as pilot:
        runs = viewer.runs_screen
        await wait_until(pilot, lambda: viewer.caller is not None and run_id in runs.row_cells(), "the list")
        assert viewer.caller is not None and viewer.caller.role == "viewer"
        assert "viewer everywhere" in rendered(runs.query_one("#status", Static))
        await pilot.press("c")
        assert isinstance(current(viewer), RunsScreen)
        assert "has the role viewer in project demo; to cancel runs it takes developer" in viewer.notices[-1]
        await pilot.press("n")
        assert isinstance(current(viewer), RunsScreen)
        assert "starting runs takes the developer role" in viewer.notices[-1]
        await pilot.press("q")
        await wait_until(pilot, lambda: not viewer.is_running, "the dashboard to quit", timeout=5)


async def test_an_unreachable_gateway_is_shown_not_raised(tmp_path: Path) -> None:
    from fabrik_common.natsserver import free_port

    app = dashboard(f"http://127.0.0.1:{free_port()}")
    async with app.run_test(size=SIZE) as pilot:
        runs = app.runs_screen
        await wait_until(pilot, lambda: runs.stream_status.state == "reconnecting", "the reconnecting status")
        assert "cannot connect" in runs.stream_status.detail
        status = rendered(runs.query_one("#status", Static))
        assert "reconnecting" in status
        await wait_until(pilot, lambda: any("cannot reach" in n for n in app.notices), "the whoami error")
        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running, "the dashboard to quit", timeout=5)
