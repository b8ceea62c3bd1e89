"""Routing rules: which channels an alert goes to, and how often it is repeated while open.

The configuration is one JSON document, from `FABRIK_ALERT_RULES` (inline) or
`FABRIK_ALERT_RULES_FILE`:

    {"channels": {"<name>": {"type": "slack" | "slack_webhook" | "webhook" | "email", ...}},
     "rules": [{"name": ..., "match": {...}, "channels": [...], "realert_seconds": ..., "stop": false}],
     "default_realert_seconds": 14400}

Every rule whose `match` fits the alert adds its channels (in rule order, without repeats) until a
matching rule says `stop`. An alert can also name channels itself (label `channels`, comma-separated:
a schedule's alert channels), which are added to what the rules give.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from fabrik_common.events import AlertRaised, Severity

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$", max_length=64)]
SmtpSecurity = Literal["starttls", "tls", "none"]


class SlackChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="slack"):
    """The Slack app (`chat.postMessage` with the bot token `FABRIK_ALERT_SLACK_BOT_TOKEN`)."""

    channel: Annotated[str, msgspec.Meta(min_length=1)]


class SlackWebhookChannel(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="slack_webhook"
):
    """A Slack incoming webhook (`https://hooks.slack.com/services/...`)."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]


class WebhookChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="webhook"):
    """Any HTTP endpoint: a JSON body with the alert, what it concerns and a dashboard link."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class EmailChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="email"):
    """E-mail through the SMTP server of the `FABRIK_SMTP_*` settings."""

    to: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$")]], msgspec.Meta(min_length=1)
    ]


ChannelConfig = SlackChannel | SlackWebhookChannel | WebhookChannel | EmailChannel


class Match(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every given condition must hold; a list means any of its values. Empty: every alert."""

    severity: list[Severity] | None = None
    min_severity: Severity | None = None
    source: list[str] | None = None
    kind: list[str] | None = None
    """The alert's `labels.kind` (`run_health`, `schedule`, `budget`, …)."""
    project: list[str] | None = None
    entity_kind: list[str] | None = None
    key_prefix: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str = ""
    match: Match = msgspec.field(default_factory=Match)
    channels: list[str]
    realert_seconds: NonNeg | None = None
    stop: bool = False


class AlertRules(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    channels: dict[Name, ChannelConfig] = msgspec.field(default_factory=dict)
    rules: list[Rule] = msgspec.field(default_factory=list)
    default_realert_seconds: NonNeg = 4 * 3600

    def __post_init__(self) -> None:
        for index, rule in enumerate(self.rules):
            for channel in rule.channels:
                if channel not in self.channels:
                    label = rule.name or f"#{index + 1}"
                    raise ValueError(f"rule {label} names the channel {channel!r}, which is not defined")


class Route(msgspec.Struct, frozen=True, kw_only=True):
    channels: tuple[str, ...]
    realert_seconds: int
    rules: tuple[str, ...] = ()


class RulesError(ValueError):
    pass


_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def severity_rank(severity: str) -> int:
    return _SEVERITY_RANK.get(severity, 0)


def parse_rules(text: str, origin: str = "FABRIK_ALERT_RULES") -> AlertRules:
    """Rules from JSON text; a RulesError names the origin and what is wrong."""
    if not text.strip():
        return AlertRules()
    try:
        data: Any = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise RulesError(f"{origin}: not valid JSON: {exc}") from None
    try:
        return msgspec.convert(data, AlertRules)
    except msgspec.ValidationError as exc:
        raise RulesError(f"{origin}: {exc}") from None
    except ValueError as exc:
        raise RulesError(f"{origin}: {exc}") from None


def load_rules(inline: str, path: str) -> AlertRules:
    if inline.strip() and path.strip():
        raise RulesError("set one of FABRIK_ALERT_RULES or FABRIK_ALERT_RULES_FILE, not both")
    if path.strip():
        try:
            text = Path(path).expanduser().read_text()
        except OSError as exc:
            raise RulesError(
                f"FABRIK_ALERT_RULES_FILE={path!r} cannot be read: {exc.strerror or exc}"
            ) from None
        return parse_rules(text, f"FABRIK_ALERT_RULES_FILE={path}")
    return parse_rules(inline)


def matches(match: Match, alert: AlertRaised) -> bool:
    if match.severity is not None and alert.severity not in match.severity:
        return False
    if match.min_severity is not None and severity_rank(alert.severity) < severity_rank(match.min_severity):
        return False
    if match.source is not None and alert.source not in match.source:
        return False
    if match.kind is not None and alert.labels.get("kind") not in match.kind:
        return False
    if match.project is not None and alert.project not in match.project:
        return False
    if match.entity_kind is not None and alert.entity_kind not in match.entity_kind:
        return False
    if match.key_prefix is not None and not alert.key.startswith(match.key_prefix):
        return False
    return all(alert.labels.get(k) == v for k, v in match.labels.items())


def _alert_channels(alert: AlertRaised) -> Sequence[str]:
    return [c.strip() for c in alert.labels.get("channels", "").split(",") if c.strip()]


def route(rules: AlertRules, alert: AlertRaised) -> tuple[Route, list[str]]:
    """Where `alert` goes and how often it is repeated; plus the channel names the alert asked for
    that are not defined (reported, not fatal)."""
    channels: list[str] = []
    names: list[str] = []
    intervals: list[int] = []
    for index, rule in enumerate(rules.rules):
        if not matches(rule.match, alert):
            continue
        names.append(rule.name or f"#{index + 1}")
        channels.extend(c for c in rule.channels if c not in channels)
        if rule.realert_seconds is not None:
            intervals.append(rule.realert_seconds)
        if rule.stop:
            break
    unknown: list[str] = []
    for name in _alert_channels(alert):
        if name not in rules.channels:
            unknown.append(name)
        elif name not in channels:
            channels.append(name)
    realert = rules.default_realert_seconds
    positive = [i for i in intervals if i > 0]
    if intervals and not positive:
        realert = 0
    elif positive:
        realert = min(positive)
    from_alert = alert.labels.get("realert_seconds", "").strip()
    if from_alert.isdigit():
        realert = int(from_alert)
    return Route(channels=tuple(channels), realert_seconds=realert, rules=tuple(names)), unknown
