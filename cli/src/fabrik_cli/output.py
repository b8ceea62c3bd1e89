"""Rendering of API answers: `-o json` (the API's JSON as it came), `-o yaml`, and `-o table`
(aligned columns and key/value blocks for people). Plain functions of decoded JSON; no click.

The table renderers are tolerant: a field the API does not send shows as `-`, never a crash.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import yaml

from fabrik_common.events import TERMINAL_STATES

NONE = "-"


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


FORMATS: tuple[str, ...] = tuple(f.value for f in OutputFormat)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def dump_yaml(data: Any) -> str:
    dumped: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return dumped.rstrip("\n")


def dump(data: Any, fmt: OutputFormat) -> str:
    """json or yaml of `data`; table output is the caller's own renderer."""
    if fmt is OutputFormat.YAML:
        return dump_yaml(data)
    return dump_json(data)


# --------------------------------------------------------------------------------------------
# Tables


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    body = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row[: len(widths)]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *body]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_fields(pairs: Sequence[tuple[str, str]]) -> str:
    """A key/value block: keys left-aligned in one column."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}".rstrip() for key, value in pairs)


def _cell(value: str) -> str:
    return " ".join(str(value).split()) or NONE


# --------------------------------------------------------------------------------------------
# Values


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_duration(seconds: float) -> str:
    """`850ms`, `42s`, `3m 07s`, `2h 05m`, `3d 4h`."""
    if seconds < 0:
        seconds = 0
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def format_relative(when: datetime, now: datetime) -> str:
    delta = (now - when).total_seconds()
    if abs(delta) < 1:
        return "now"
    amount = format_duration(abs(delta)).split(" ")[0]
    return f"{amount} ago" if delta > 0 else f"in {amount}"


def format_time(value: Any, now: datetime, *, relative: bool = True) -> str:
    when = parse_time(value)
    if when is None:
        return NONE if value in (None, "") else str(value)
    local = when.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return f"{local} ({format_relative(when, now)})" if relative else local


def format_age(value: Any, now: datetime) -> str:
    when = parse_time(value)
    return format_relative(when, now) if when is not None else NONE


def format_cost(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"${value:.4f}" if value < 1 else f"${value:,.2f}"
    return NONE


def format_count(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return NONE if value is None else str(value)


def text(value: Any) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_labels(labels: Any) -> str:
    if isinstance(labels, Mapping) and labels:
        return ", ".join(f"{k}={v}" for k, v in labels.items())
    return NONE


def progress_bar(finished: int, total: int, width: int = 20) -> str:
    """`[#########-----------]  45%`."""
    fraction = min(max(finished / total, 0.0), 1.0) if total > 0 else 0.0
    filled = math.floor(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}%"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def format_progress(progress: Any, *, bar: bool = True) -> str:
    """`[####------]  40%  4/10  implement · 16:impl · message`, or `-` without any progress."""
    if not isinstance(progress, Mapping):
        return NONE
    finished, total = _int(progress.get("finished")), _int(progress.get("total"))
    parts: list[str] = []
    if finished is not None and total:
        if bar:
            parts.append(progress_bar(finished, total))
        parts.append(f"{finished}/{total}")
    elif finished is not None:
        parts.append(str(finished))
    words = [str(progress[k]) for k in ("phase", "task", "message") if progress.get(k)]
    if words:
        parts.append(" · ".join(words))
    return "  ".join(parts) or NONE


def format_short_progress(progress: Any) -> str:
    """For list rows: `4/10 (40%)` or the phase."""
    if not isinstance(progress, Mapping):
        return NONE
    finished, total = _int(progress.get("finished")), _int(progress.get("total"))
    if finished is not None and total:
        return f"{finished}/{total} ({min(finished / total, 1.0) * 100:.0f}%)"
    return text(progress.get("phase"))


def format_state(run: Mapping[str, Any]) -> str:
    state = text(run.get("state"))
    reason = run.get("reason")
    shown = f"{state}: {reason}" if reason else state
    health = run.get("health")
    if isinstance(health, Mapping) and health.get("state") not in (None, "healthy"):
        shown += f" [{health['state']}]"
    return shown


def format_eta(value: Any, now: datetime) -> str:
    """An ETA given as a time (`2026-...`) or as seconds from now; `null` is unknown."""
    if value is None:
        return "unknown"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "now" if value <= 0 else f"in ~{format_duration(value)}"
    when = parse_time(value)
    if when is None:
        return str(value)
    if when <= now:
        return "now"
    return f"~{when.astimezone().strftime('%H:%M:%S')} (in {format_duration((when - now).total_seconds())})"


def _ahead_count(queue: Mapping[str, Any]) -> int | None:
    count = _int(queue.get("ahead_count"))
    if count is not None:
        return count
    ahead = queue.get("ahead")
    if isinstance(ahead, list):
        position = _int(queue.get("position"))
        return max(position - 1, len(ahead)) if position is not None else len(ahead)
    return _int(ahead)


def format_queue(queue: Any, now: datetime) -> str:
    if not isinstance(queue, Mapping) or not queue:
        return NONE
    parts = []
    position = _int(queue.get("position"))
    if position is None:
        return "not placed by the scheduler yet"
    parts.append(f"position {position}")
    ahead = _ahead_count(queue)
    if ahead is not None:
        parts.append(f"{ahead} run{'s' if ahead != 1 else ''} ahead")
    eta = queue.get("eta", queue.get("eta_seconds"))
    parts.append(f"estimated start {format_eta(eta, now)}")
    return ", ".join(parts)


def run_duration(run: Mapping[str, Any], now: datetime) -> str:
    started = parse_time(run.get("started_at"))
    if started is None:
        return NONE
    finished = parse_time(run.get("finished_at"))
    if finished is None:
        if run.get("state") in TERMINAL_STATES:
            return NONE
        return f"{format_duration((now - started).total_seconds())} (so far)"
    return format_duration((finished - started).total_seconds())


def format_tokens(tokens: Any) -> str:
    if not isinstance(tokens, Mapping):
        return NONE
    parts = [f"{format_count(tokens.get('input', 0))} in", f"{format_count(tokens.get('output', 0))} out"]
    for key, word in (("cache_read", "cache read"), ("cache_write", "cache write")):
        if tokens.get(key):
            parts.append(f"{format_count(tokens[key])} {word}")
    return " / ".join(parts)


# --------------------------------------------------------------------------------------------
# Runs


def run_detail(run: Mapping[str, Any], now: datetime | None = None) -> str:
    """`fabrik runs show`: one run as a key/value block."""
    now = now or datetime.now(UTC)
    state = text(run.get("state"))
    pairs: list[tuple[str, str]] = [
        ("run", text(run.get("run_id"))),
        ("project", text(run.get("project"))),
        ("env", text(run.get("env"))),
    ]
    if run.get("spec_id"):
        pairs.append(("spec", text(run.get("spec_id"))))
    pairs += [
        ("state", state),
        ("reason", text(run.get("reason"))),
    ]
    if run.get("message"):
        pairs.append(("message", text(run.get("message"))))
    pairs.append(("attempt", text(run.get("attempt"))))
    if state == "queued" or run.get("queue"):
        pairs.append(("queue", format_queue(run.get("queue"), now)))
    pairs += [
        ("progress", format_progress(run.get("progress"))),
        ("created", format_time(run.get("created_at"), now)),
        ("started", format_time(run.get("started_at"), now)),
        ("finished", format_time(run.get("finished_at"), now)),
        ("duration", run_duration(run, now)),
        ("exit code", text(run.get("exit_code"))),
        ("cost", format_cost(run.get("cost_usd"))),
        ("tokens", format_tokens(run.get("tokens"))),
        ("labels", format_labels(run.get("labels"))),
    ]
    if "priority" in run:
        pairs.append(("priority", text(run.get("priority"))))
    if isinstance(run.get("resources"), Mapping):
        pairs.append(("resources", format_resources(run["resources"], run.get("template"))))
    if run.get("timeout_seconds") is not None:
        pairs.append(("timeout", _seconds(run["timeout_seconds"])))
    if run.get("budget_usd") is not None:
        pairs.append(("budget", format_cost(run["budget_usd"])))
    if run.get("image_digest"):
        pairs.append(("image", text(run["image_digest"])))
    if run.get("requested_by"):
        pairs.append(("requested by", text(run["requested_by"])))
    return render_fields(pairs)


def _seconds(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(value)
    return text(value)


def format_resources(resources: Mapping[str, Any], template: Any = None) -> str:
    """`cpu 500m, memory 1Gi requested; limits 2 / 4Gi (template default)`."""
    requested = f"cpu {text(resources.get('cpu_request'))}, memory {text(resources.get('memory_request'))}"
    limits = f"{text(resources.get('cpu_limit'))} / {text(resources.get('memory_limit'))}"
    suffix = f" (template {template})" if template else ""
    return f"{requested} requested; limits {limits}{suffix}"


RUN_COLUMNS = ("RUN ID", "PROJECT", "ENV", "STATE", "ATTEMPT", "PROGRESS", "CREATED", "DURATION", "COST")


def run_row(run: Mapping[str, Any], now: datetime) -> list[str]:
    return [
        text(run.get("run_id")),
        text(run.get("project")),
        text(run.get("env")),
        format_state(run),
        text(run.get("attempt")),
        format_short_progress(run.get("progress")),
        format_age(run.get("created_at"), now),
        run_duration(run, now).removesuffix(" (so far)"),
        format_cost(run.get("cost_usd")),
    ]


def runs_table(runs: Iterable[Mapping[str, Any]], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return render_table(RUN_COLUMNS, (run_row(r, now) for r in runs))


def run_summary(run: Mapping[str, Any], now: datetime | None = None) -> str:
    """One line for the end of `fabrik run --wait`: the final state, reason and exit code."""
    now = now or datetime.now(UTC)
    parts = [f"run {text(run.get('run_id'))} {text(run.get('state'))}"]
    details = []
    if run.get("reason"):
        details.append(f"reason: {run['reason']}")
    if run.get("exit_code") is not None:
        details.append(f"exit code {run['exit_code']}")
    duration = run_duration(run, now)
    if duration != NONE:
        details.append(f"after {duration}")
    if _int(run.get("attempt")) not in (None, 1):
        details.append(f"attempt {run['attempt']}")
    if details:
        parts.append("(" + ", ".join(details) + ")")
    if run.get("message"):
        parts.append(f"- {run['message']}")
    return " ".join(parts)


def run_status_line(run: Mapping[str, Any], now: datetime | None = None) -> str:
    """One line per change while waiting: `queued: position 3, 2 runs ahead, ...`."""
    now = now or datetime.now(UTC)
    state = text(run.get("state"))
    if state == "queued" and isinstance(run.get("queue"), Mapping):
        return f"queued: {format_queue(run['queue'], now)}"
    progress = format_progress(run.get("progress"), bar=False)
    line = format_state(run)
    return line if progress == NONE else f"{line}: {progress}"


# --------------------------------------------------------------------------------------------
# Queue, events, projects


QUEUE_COLUMNS = ("POS", "RUN ID", "PROJECT", "PRIORITY", "AHEAD", "ETA")


def queue_items(data: Any) -> list[Mapping[str, Any]]:
    items = data.get("items", data.get("entries")) if isinstance(data, Mapping) else data
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def queue_table(data: Any, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    rows = []
    for index, item in enumerate(queue_items(data), start=1):
        position = _int(item.get("position")) or index
        ahead = _ahead_count(item)
        rows.append(
            [
                str(position),
                text(item.get("run_id")),
                text(item.get("project")),
                text(item.get("priority")),
                str(ahead if ahead is not None else position - 1),
                format_eta(item.get("eta", item.get("eta_seconds")), now),
            ]
        )
    parts = [render_table(QUEUE_COLUMNS, rows) if rows else "the queue is empty"]
    summary = _queue_summary(data, len(rows))
    if summary:
        parts.append(summary)
    usage = usage_table(data)
    if usage:
        parts.append(usage)
    return "\n\n".join(parts)


def format_bytes(value: float) -> str:
    for unit, size in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if value >= size:
            return f"{value / size:.4g}{unit}"
    return f"{value:.0f}"


def _amount(key: str, value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return NONE
    if key == "memory":
        return format_bytes(value)
    return f"{value:g}"


USAGE_KEYS = ("runs", "cpu", "memory")


def usage_table(data: Any) -> str:
    """Resources held (starting, running, cancelling runs) against the limits, per project."""
    if not isinstance(data, Mapping):
        return ""
    raw_usage, raw_limits = data.get("usage"), data.get("limits")
    usage: Mapping[str, Any] = raw_usage if isinstance(raw_usage, Mapping) else {}
    limits: Mapping[str, Any] = raw_limits if isinstance(raw_limits, Mapping) else {}
    if not usage and not limits:
        return ""
    rows = []
    totals: dict[str, float] = {
        k: math.fsum(float(u.get(k) or 0) for u in usage.values() if isinstance(u, Mapping))
        for k in USAGE_KEYS
    }
    names = ["cluster", *sorted({*usage, *limits} - {"cluster"})]
    for name in names:
        used = totals if name == "cluster" else usage.get(name, {})
        limit = limits.get(name, {})
        cells = [name]
        for key in USAGE_KEYS:
            u = used.get(key, 0) if isinstance(used, Mapping) else 0
            lim = limit.get(key) if isinstance(limit, Mapping) else None
            cells.append(f"{_amount(key, u)}/{_amount(key, lim)}" if lim is not None else _amount(key, u))
        rows.append(cells)
    return render_table(("IN USE / LIMIT", "RUNS", "CPU", "MEMORY"), rows)


def _queue_summary(data: Any, shown: int) -> str:
    if not isinstance(data, Mapping):
        return ""
    parts = []
    total = _int(data.get("total"))
    if total is not None:
        parts.append(f"{total} queued" + (f" (first {shown} shown)" if total > shown else ""))
    running = _int(data.get("running"))
    if running is not None:
        parts.append(f"{running} running")
    taken = parse_time(data.get("taken_at") or data.get("updated_at"))
    if taken is not None:
        parts.append(f"as of {taken.astimezone().strftime('%H:%M:%S')}")
    return ", ".join(parts)


EVENT_COLUMNS = ("TIME", "TYPE", "ATTEMPT", "DETAILS")
_EVENT_SKIP = frozenset(
    {"type", "event_id", "occurred_at", "schema_version", "run_id", "attempt", "params", "revision"}
)


def events_items(data: Any) -> list[Mapping[str, Any]]:
    return queue_items(data)


def _event_body(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """An events item is `{seq, subject, type, event: {...}}`; older shapes are the event itself."""
    body = item.get("event")
    return body if isinstance(body, Mapping) else item


def _event_details(event: Mapping[str, Any]) -> str:
    fields = {k: v for k, v in event.items() if k not in _EVENT_SKIP and v not in (None, "", {}, [])}
    parts = []
    if "to_state" in fields:  # a transition: `queued -> starting`
        parts.append(f"{fields.pop('from_state', None) or '(new)'} -> {fields.pop('to_state')}")
        fields.pop("project", None)
    if isinstance(fields.get("result"), Mapping | list):
        fields["result"] = json.dumps(fields["result"], separators=(",", ":"))
    parts.extend(f"{k}={v}" for k, v in fields.items())
    return ", ".join(parts)


def events_table(data: Any) -> str:
    rows = []
    for item in events_items(data):
        event = _event_body(item)
        when = parse_time(event.get("occurred_at"))
        details = _event_details(event)
        rows.append(
            [
                when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else NONE,
                text(item.get("type") or event.get("type")),
                text(event.get("attempt")),
                details,
            ]
        )
    return render_table(EVENT_COLUMNS, rows)


PROJECT_COLUMNS = ("PROJECT", "RUNS", "STATES")


def projects_table(data: Any) -> str:
    rows = []
    for item in queue_items(data):
        states = item.get("states")
        by_state = (
            ", ".join(f"{k} {v}" for k, v in states.items() if v) if isinstance(states, Mapping) else NONE
        )
        rows.append([text(item.get("project")), format_count(item.get("total")), by_state])
    return render_table(PROJECT_COLUMNS, rows)


def generic_table(items: Sequence[Mapping[str, Any]]) -> str:
    """Columns from the keys of the items (scalars only), for lists without a dedicated layout."""
    keys: list[str] = []
    for item in items:
        for key, value in item.items():
            if key not in keys and not isinstance(value, Mapping | list):
                keys.append(key)
    rows = [[text(item.get(k)) for k in keys] for item in items]
    return render_table([k.upper().replace("_", " ") for k in keys], rows)


# --------------------------------------------------------------------------------------------
# Logs


def iter_log_entries(data: Any) -> Iterator[Mapping[str, Any] | str]:
    """The lines of a logs answer, whatever the nesting: a list of lines, `{lines: [...]}`,
    `{items: [...]}`, or chunks with their own `lines`."""
    if isinstance(data, str):
        yield from data.splitlines()
        return
    if isinstance(data, Mapping):
        for key in ("lines", "items", "chunks"):
            if isinstance(data.get(key), list):
                yield from iter_log_entries(data[key])
                return
        if "text" in data:
            yield data
        return
    if isinstance(data, list):
        for item in data:
            if isinstance(item, Mapping) and isinstance(item.get("lines"), list):
                yield from iter_log_entries(item["lines"])
            elif isinstance(item, Mapping | str):
                yield item


def format_log_entry(entry: Mapping[str, Any] | str, *, timestamps: bool = False) -> str:
    if isinstance(entry, str):
        return entry
    body = str(entry.get("text", ""))
    if entry.get("stream") == "system":
        body = f"[fabrik] {body}"
    if timestamps:
        when = parse_time(entry.get("ts"))
        stamp = when.astimezone().isoformat(timespec="milliseconds") if when else NONE
        body = f"{stamp} {body}"
    return body


# --------------------------------------------------------------------------------------------
# Access: the caller, API tokens, the audit trail


def format_roles(role: Any, project_roles: Any) -> str:
    """`admin (every project)`, `developer in demo, viewer in web`, or both."""
    parts = []
    if role:
        parts.append(f"{role} (every project)")
    if isinstance(project_roles, Mapping):
        parts.extend(f"{r} in {p}" for p, r in sorted(project_roles.items()))
    return ", ".join(parts) or "none"


def whoami_detail(data: Any, *, api: str = "", credential: str = "") -> str:
    """`fabrik whoami` (and `fabrik login`): the caller as a key/value block."""
    me: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    pairs: list[tuple[str, str]] = [("subject", text(me.get("subject")))]
    if me.get("name"):
        pairs.append(("name", text(me["name"])))
    pairs += [
        ("kind", text(me.get("kind"))),
        ("authenticated", text(me.get("authenticated"))),
        ("roles", format_roles(me.get("role"), me.get("project_roles"))),
    ]
    if me.get("token_id"):
        pairs.append(("token id", text(me["token_id"])))
    if api:
        pairs.append(("api", api))
    if credential:
        pairs.append(("credential", credential))
    return render_fields(pairs)


def token_status(token: Mapping[str, Any], now: datetime) -> str:
    if token.get("revoked_at"):
        return "revoked"
    expires = parse_time(token.get("expires_at"))
    if expires is not None and expires <= now:
        return "expired"
    return "active"


def format_projects(projects: Any) -> str:
    if isinstance(projects, list) and projects:
        return ",".join(str(p) for p in projects)
    return "all"


TOKEN_COLUMNS = ("TOKEN ID", "NAME", "ROLE", "PROJECTS", "STATUS", "CREATED", "EXPIRES", "LAST USED", "BY")


def tokens_table(data: Any, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    rows = []
    for token in queue_items(data):
        expires = parse_time(token.get("expires_at"))
        rows.append(
            [
                text(token.get("token_id")),
                text(token.get("name")),
                text(token.get("role")),
                format_projects(token.get("projects")),
                token_status(token, now),
                format_age(token.get("created_at"), now),
                "never" if expires is None else format_relative(expires, now),
                format_age(token.get("last_used_at"), now) if token.get("last_used_at") else "never",
                text(token.get("created_by")),
            ]
        )
    if not rows:
        return "no API tokens"
    return render_table(TOKEN_COLUMNS, rows)


def token_detail(token: Mapping[str, Any], now: datetime | None = None) -> str:
    """`fabrik token show|revoke`: one token (never its secret) as a key/value block."""
    now = now or datetime.now(UTC)
    pairs: list[tuple[str, str]] = [
        ("token id", text(token.get("token_id"))),
        ("name", text(token.get("name"))),
        ("role", text(token.get("role"))),
        ("projects", format_projects(token.get("projects"))),
        ("status", token_status(token, now)),
        ("created", format_time(token.get("created_at"), now)),
        ("created by", text(token.get("created_by"))),
        ("expires", format_time(token.get("expires_at"), now) if token.get("expires_at") else "never"),
        ("last used", format_time(token.get("last_used_at"), now) if token.get("last_used_at") else "never"),
    ]
    if token.get("revoked_at"):
        pairs += [
            ("revoked", format_time(token.get("revoked_at"), now)),
            ("revoked by", text(token.get("revoked_by"))),
        ]
    return render_fields(pairs)


AUDIT_COLUMNS = ("TIME", "ACTOR", "ROLE", "ACTION", "TARGET", "PROJECT", "RESULT", "DETAILS")


def _audit_details(details: Any) -> str:
    if not isinstance(details, Mapping):
        return NONE
    parts = []
    for key, value in details.items():
        if value in (None, "", {}, []):
            continue
        shown = json.dumps(value, separators=(",", ":")) if isinstance(value, Mapping | list) else value
        parts.append(f"{key}={shown}")
    return ", ".join(parts) or NONE


def audit_table(data: Any) -> str:
    rows = []
    for item in queue_items(data):
        when = parse_time(item.get("occurred_at"))
        rows.append(
            [
                when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else NONE,
                text(item.get("actor")),
                text(item.get("role")),
                text(item.get("action")),
                text(item.get("target")),
                text(item.get("project")),
                text(item.get("result")),
                _audit_details(item.get("details")),
            ]
        )
    if not rows:
        return "no matching audit events"
    return render_table(AUDIT_COLUMNS, rows)


# --------------------------------------------------------------------------------------------
# Costs, budgets, run analytics (the API's money is exact decimal strings in USD: shown as they are)


def format_money(value: Any) -> str:
    """`$0.265100005`: the API's exact decimal string with a dollar sign (never rounded)."""
    if isinstance(value, str) and value:
        return f"${value}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"${format_number(value)}"
    return NONE


