"""The Textual application of `fabrik dashboard`: the runs list, a run (header, events, live
logs), and the dialogs (confirm, new run, help). What is shown and how events change it lives in
the plain modules of this package; this module only wires them to widgets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, RichLog, Select, Static

from fabrik_cli.client import ApiError
from fabrik_cli.dashboard.access import Caller
from fabrik_cli.dashboard.api import DashboardApi, stream_params
from fabrik_cli.dashboard.detail import (
    EVENT_COLUMNS,
    EventLog,
    LogBuffer,
    chunk_lines,
    event_row,
    header_pairs,
    log_text,
    progress_fraction,
    progress_text,
)
from fabrik_cli.dashboard.filtering import RunFilter, parse_filter
from fabrik_cli.dashboard.form import FIELDS, GENERAL, PRIORITIES, NewRun, errors_by_field, project_error
from fabrik_cli.dashboard.live import FATAL_STATUSES, LiveStream, StreamStatus
from fabrik_cli.dashboard.runs import COLUMNS, LOG_CHUNK, RunStore, is_terminal, run_row
from fabrik_cli.errors import CliError
from fabrik_cli.output import progress_bar
from fabrik_common.runs import IMPORTED_BY_PREFIX

RESUMABLE = frozenset({"failed", "timed_out", "cancelled"})
STATE_STYLES: dict[str, str] = {
    "queued": "dim",
    "starting": "cyan",
    "running": "bold cyan",
    "cancelling": "yellow",
    "succeeded": "green",
    "failed": "bold red",
    "timed_out": "red",
    "budget_exceeded": "red",
    "cancelled": "yellow",
}
COLUMN_KEYS: tuple[str, ...] = tuple(name.lower().replace(" / ", "_").replace(" ", "_") for name in COLUMNS)
TABLE_REFRESH_SECONDS = 0.25
RELOAD_RETRY_SECONDS = 2.0
Action = Literal["cancel", "resume"]

HELP_TEXT = """\
[b]Runs list[/b]
  [b]↑ ↓[/b]    move                  [b]enter[/b]  open the run
  [b]l[/b]      the run's log         [b]c[/b]      cancel the run (asks first)
  [b]r[/b]      resume the run: a failed, timed-out or cancelled one (asks first)
  [b]/[/b]      filter: words, [b]project:NAME[/b], [b]state:running,queued[/b],
         [b]state:active[/b] (not finished), [b]state:done[/b] (finished)
  [b]esc[/b]    clear the filter      [b]n[/b]      start a new run
  [b]?[/b]      this help             [b]q[/b]      quit

[b]A run[/b]: state, reason, attempt, timings, cost and tokens; progress;
lifecycle events; the log, followed as it is written
  [b]l[/b]      the log alone, or everything
  [b]t[/b]      timestamps on log lines   [b]f[/b]      follow the log, or stop following
  [b]c[/b] [b]r[/b]    cancel, resume            [b]q[/b] [b]esc[/b]  back to the list

Cancel, resume and new runs take the developer role in the run's project
(your roles are on the status line). The list and the open run follow the
gateway's live stream and reconnect by themselves after a dropped connection.
"""


def state_cell(cell: str, state: Any) -> Text:
    return Text(cell, style=STATE_STYLES.get(str(state), ""))


def error_text(exc: CliError) -> str:
    return "\n".join([exc.message, *exc.details])


# --------------------------------------------------------------------------------------------
# Dialogs


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; `y` or the Yes button confirms, `n`, `esc` or No declines."""

    AUTO_FOCUS = "#no"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("Fabrik dashboard: keys", id="help-title")
            yield Static(HELP_TEXT, id="help-text")
            yield Static("esc, q or ? closes", classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)


FORM_LABELS: dict[str, tuple[str, str]] = {
    "project": ("Project", "a DNS-1123 label, e.g. web-shop"),
    "env": ("Environment", "default: dev"),
    "spec_path": ("Spec path", "the spec inside the repository, e.g. spec.json"),
    "repo": ("Repository", "a git URL, or a local directory"),
    "ref": ("Ref", "default: HEAD"),
    "command": ("Command", "what to run in the workspace, e.g. python workload.py"),
}


