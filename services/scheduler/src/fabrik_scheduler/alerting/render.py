"""What an alert message says, per channel kind: Slack text, a webhook's JSON body, an e-mail."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any, Literal
from urllib.parse import quote

import msgspec

from fabrik_common.events import AlertRaised

NoticeKind = Literal["raised", "escalated", "realert", "resolved"]

_SEVERITY_MARK = {"info": "\N{INFORMATION SOURCE}\ufe0f", "warning": "⚠️", "critical": "🚨"}


@dataclass(frozen=True)
class Notice:
    """One message to one channel about one episode."""

    delivery_id: str
    """Stable across retries and failover: receivers can de-duplicate on it."""
    kind: NoticeKind
    episode: int
    alert: AlertRaised
    opened_at: datetime
    created_at: datetime
    repeat: int = 0
    """For a re-alert: how many times it has been repeated (1 = first repeat)."""
    resolved_message: str = ""
    resolved_at: datetime | None = None
    dashboard_url: str | None = None
    subject: dict[str, Any] | None = None
    """The run or schedule the alert concerns, as stored (when it could be read)."""


def dashboard_link(alert: AlertRaised, base_url: str) -> str | None:
    """The alert's own link, else the dashboard page of what it concerns (None without a base)."""
    if alert.link:
        return alert.link
    if not base_url:
        return None
    base = base_url.rstrip("/")
    entity = quote(alert.entity_id or "", safe="")
    if alert.entity_kind == "run" and entity:
        return f"{base}/runs/{entity}"
    if alert.entity_kind == "schedule" and entity:
        return f"{base}/schedules#{entity}"
    if alert.labels.get("kind") == "budget" or alert.key.startswith("budget."):
        return f"{base}/costs"
    return f"{base}/"


def duration(start: datetime, end: datetime) -> str:
    seconds = max(int((end - start).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"


def headline(notice: Notice) -> str:
    alert = notice.alert
    severity = alert.severity.upper()
    if notice.kind == "resolved":
        end = notice.resolved_at or notice.created_at
        # No parentheses: Python's e-mail folding would move such a subject to a line of its own.
        return f"Resolved: {alert.title} - open for {duration(notice.opened_at, end)}"
    if notice.kind == "realert":
        return (
            f"[{severity}] Still open: {alert.title} - "
            f"for {duration(notice.opened_at, notice.created_at)}, reminder {notice.repeat}"
        )
    if notice.kind == "escalated":
        return f"[{severity}] Escalated: {alert.title}"
    return f"[{severity}] {alert.title}"


def _context(alert: AlertRaised) -> str:
    parts = [f"source {alert.source}"]
    if alert.project:
        parts.append(f"project {alert.project}")
    if alert.entity_kind and alert.entity_id:
        parts.append(f"{alert.entity_kind} {alert.entity_id}")
    return " · ".join(parts)


def slack_text(notice: Notice) -> str:
    """Slack mrkdwn: a mark, the headline in bold, the message, the context and the link."""
    mark = "✅" if notice.kind == "resolved" else _SEVERITY_MARK.get(notice.alert.severity, "")
    lines = [f"{mark} *{_slack_escape(headline(notice))}*"]
    message = notice.resolved_message if notice.kind == "resolved" else notice.alert.message
    if message:
        lines.append(_slack_escape(message))
    lines.append(f"_{_slack_escape(_context(notice.alert))}_")
    if notice.dashboard_url:
        lines.append(f"<{notice.dashboard_url}|Open in Fabrik>")
    return "\n".join(lines)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_body(notice: Notice) -> dict[str, Any]:
    """The generic webhook's JSON: what happened, the alert, what it concerns, a dashboard link."""
    alert = msgspec.to_builtins(notice.alert)
    body: dict[str, Any] = {
        "event": f"alert.{notice.kind}",
        "delivery_id": notice.delivery_id,
        "episode": notice.episode,
        "key": notice.alert.key,
        "severity": notice.alert.severity,
        "title": headline(notice),
        "status": "resolved" if notice.kind == "resolved" else "open",
        "opened_at": notice.opened_at.isoformat(),
        "sent_at": notice.created_at.isoformat(),
        "repeat": notice.repeat,
        "alert": alert,
        "dashboard_url": notice.dashboard_url,
    }
    if notice.kind == "resolved":
        body["resolved"] = {
            "at": (notice.resolved_at or notice.created_at).isoformat(),
            "message": notice.resolved_message,
        }
    if notice.alert.entity_kind in ("run", "schedule"):
        body[notice.alert.entity_kind] = notice.subject
    return body


def email_message(notice: Notice, sender: str, recipients: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = f"[Fabrik] {headline(notice)}"
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(notice.created_at)
    domain = parseaddr(sender)[1].rpartition("@")[2] or "fabrik.invalid"
    # Stable per delivery: a message sent again after a failover carries the same id.
    message["Message-ID"] = f"<{notice.delivery_id}@{domain}>"
    episode = hashlib.sha256(notice.alert.key.encode()).hexdigest()[:16]
    thread = f"<alert-{episode}-{notice.episode}@{domain}>"
    if notice.kind == "raised":
        message["References"] = thread
    else:
        message["In-Reply-To"] = thread
        message["References"] = thread
    message["X-Fabrik-Alert-Key"] = notice.alert.key
    message["X-Fabrik-Delivery-Id"] = notice.delivery_id
    text = notice.resolved_message if notice.kind == "resolved" else notice.alert.message
    lines = [headline(notice), ""]
    if text:
        lines += [text, ""]
    lines.append(_context(notice.alert))
    lines.append(f"Severity: {notice.alert.severity}")
    lines.append(f"Opened: {notice.opened_at.isoformat()}")
    if notice.kind == "resolved" and notice.resolved_at:
        lines.append(f"Resolved: {notice.resolved_at.isoformat()}")
    if notice.dashboard_url:
        lines += ["", notice.dashboard_url]
    message.set_content("\n".join(lines) + "\n")
    return message