def format_number(value: Any) -> str:
    """A plain number without float noise or exponents: `10`, `0.5`, `1000000000000`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NONE if value is None else str(value)
    return format(Decimal(repr(value)).normalize(), "f")


def format_percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NONE
    return f"{value * 100:.1f}%"


def _interval(row: Mapping[str, Any]) -> str:
    low, high = row.get("ci95_low"), row.get("ci95_high")
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        return NONE
    return f"{low * 100:.0f}-{high * 100:.0f}%"


COST_COLUMNS = ("LLM", "COMPUTE", "STORAGE", "TOTAL", "TOKENS", "CALLS", "RUNS")
COST_CSV_COLUMNS = (
    "llm_cost_usd",
    "compute_cost_usd",
    "storage_cost_usd",
    "total_cost_usd",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "tokens",
    "calls",
    "runs",
    "compute_runs",
)


def _cost_rows(data: Any) -> list[Mapping[str, Any]]:
    rows = data.get("rows") if isinstance(data, Mapping) else None
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def _group_by(data: Any) -> str:
    group = data.get("group_by") if isinstance(data, Mapping) else None
    return str(group) if group else "group"


def _group_name(value: Any) -> str:
    return "(none)" if value is None else str(value)


def costs_table(data: Any) -> str:
    """`fabrik cost show`: one row per group, most expensive first, then the totals."""
    rows = _cost_rows(data)
    if not rows:
        return "no costs recorded for these filters"
    body = [
        [
            _group_name(row.get("group")),
            format_money(row.get("llm_cost_usd")),
            format_money(row.get("compute_cost_usd")),
            format_money(row.get("storage_cost_usd")),
            format_money(row.get("total_cost_usd")),
            format_count(row.get("tokens")),
            format_count(row.get("calls")),
            format_count(row.get("runs")),
        ]
        for row in rows
    ]
    totals = data.get("totals") if isinstance(data, Mapping) else None
    if isinstance(totals, Mapping):

        def total(key: str) -> str:
            values = [r.get(key) for r in rows]
            return format_count(sum(v for v in values if isinstance(v, int) and not isinstance(v, bool)))

        body.append(
            [
                "TOTAL",
                format_money(totals.get("llm_cost_usd")),
                format_money(totals.get("compute_cost_usd")),
                format_money(totals.get("storage_cost_usd")),
                format_money(totals.get("total_cost_usd")),
                total("tokens"),
                total("calls"),
                # A run may fall in several groups (its models, its days): add up only by project.
                total("runs") if _group_by(data) == "project" else NONE,
            ]
        )
    table = render_table((_group_by(data).upper(), *COST_COLUMNS), body)
    projects = data.get("projects") if isinstance(data, Mapping) else None
    if isinstance(projects, list):
        table += "\n\n(only project(s) " + ", ".join(str(p) for p in projects) + ")"
    return table


def costs_csv(data: Any) -> str:
    """`fabrik cost export --csv`: a header row, then one row per group with the API's exact
    amounts (no `$`, no rounding); a missing amount (compute and storage by model) is empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow((_group_by(data), *COST_CSV_COLUMNS))
    for row in _cost_rows(data):
        group = row.get("group")
        writer.writerow(
            [
                "" if group is None else group,
                *("" if row.get(k) is None else row.get(k) for k in COST_CSV_COLUMNS),
            ]
        )
    return buffer.getvalue()