class NewRunScreen(ModalScreen[Mapping[str, Any] | None]):
    """The new-run form. The project is checked as it is typed; the API's field errors are shown
    under their fields."""

    AUTO_FOCUS = "#f-project"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Cancel"),
        Binding("ctrl+s", "submit", "Submit"),
    ]

    def __init__(self, api: DashboardApi, caller: Caller | None) -> None:
        super().__init__()
        self.api = api
        self.caller = caller
        self.idempotency_key = f"fabrik-dashboard-{uuid.uuid4()}"
        self.submitting = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="form"):
            yield Static("New run", id="form-title")
            for name, (label, placeholder) in FORM_LABELS.items():
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(placeholder=placeholder, id=f"f-{name}", compact=True)
                yield Static("", id=f"e-{name}", classes="field-error")
            with Horizontal(classes="field"):
                yield Label("Priority", classes="field-label")
                yield Select(
                    [(p, p) for p in PRIORITIES],
                    value="normal",
                    allow_blank=False,
                    id="f-priority",
                    compact=True,
                )
            yield Static("", id="e-priority", classes="field-error")
            yield Static("", id=f"e-{GENERAL}", classes="field-error")
            with Horizontal(id="buttons"):
                yield Button("Submit (ctrl+s)", id="submit", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def values(self) -> dict[str, str]:
        values = {name: self.query_one(f"#f-{name}", Input).value for name in FORM_LABELS}
        priority = self.query_one("#f-priority", Select).value
        values["priority"] = priority if isinstance(priority, str) else ""
        return values

    def show_errors(self, errors: Mapping[str, Sequence[str] | str]) -> None:
        for name in (*FIELDS, GENERAL):
            shown = errors.get(name, "")
            message = shown if isinstance(shown, str) else "\n".join(shown)
            widget = self.query_one(f"#e-{name}", Static)
            widget.update(Text(message))
            widget.set_class(bool(message), "shown")

    def field_error(self, name: str) -> str:
        return str(self.query_one(f"#e-{name}", Static).render())

    @on(Input.Changed, "#f-project")
    def project_changed(self, event: Input.Changed) -> None:
        problem = project_error(event.value) if event.value else None
        widget = self.query_one("#e-project", Static)
        widget.update(Text(problem or ""))
        widget.set_class(problem is not None, "shown")

    @on(Input.Submitted)
    def input_submitted(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#submit")
    def submit_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#cancel")
    def cancel_pressed(self) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_submit(self) -> None:
        if self.submitting:
            return
        new_run = NewRun.from_values(self.values())
        errors = new_run.local_errors()
        if errors:
            self.show_errors(errors)
            return
        if self.caller is not None and (refusal := self.caller.refusal("submit", new_run.project.strip())):
            self.show_errors({GENERAL: refusal})
            return
        try:
            body = new_run.body()
        except CliError as exc:
            self.show_errors({GENERAL: error_text(exc)})
            return
        self.show_errors({GENERAL: "submitting…"})
        self.submitting = True
        self.run_worker(self._submit(body), group="submit", exclusive=True)

    async def _submit(self, body: Mapping[str, Any]) -> None:
        try:
            run = await self.api.submit(body, idempotency_key=self.idempotency_key)
        except ApiError as exc:
            grouped: dict[str, Sequence[str] | str] = dict(errors_by_field(exc.errors))
            summary = f"{exc.title or 'rejected'} ({exc.status})"
            grouped[GENERAL] = summary if exc.errors else error_text(exc)
            self.show_errors(grouped)
            return
        except CliError as exc:
            self.show_errors({GENERAL: error_text(exc)})
            return
        finally:
            self.submitting = False
        self.dismiss(run)


# --------------------------------------------------------------------------------------------
# Screens


class RunsScreen(Screen[None]):
    """Every run the caller sees, newest first, kept current by the live stream."""

    AUTO_FOCUS = "#runs"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open_run", "Open"),
        Binding("l", "logs", "Logs"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "resume", "Resume"),
        Binding("slash", "filter", "Filter"),
        Binding("n", "new_run", "New run"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, api: DashboardApi, *, initial_filter: str = "") -> None:
        super().__init__()
        self.api = api
        self.store = RunStore()
        self.run_filter: RunFilter = parse_filter(initial_filter)
        self.initial_filter = initial_filter
        self.stream_status = StreamStatus("connecting")
        self.loaded = False
        self.load_error = ""
        self._shown: list[str] = []
        self._cells: dict[str, tuple[str, ...]] = {}
        self._fetching: set[str] = set()
        self._fetch_again: set[str] = set()
        self._select: str | None = None
        self.reloads = 0
        """How often the list was read from the REST API (at start, after a gap or a fresh stream)."""

    @property
    def dashboard(self) -> DashboardApp:
        app = self.app
        assert isinstance(app, DashboardApp)
        return app

    def compose(self) -> ComposeResult:
        yield Static("", id="status")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Input(value=self.initial_filter, placeholder="filter (enter keeps it, esc clears)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        for label, key in zip(COLUMNS, COLUMN_KEYS, strict=True):
            table.add_column(label, key=key)
        self.query_one("#filter", Input).display = bool(self.initial_filter)
        self.run_worker(self._follow(), group="live", exclusive=True)
        self.set_interval(TABLE_REFRESH_SECONDS, self.refresh_table)
        self.refresh_table()

    # -- the stream --------------------------------------------------------------------------

    async def _follow(self) -> None:
        stream = LiveStream(
            self.api.target,
            self.api.credential,
            stream_params(),
            on_message=self._live_message,
            on_status=self._live_status,
            on_connect=self._live_connect,
            on_gap=self._live_gap,
        )
        error = await stream.run()
        self.dashboard.show_error("live updates stopped", error)

    async def _live_status(self, status: StreamStatus) -> None:
        self.stream_status = status
        self.update_status()

    async def _live_connect(self, resumed: bool) -> None:
        if self.dashboard.caller is None:  # the gateway was not reachable at start
            self.dashboard.load_caller()
        if not resumed:
            await self._reload()

    async def _live_gap(self, gap: Mapping[str, Any]) -> None:
        await self._reload()

    async def _live_message(self, message: Mapping[str, Any]) -> None:
        change = self.store.apply(message)
        if change is not None and change.fetch:
            self.fetch_run(change.run_id)

    async def _reload(self) -> None:
        """The newest runs from the REST API (at start, and when events may have been missed).

        Called from the stream before it reads on: the events that arrive meanwhile wait, and are
        applied in order on top of what was read, so the list ends at the latest state."""
        while True:
            try:
                items = await self.api.list_runs()
            except CliError as exc:
                self.load_error = f"cannot read the runs: {exc.message}"
                self.update_status()
                if isinstance(exc, ApiError) and exc.status in FATAL_STATUSES:
                    self.dashboard.show_error("cannot read the runs", exc)
                    return
                await asyncio.sleep(RELOAD_RETRY_SECONDS)
                continue
            self.store.load(items)
            self.reloads += 1
            self.loaded = True
            self.load_error = ""
            self.refresh_table()
            return

    def fetch_run(self, run_id: str) -> None:
        """Read one run again (coalesced: one read per run at a time, repeated if asked meanwhile)."""
        if run_id in self._fetching:
            self._fetch_again.add(run_id)
            return
        self._fetching.add(run_id)
        self.run_worker(self._fetch(run_id), group="fetch")

    async def _fetch(self, run_id: str) -> None:
        try:
            while True:
                self._fetch_again.discard(run_id)
                try:
                    run = await self.api.get_run(run_id)
                except ApiError as exc:
                    # 404: another gateway replica took the request and the scheduler has not
                    # recorded the run yet; the row stays as the events made it, and the next
                    # state change reads it again.
                    if exc.status != 404:
                        self.dashboard.show_error(f"cannot read run {run_id}", exc)
                    return
                except CliError as exc:
                    self.dashboard.show_error(f"cannot read run {run_id}", exc)
                    return
                self.store.upsert(run)
                if run_id not in self._fetch_again:
                    return
        finally:
            self._fetching.discard(run_id)

    # -- the table -----------------------------------------------------------------------------

    def visible_runs(self) -> list[dict[str, Any]]:
        return [run for run in self.store.ordered() if self.run_filter.matches(run)]

    def refresh_table(self) -> None:
        table = self.query_one("#runs", DataTable)
        now = datetime.now(UTC)
        runs = self.visible_runs()
        keys = [str(run["run_id"]) for run in runs]
        if keys != self._shown:
            selected = self._select or self.selected_run_id()
            table.clear()
            self._cells = {}
            for run in runs:
                cells = run_row(run, now)
                self._cells[str(run["run_id"])] = cells
                table.add_row(state_cell(cells[0], run.get("state")), *cells[1:], key=str(run["run_id"]))
            self._shown = keys
            if selected in keys:
                table.move_cursor(row=keys.index(selected))
                if self._select == selected:
                    self._select = None
        else:
            for run in runs:
                run_id = str(run["run_id"])
                cells = run_row(run, now)
                old = self._cells.get(run_id)
                if old == cells:
                    continue
                for index, (before, after) in enumerate(zip(old or (), cells, strict=False)):
                    if before != after:
                        value: str | Text = state_cell(after, run.get("state")) if index == 0 else after
                        table.update_cell(run_id, COLUMN_KEYS[index], value, update_width=True)
                self._cells[run_id] = cells
        self.update_status()

    def update_status(self) -> None:
        caller = self.dashboard.caller_text()
        shown = f"{len(self.store)} runs"
        if not self.run_filter.empty:
            shown = f"{len(self._shown)} of {shown}"
        parts = [
            f"[b]Fabrik[/b] {self.api.target.url}",
            caller,
            f"stream: {self.stream_status.describe()}",
            shown if self.loaded else "loading runs…",
        ]
        if not self.run_filter.empty:
            parts.append(f"filter: {self.run_filter.describe()}")
        if self.loaded and not self.store:
            parts.append("no runs yet: n starts one")
        if self.load_error:
            parts.append(f"[red]{self.load_error}[/red]")
        status = self.query_one("#status", Static)
        status.update(Text.from_markup("  ·  ".join(parts)))
        status.set_class(self.stream_status.state != "live", "degraded")

    def row_cells(self) -> dict[str, tuple[str, ...]]:
        """The cells of each run in the table, by run id, as last drawn."""
        return dict(self._cells)

    def selected_run_id(self) -> str | None:
        table = self.query_one("#runs", DataTable)
        row = table.cursor_row
        if 0 <= row < len(self._shown):
            return self._shown[row]
        return None

    def selected_run(self) -> dict[str, Any] | None:
        run_id = self.selected_run_id()
        if run_id is None:
            self.notify("no run selected", severity="warning")
            return None
        return self.store.get(run_id)

    def select_run(self, run_id: str) -> None:
        """Put the cursor on this run once it is in the table."""
        self._select = run_id
        self.refresh_table()

    # -- keys ----------------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#runs")
    def row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.dashboard.open(RunScreen(self.api, event.row_key.value))

    def action_open_run(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.dashboard.open(RunScreen(self.api, str(run["run_id"])))

    def action_logs(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.dashboard.open(RunScreen(self.api, str(run["run_id"]), logs_only=True))

    def action_cancel(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.dashboard.request_action("cancel", run)

    def action_resume(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.dashboard.request_action("resume", run)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.run_filter = parse_filter("")
        self.query_one("#runs", DataTable).focus()
        self.refresh_table()

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.run_filter = parse_filter(event.value)
        self.refresh_table()

    @on(Input.Submitted, "#filter")
    def filter_submitted(self, event: Input.Submitted) -> None:
        event.input.display = bool(event.value)
        self.query_one("#runs", DataTable).focus()

    def action_new_run(self) -> None:
        self.dashboard.open_new_run(self)

    def action_help(self) -> None:
        self.dashboard.open(HelpScreen())

    def action_quit(self) -> None:
        self.dashboard.quit()


class RunScreen(Screen[None]):
    """One run: header, progress, lifecycle events and its log, followed live."""

    AUTO_FOCUS = "#logs"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("l", "toggle_logs", "Logs only"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "resume", "Resume"),
        Binding("t", "timestamps", "Timestamps"),
        Binding("f", "follow", "Follow"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "back", "Back"),
        Binding("escape", "back", "Back", show=False),
    ]

    def __init__(self, api: DashboardApi, run_id: str, *, logs_only: bool = False) -> None:
        super().__init__()
        self.api = api
        self.run_id = run_id
        self.logs_only = logs_only
        self.store = RunStore()
        self.events = EventLog()
        self.logs = LogBuffer()
        self.timestamps = False
        self.stream_status = StreamStatus("connecting")
        self.error = ""
        self._fetching = False
        self._fetch_again = False
        self.reloads = 0
        self.streamed_lines = 0
        """Log lines that arrived from the live stream (not from the first read)."""

    @property
    def dashboard(self) -> DashboardApp:
        app = self.app
        assert isinstance(app, DashboardApp)
        return app

    @property
    def run(self) -> dict[str, Any] | None:
        return self.store.get(self.run_id)

    def compose(self) -> ComposeResult:
        yield Static("", id="run-status")
        with Vertical(id="summary"):
            yield Static("", id="run-header")
            yield Static("", id="run-progress")
            yield Label("Events", classes="section")
            yield DataTable(id="events", cursor_type="row", zebra_stripes=True)
        yield Label("Logs", classes="section", id="logs-label")
        yield RichLog(id="logs", max_lines=10_000, wrap=True, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#events", DataTable)
        for label in EVENT_COLUMNS:
            table.add_column(label, key=label.lower())
        self.query_one("#summary").display = not self.logs_only
        self.run_worker(self._follow(), group="live", exclusive=True)
        self.set_interval(1.0, self.render_run)
        self.render_run()

    # -- the stream --------------------------------------------------------------------------

    async def _follow(self) -> None:
        stream = LiveStream(
            self.api.target,
            self.api.credential,
            stream_params(run_id=self.run_id, logs=self.run_id),
            on_message=self._live_message,
            on_status=self._live_status,
            on_connect=self._live_connect,
            on_gap=self._live_gap,
        )
        error = await stream.run()
        if error.status == 404:
            self.error = f"run {self.run_id} not found (or not visible with this credential)"
            self.render_run()
        else:
            self.dashboard.show_error("live updates stopped", error)

    async def _live_status(self, status: StreamStatus) -> None:
        self.stream_status = status
        self.render_status()

    async def _live_connect(self, resumed: bool) -> None:
        if not resumed:
            await self._reload()

    async def _live_gap(self, gap: Mapping[str, Any]) -> None:
        await self._reload()

    async def _reload(self) -> None:
        try:
            run = await self.api.get_run(self.run_id)
            events = await self.api.run_events(self.run_id)
            lines = await self.api.run_logs(self.run_id)
        except CliError as exc:
            self.error = error_text(exc)
            self.render_run()
            return
        self.error = ""
        self.reloads += 1
        self.store.upsert(run)
        for item in events:
            self.add_event(item)
        self.write_lines(self.logs.add_all(lines))
        self.render_run()

    async def _live_message(self, message: Mapping[str, Any]) -> None:
        if message.get("type") == LOG_CHUNK:
            lines = self.logs.add_all(chunk_lines(message))
            self.streamed_lines += len(lines)
            self.write_lines(lines)
            return
        self.add_event(message)
        change = self.store.apply(message)
        if change is not None and change.fetch:
            self.fetch_run()
        self.render_run()

    def fetch_run(self) -> None:
        if self._fetching:
            self._fetch_again = True
            return
        self._fetching = True
        self.run_worker(self._fetch(), group="fetch")

    async def _fetch(self) -> None:
        try:
            while True:
                self._fetch_again = False
                try:
                    run = await self.api.get_run(self.run_id)
                except CliError as exc:
                    self.error = error_text(exc)
                    self.render_run()
                    return
                self.store.upsert(run)
                self.render_run()
                if not self._fetch_again:
                    return
        finally:
            self._fetching = False

    # -- rendering -----------------------------------------------------------------------------

    def add_event(self, item: Mapping[str, Any]) -> None:
        if self.events.add(item):
            self.query_one("#events", DataTable).add_row(*event_row(item))
            self.query_one("#events", DataTable).move_cursor(row=len(self.events.items) - 1)

    def write_lines(self, lines: Sequence[Mapping[str, Any]]) -> None:
        log = self.query_one("#logs", RichLog)
        for line in lines:
            log.write(Text(log_text(line, timestamps=self.timestamps)))

    def log_lines(self) -> list[str]:
        """The log lines as shown."""
        return [log_text(line, timestamps=self.timestamps) for line in self.logs.lines]

    def render_status(self) -> None:
        parts = [
            f"[b]run {self.run_id}[/b]",
            f"stream: {self.stream_status.describe()}",
            f"{len(self.logs.lines)} log lines",
        ]
        status = self.query_one("#run-status", Static)
        status.update(Text.from_markup("  ·  ".join(parts)))
        status.set_class(self.stream_status.state != "live", "degraded")

    def render_run(self) -> None:
        self.render_status()
        header = self.query_one("#run-header", Static)
        run = self.run
        if run is None:
            header.update(Text(self.error or "loading…", style="red" if self.error else ""))
            return
        now = datetime.now(UTC)
        width = max(len(label) for label, _ in header_pairs(run, now))
        text = Text()
        for label, value in header_pairs(run, now):
            style = STATE_STYLES.get(str(run.get("state")), "") if label == "state" else ""
            text.append(f"{label:<{width}}  ", style="bold")
            text.append(f"{value}\n", style=style)
        if self.error:
            text.append(self.error, style="red")
        header.update(text)
        counts = progress_fraction(run)
        bar = progress_bar(*counts, width=40) if counts else ""
        self.query_one("#run-progress", Static).update(Text(f"progress  {bar}  {progress_text(run)}"))

    # -- keys ----------------------------------------------------------------------------------

    def action_toggle_logs(self) -> None:
        self.logs_only = not self.logs_only
        self.query_one("#summary").display = not self.logs_only

    def action_timestamps(self) -> None:
        self.timestamps = not self.timestamps
        log = self.query_one("#logs", RichLog)
        log.clear()
        self.write_lines(self.logs.lines)

    def action_follow(self) -> None:
        log = self.query_one("#logs", RichLog)
        log.auto_scroll = not log.auto_scroll
        self.notify("following the log" if log.auto_scroll else "not following the log")
        if log.auto_scroll:
            log.scroll_end(animate=False)

    def action_cancel(self) -> None:
        if self.run is not None:
            self.dashboard.request_action("cancel", self.run)

    def action_resume(self) -> None:
        if self.run is not None:
            self.dashboard.request_action("resume", self.run)

    def action_help(self) -> None:
        self.dashboard.open(HelpScreen())

    def action_back(self) -> None:
        self.dismiss(None)


# --------------------------------------------------------------------------------------------
# The application


class DashboardApp(App[None]):
    TITLE = "Fabrik"
    CSS = """
    #status, #run-status { height: 1; background: $boost; padding: 0 1; }
    #status.degraded, #run-status.degraded { background: $warning 40%; }
    #runs { height: 1fr; }
    #filter { dock: bottom; margin-bottom: 1; }
    #summary { height: auto; max-height: 60%; }
    #run-header { height: auto; padding: 0 1; }
    #run-progress { height: 1; padding: 0 1; }
    #events { height: auto; max-height: 10; }
    .section { text-style: bold; padding: 0 1; background: $panel; width: 100%; }
    #logs { height: 1fr; }
    ConfirmScreen, HelpScreen, NewRunScreen { align: center middle; }
    #dialog { width: 90; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    #question { margin-bottom: 1; }
    #buttons { height: auto; margin-top: 1; }
    #buttons Button { margin-right: 2; }
    #form { width: 100; height: auto; max-height: 100%; border: thick $primary; background: $surface; }
    #form { padding: 0 2; }
    #form-title, #help-title { text-style: bold; margin-bottom: 1; }
    .field { height: 1; margin-top: 1; }
    .field-label { width: 14; }
    .field Input, .field Select { width: 1fr; }
    .field-error { color: $error; height: auto; display: none; padding-left: 14; }
    .field-error.shown { display: block; }
    .hint { color: $text-muted; margin-top: 1; }
    """

    def __init__(self, api: DashboardApi, *, initial_filter: str = "") -> None:
        super().__init__()
        self.api = api
        self.initial_filter = initial_filter
        self.caller: Caller | None = None
        self.caller_error = ""
        self.notices: list[str] = []
        """Every notification shown, oldest first."""
        self.submitted: list[str] = []
        """Runs started from the new-run form."""
        self.closing = False

    def open(self, screen: Screen[Any], callback: Callable[[Any], None] | None = None) -> None:
        """Show a screen, unless the dashboard is quitting (keys typed after `q`)."""
        if not self.closing:
            self.push_screen(screen, callback)

    def quit(self) -> None:
        self.closing = True
        self.exit()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """As Textual's, but never as markup: messages quote API answers and log text."""
        self.notices.append(f"{title}: {message}" if title else message)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def on_mount(self) -> None:
        self.runs_screen = RunsScreen(self.api, initial_filter=self.initial_filter)
        self.push_screen(self.runs_screen)
        self.load_caller()

    def load_caller(self) -> None:
        """Read the caller's roles (`GET /whoami`) in the background."""
        self.run_worker(self._load_caller(), group="caller", exclusive=True)

    async def _load_caller(self) -> None:
        try:
            data = await self.api.whoami()
            self.caller = Caller.from_whoami(data)
            self.caller_error = ""
        except CliError as exc:
            if not self.caller_error:
                self.show_error("cannot read who you are (the API refuses what you may not do)", exc)
            self.caller_error = exc.message
        except TypeError as exc:
            self.caller_error = str(exc)
            self.notify(str(exc), severity="warning")

    def caller_text(self) -> str:
        if self.caller is not None:
            return f"{self.caller.describe()} ({self.caller.roles_text()})"
        return "caller unknown" if self.caller_error else "caller: …"

    def show_error(self, what: str, exc: CliError) -> None:
        self.notify(f"{what}: {error_text(exc)}", severity="error", timeout=10)

    def request_action(self, action: Action, run: Mapping[str, Any]) -> None:
        """Cancel or resume `run` after a confirmation, or say why not."""
        run_id = str(run.get("run_id"))
        state = str(run.get("state"))
        project = run.get("project")
        if self.caller is not None:
            refusal = self.caller.refusal(action, project if isinstance(project, str) else None)
            if refusal is not None:
                self.notify(refusal, title=f"cannot {action}", severity="error", timeout=8)
                return
        if action == "cancel" and is_terminal(run):
            self.notify(f"run {run_id} has already finished ({state}): nothing to cancel", severity="warning")
            return
        if action == "resume" and str(run.get("requested_by") or "").startswith(IMPORTED_BY_PREFIX):
            self.notify(
                f"run {run_id} was imported: it has no workspace to resume from; submit a new run",
                severity="warning",
            )
            return
        if action == "resume" and state not in RESUMABLE:
            self.notify(
                f"run {run_id} is {state}: only a failed, timed-out or cancelled run can be resumed",
                severity="warning",
            )
            return
        if action == "cancel":
            question = f"Cancel run {run_id} ({run.get('project')}, {state})?"
        else:
            question = (
                f"Resume run {run_id} ({run.get('project')}, {state})?\n"
                f"Attempt {int(run.get('attempt') or 0) + 1} continues in the same workspace."
            )

        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self.run_worker(self._send(action, run_id), group="actions")

        self.open(ConfirmScreen(question), answered)

    async def _send(self, action: Action, run_id: str) -> None:
        send: Callable[[str], Any] = self.api.cancel if action == "cancel" else self.api.resume
        try:
            await send(run_id)
        except CliError as exc:
            self.show_error(f"{action} {run_id}", exc)
            return
        self.notify(f"{action} requested for run {run_id}")

    def open_new_run(self, runs: RunsScreen) -> None:
        if self.caller is not None and not self.caller.may_anywhere("submit"):
            self.notify(
                f"{self.caller.describe()} has {self.caller.roles_text()}: "
                "starting runs takes the developer role",
                severity="error",
            )
            return

        def submitted(run: Mapping[str, Any] | None) -> None:
            if run is None:
                return
            run_id = str(run.get("run_id"))
            self.submitted.append(run_id)
            runs.store.upsert(run)
            runs.select_run(run_id)
            self.notify(f"run {run_id} submitted ({run.get('project')})")

        self.open(NewRunScreen(self.api, self.caller), submitted)