BUDGET_COLUMNS = ("BUDGET", "KIND", "SPENT", "LIMIT", "USED", "PROJECTED", "LEVEL")


def _budget_name(budget: Mapping[str, Any]) -> str:
    return "global" if budget.get("scope") == "global" else text(budget.get("project"))


def _budget_level(budget: Mapping[str, Any], line: Mapping[str, Any]) -> str:
    level = text(line.get("level"))
    if line.get("kind") == "llm" and budget.get("blocked"):
        level += " (blocked)"
    return level


def _budget_lines(budget: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [line for kind in ("llm", "compute") if isinstance(line := budget.get(kind), Mapping)]


def budgets_table(data: Any) -> str:
    """`fabrik budget status`: per budget, its LLM line and its compute (and storage) line."""
    budgets = data.get("budgets") if isinstance(data, Mapping) else None
    items = [b for b in budgets if isinstance(b, Mapping)] if isinstance(budgets, list) else []
    period = text(data.get("period")) if isinstance(data, Mapping) else NONE
    if not items:
        return f"no budgets ({period})"
    rows = [
        [
            _budget_name(budget),
            text(line.get("kind")),
            format_money(line.get("spent_usd")),
            format_money(line.get("limit_usd")),
            format_percent(line.get("used")),
            format_money(line.get("projected_usd")),
            _budget_level(budget, line),
        ]
        for budget in items
        for line in _budget_lines(budget)
    ]
    elapsed = items[0].get("elapsed_fraction")
    return f"period {period} ({format_percent(elapsed)} elapsed)\n\n" + render_table(BUDGET_COLUMNS, rows)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def budget_set_summary(data: Any) -> str:
    """`fabrik budget set`: what is stored now, and where this month stands against it."""
    result: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    definition, status = _mapping(result.get("definition")), _mapping(result.get("status"))
    name = (
        "the global budget" if status.get("scope") == "global" else f"the budget of {status.get('project')}"
    )
    llm, compute = definition.get("llm_usd_per_month"), definition.get("compute_usd_per_month")
    if llm is None and compute is None:
        return f"{name} is removed"
    limits = ", ".join(
        f"{label} {format_money(limit)}/month" if limit is not None else f"{label} no limit"
        for label, limit in (("LLM", llm), ("compute", compute))
    )
    lines = [f"{name}: {limits}; warning at {format_percent(definition.get('warning'))}"]
    for line in _budget_lines(status):
        if line.get("limit_usd") is None:
            continue
        lines.append(
            f"  {status.get('period')} {line.get('kind')}: spent {format_money(line.get('spent_usd'))} "
            f"({format_percent(line.get('used'))}), projected {format_money(line.get('projected_usd'))}, "
            f"level {_budget_level(status, line)}"
        )
    return "\n".join(lines)


def _section(title: str, headers: Sequence[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"{title}: {empty}"
    return render_table((title, *headers), rows)


def _seconds_text(value: Any) -> str:
    return format_duration(float(value)) if isinstance(value, int | float) else NONE


def _bytes_text(value: Any) -> str:
    return format_bytes(float(value)) if isinstance(value, int | float) else NONE


def _rows_of(data: Mapping[str, Any], key: str, by: str | None = None) -> list[Mapping[str, Any]]:
    value = data.get(key)
    if by is not None:
        value = value.get(by) if isinstance(value, Mapping) else None
    return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []


def insights_report(data: Any) -> str:
    """`fabrik analytics insights`: one table per insight, each with its sample sizes."""
    found: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    min_runs = found.get("min_runs")
    small = f"no group with at least {min_runs} run(s)"
    where = f"project {found['project']}" if found.get("project") else "every project"
    parts = [
        f"{where}: {format_count(found.get('runs'))} run(s), {format_count(found.get('decided_runs'))} "
        f"decided; groups under {min_runs} decided run(s) are left out"
    ]
    for by in ("model", "spec", "project"):
        rows = [
            [
                text(r.get("group")),
                format_count(r.get("runs")),
                format_count(r.get("successes")),
                format_percent(r.get("success_rate")),
                _interval(r),
            ]
            for r in _rows_of(found, "success_rate", by)
        ]
        parts.append(
            _section(f"SUCCESS RATE BY {by.upper()}", ("RUNS", "SUCCESSES", "RATE", "95% CI"), rows, small)
        )
    for by in ("model", "spec", "project"):
        rows = [
            [
                text(r.get("group")),
                format_count(r.get("runs")),
                _seconds_text(r.get("run_seconds_p95")),
                _seconds_text(r.get("queue_seconds_p95")),
            ]
            for r in _rows_of(found, "durations_p95", by)
        ]
        parts.append(_section(f"P95 DURATION BY {by.upper()}", ("RUNS", "RUN", "QUEUE"), rows, small))
    oom = [
        [
            text(r.get("spec")),
            text(r.get("memory_limit")),
            format_count(r.get("runs")),
            format_count(r.get("oom_kills")),
            format_percent(r.get("oom_rate")),
            _interval(r),
            _bytes_text(r.get("peak_p95_bytes")),
            text(r.get("suggested_limit")),
        ]
        for r in _rows_of(found, "oom")
    ]
    parts.append(
        _section(
            "OOM BY SPEC",
            ("MEMORY LIMIT", "RUNS", "KILLS", "RATE", "95% CI", "PEAK P95", "SUGGESTED"),
            oom,
            small,
        )
    )
    for by in ("spec", "project"):
        rows = [
            [
                text(r.get("group")),
                format_count(r.get("runs")),
                format_count(r.get("successes")),
                format_money(r.get("total_cost_usd")),
                format_money(r.get("cost_per_success_usd")),
            ]
            for r in _rows_of(found, "cost_per_success", by)
        ]
        parts.append(
            _section(
                f"COST PER SUCCESS BY {by.upper()}",
                ("RUNS", "SUCCESSES", "TOTAL", "PER SUCCESS"),
                rows,
                small,
            )
        )
    retried = [
        [
            text(r.get("run_id")),
            text(r.get("project")),
            text(r.get("spec")),
            format_count(r.get("attempts")),
            text(r.get("state")),
            text(r.get("reason")),
        ]
        for r in _rows_of(found, "most_retried")
    ]
    parts.append(
        _section(
            f"MOST RETRIED ({format_count(found.get('retried_runs'))} retried)",
            ("PROJECT", "SPEC", "ATTEMPTS", "STATE", "REASON"),
            retried,
            "no run needed more than one attempt",
        )
    )
    failing = [
        [
            text(r.get("spec")),
            format_count(r.get("runs")),
            format_count(r.get("failures")),
            format_percent(r.get("failure_rate")),
            _interval(r),
            ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
            if isinstance(r.get("reasons"), Mapping)
            else NONE,
        ]
        for r in _rows_of(found, "failing_specs")
    ]
    parts.append(
        _section(
            "FAILING SPECS", ("RUNS", "FAILURES", "RATE", "95% CI", "REASONS"), failing, "no failing spec"
        )
    )
    return "\n\n".join(parts)


def rebuild_summary(data: Any) -> str:
    result: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    seconds = result.get("seconds")
    took = format_duration(float(seconds)) if isinstance(seconds, int | float) else NONE
    return (
        f"rebuilt the analytics store in {took}: {format_count(result.get('runs'))} run(s) and "
        f"{format_count(result.get('llm_calls'))} LLM call(s) from {format_count(result.get('run_events'))} "
        f"run event(s) and {format_count(result.get('usage_events'))} usage event(s)"
    )
