"""The `/fabrik` slash command: parsing its text, deciding who may do what, doing it, answering.

```
/fabrik run <project> <spec> [--repo URL] [--ref REF] [--env ENV] [--priority low|normal|high]
                             [--timeout 30m] [--budget USD] [--template NAME]
                             [--cpu 2] [--memory 4Gi] [--label key=value]...
/fabrik status <run>
/fabrik cancel <run> [reason ...]
/fabrik help
```

Two stages, both driven by the pure `triage()`:

1. the webhook (`api/webhooks_slack.py`) verifies the request, publishes `SlackCommandReceived` and
   answers at once: with the final answer when triage already knows it (help, a usage error, a
   caller without a role), else with an acknowledgement;
2. the ingest consumer (`handlers.py`) triages the same event again (same answer: pure function of
   the text, the user and the settings) and, for a command that needs work, does it through the
   gateway (`execute()`) and answers through the command's `response_url`.

`<spec>` and the options are those of every run asked for in chat (`fabrik_gateway.chatops`,
docs/chatops.md): a spec id means `.fabrik/specs/<id>.json` in the run's repository, a path is used
as is. `--repo` and `--ref` are Slack's own (on GitHub the repository is the commented one). See
docs/slack.md.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, Protocol

import msgspec

from fabrik_common.bus import Retry
from fabrik_common.events import TERMINAL_STATES, AuditRecorded, SlackCommandReceived
from fabrik_common.ids import derived_ulid, is_ulid, utcnow
from fabrik_common.runs import RunRecord
from fabrik_gateway import chatops
from fabrik_gateway.auth.principal import Principal
from fabrik_gateway.chatops import OPTIONS, REPO_OPTIONS, ChatError, check_spec, read_options, split_options
from fabrik_gateway.models import ActionAccepted, RunView
from fabrik_gateway.problems import ProblemError
from fabrik_gateway.readmodel import ReadModel
from fabrik_gateway.slack.config import USERS_VARIABLE, SlackConfig, UserRoles
from fabrik_gateway.validation import ValidSubmit

ResponseType = Literal["ephemeral", "in_channel"]
RUN_OPTIONS: Final = {**REPO_OPTIONS, **OPTIONS}
"""The options of `/fabrik run`: those of every run asked for in chat, and where the code comes from."""
POSITIONAL: Final = {"project": "<project>", "spec_path": "<spec>", "spec": "<spec>"}
"""Fields of a rejected submit that the command's words set."""

USAGE: Final = f"""*Fabrik* — `/fabrik` commands:
• `/fabrik run <project> <spec> {chatops.synopsis(RUN_OPTIONS)}` — start a run of spec `<spec>` \
(an id meaning the repository's `{chatops.SPEC_DIR}/<spec>.json`, or a path such as `docs/spec.json`)
• `/fabrik status <run>` — where a run stands
• `/fabrik cancel <run> [reason]` — stop a run
• `/fabrik help` — this text"""


# ------------------------------------------------------------------------------------------------
# What a command asks for


@dataclass(frozen=True)
class Answer:
    """A final answer to the user (no work to do)."""

    text: str
    response_type: ResponseType = "ephemeral"


@dataclass(frozen=True)
class RunCommand:
    project: str
    spec: str
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusCommand:
    run_id: str


@dataclass(frozen=True)
class CancelCommand:
    run_id: str
    reason: str = ""


Command = RunCommand | StatusCommand | CancelCommand


@dataclass(frozen=True)
class Triaged:
    """A command that needs work, by whom, and what to answer at once."""

    command: Command
    principal: Principal
    acknowledgement: Answer


def unescape(text: str) -> str:
    """Slack's escaping undone: `<https://x|label>` and `<https://x>` -> the URL, `<@U1|name>` ->
    `@name`, `&amp;` `&lt;` `&gt;` -> `&` `<` `>`, typographic quotes -> ASCII quotes."""

    def link(match: re.Match[str]) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith(("@", "#", "!")):
            return label or target
        return target

    text = re.sub(r"<([^<>]*)>", link, text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    for fancy, plain in (("\u201c", '"'), ("\u201d", '"'), ("\u201e", '"'), ("\u2018", "'"), ("\u2019", "'")):
        text = text.replace(fancy, plain)
    return text


def parse(text: str) -> Command | Answer:
    """The command in a slash command's text, or the answer to give (help, a usage error)."""
    try:
        words = shlex.split(unescape(text))
    except ValueError as exc:
        return usage(f"I could not read that: {exc}.")
    if not words or words[0].lower() in ("help", "-h", "--help", "?"):
        return Answer(USAGE)
    verb, args = words[0].lower(), words[1:]
    if verb == "run":
        return _parse_run(args)
    if verb in ("status", "cancel"):
        if not args:
            return usage(f"`/fabrik {verb}` needs a run id.")
        run_id = _run_id(args[0])
        if run_id is None:
            return usage(f"{args[0]!r} is not a run id (26 characters, like 01JH3Z9W4R8Q0M6Y2V5T7K1B3C).")
        if verb == "status":
            if len(args) > 1:
                return usage("`/fabrik status` takes one run id.")
            return StatusCommand(run_id)
        return CancelCommand(run_id, " ".join(args[1:]).strip()[:1024])
    return usage(f"unknown command {verb!r}.")


def usage(problem: str) -> Answer:
    return Answer(f":warning: {problem}\n\n{USAGE}")


def _run_id(word: str) -> str | None:
    """A run id, also from a link to the run (`https://fabrik.example.com/runs/<id>`)."""
    candidate = word.rstrip("/").rsplit("/", 1)[-1]
    return candidate.upper() if is_ulid(candidate) else None


def _parse_run(args: list[str]) -> RunCommand | Answer:
    try:
        positional, options = split_options(args, RUN_OPTIONS)
        if len(positional) != 2:
            return usage("`/fabrik run` needs a project and a spec: `/fabrik run <project> <spec>`.")
        project, spec = positional
        check_spec(spec)
    except ChatError as exc:
        return usage(f"{exc}.")
    return RunCommand(project, spec, {k: tuple(v) for k, v in options.items()})


def not_allowed(user_id: str) -> Answer:
    return Answer(
        f":no_entry: You are not allowed to use Fabrik from Slack: your Slack user {user_id} has no "
        f"Fabrik role. An administrator can grant one in {USERS_VARIABLE}."
    )


def triage(text: str, user_id: str, users: UserRoles, user_name: str = "") -> Triaged | Answer:
    """What to do with a command: a final `Answer` now, or work for the ingest consumer.

    Pure (text, user and settings in, decision out), so that the webhook and the consumer, which
    both call it, agree."""
    parsed = parse(text)
    if isinstance(parsed, Answer):
        return parsed
    principal = users.principal(user_id, user_name)
    if principal is None:
        return not_allowed(user_id)
    if isinstance(parsed, RunCommand):
        if not principal.has_role("developer", parsed.project):
            return Answer(f":no_entry: {_role_problem(principal, 'developer', 'start runs', parsed.project)}")
        ack = f":hourglass_flowing_sand: Starting a run of `{esc(parsed.spec)}` in *{esc(parsed.project)}*…"
    elif isinstance(parsed, StatusCommand):
        ack = f":mag: Looking up run {parsed.run_id}…"
    else:
        ack = f":hourglass_flowing_sand: Cancelling run {parsed.run_id}…"
    return Triaged(parsed, principal, Answer(ack))


def _role_problem(principal: Principal, role: str, action: str, project: str) -> str:
    held = principal.role_in(project)
    has = f"the {held} role" if held is not None else "no role"
    return (
        f"the {role} role in project {project} is needed to {action}; "
        f"you ({principal.subject}) have {has} there."
    )


# ------------------------------------------------------------------------------------------------
# The ingest event


def command_event(form: Mapping[str, str], raw_body: bytes, received_at: datetime) -> SlackCommandReceived:
    """The ingest event of a verified slash command. Its id is derived from the team and the
    `trigger_id` (unique per invocation, the same on Slack's retries), else from the body."""
    trigger_id = form.get("trigger_id", "")
    team_id = form.get("team_id", "")
    if trigger_id:
        request_id = trigger_id
        seed = f"slack-command:{team_id}:{trigger_id}"
    else:
        request_id = "sha256:" + hashlib.sha256(raw_body).hexdigest()
        seed = f"slack-command:{request_id}"
    return SlackCommandReceived(
        event_id=derived_ulid(seed),
        request_id=request_id,
        command=form.get("command", ""),
        text=form.get("text", ""),
        user_id=form.get("user_id", ""),
        user_name=form.get("user_name", ""),
        team_id=team_id,
        channel_id=form.get("channel_id", ""),
        response_url=form.get("response_url", ""),
        received_at=received_at,
    )


def idempotency_key(event: SlackCommandReceived) -> str:
    """The submit's Idempotency-Key: a redelivered command replays the run it started."""
    return f"slack:{event.team_id}:{event.request_id}"[:255]


# ------------------------------------------------------------------------------------------------
# Doing it


class CommandTarget(Protocol):
    """What commands need of the gateway (`fabrik_gateway.gateway.Gateway` is one)."""

    readmodel: ReadModel

    def validate_submit(self, raw: bytes, idempotency_key: str | None) -> tuple[ValidSubmit, str | None]: ...

    async def submit(
        self, valid: ValidSubmit, key: str | None, principal: Principal
    ) -> tuple[RunView, bool]: ...

    async def cancel(self, run_id: str, principal: Principal, reason: str) -> ActionAccepted: ...

    def find(self, run_id: str, principal: Principal) -> RunRecord: ...


def submit_body(command: RunCommand, config: SlackConfig) -> dict[str, Any] | Answer:
    """The `POST /runs` body a run command asks for, or the answer when it cannot be built. A
    `--timeout` or `--budget` that cannot be read is left for the validation to name, with the
    command's other invalid fields."""
    opts = {name: values[-1] for name, values in command.options.items() if values}
    repo_url = opts.get("repo") or config.default_repos.get(command.project)
    if not repo_url:
        return usage(
            f"no repository is known for project {command.project}: add `--repo URL` "
            "(the spec is read from the run's repository)."
        )
    try:
        options = read_options(command.options, strict=False)
        return chatops.submit_body(
            options, project=command.project, spec=command.spec, repo_url=repo_url, ref=opts.get("ref")
        )
    except ChatError as exc:
        return usage(f"{exc}.")


def _option_of(field_name: str) -> str:
    return chatops.option_for_field(field_name, RUN_OPTIONS.values(), POSITIONAL)


def problem_answer(exc: ProblemError) -> Answer:
    """A refusal of the gateway (validation, 403, 404, 409) as a message for the Slack user."""
    if exc.status in (401, 403):
        return Answer(f":no_entry: {exc.detail}")
    if exc.errors:
        lines = "\n".join(f"• `{esc(_option_of(f))}` {esc(rule)}" for f, rule in exc.errors)
        return Answer(f":warning: The run was not started:\n{lines}")
    return Answer(f":warning: {esc(exc.detail)}")


@dataclass(frozen=True)
class Done:
    """What a command came to: the answer, and the audit record of a change (run, cancel)."""

    answer: Answer
    audit: AuditRecorded | None = None


def audit_record(
    event: SlackCommandReceived,
    principal: Principal | None,
    action: str,
    result: Literal["ok", "denied", "failed"],
    *,
    target: str,
    project: str | None,
    detail: str = "",
) -> AuditRecorded:
    """The audit event of a Slack command, with an id derived from the command's (a redelivered
    command is audited once)."""
    details: dict[str, Any] = {
        "via": "slack",
        "request_id": event.request_id,
        "team_id": event.team_id,
        "channel_id": event.channel_id,
        "text": event.text[:500],
    }
    if detail:
        details["detail"] = detail[:500]
    return AuditRecorded(
        event_id=derived_ulid(f"audit:{event.event_id}"),
        actor=principal.subject if principal is not None else f"slack:{event.user_id}",
        role=principal.role_name if principal is not None else "none",
        action=action,
        target=target,
        project=project,
        result=result,
        details=details,
    )


def refusal_audit(event: SlackCommandReceived, users: UserRoles) -> AuditRecorded | None:
    """For a change (run, cancel) refused before any work: the audit record of the refusal."""
    parsed = parse(event.text)
    if isinstance(parsed, Answer | StatusCommand):
        return None
    principal = users.principal(event.user_id, event.user_name)
    if isinstance(parsed, RunCommand):
        return audit_record(
            event,
            principal,
            "run.submit",
            "denied",
            target=f"project {parsed.project}",
            project=parsed.project,
        )
    return audit_record(event, principal, "run.cancel", "denied", target=parsed.run_id, project=None)


async def execute(
    triaged: Triaged, event: SlackCommandReceived, gateway: CommandTarget, config: SlackConfig
) -> Done:
    """Do the command: the answer for `response_url` and what to audit. A gateway that is not
    ready (503) raises the bus `Retry`, so the command is tried again shortly (the run submit is
    idempotent per event)."""
    command = triaged.command
    principal = triaged.principal
    try:
        if isinstance(command, RunCommand):
            return await _run(command, principal, event, gateway, config)
        if isinstance(command, StatusCommand):
            return _status(command, principal, gateway, config)
        return await _cancel(command, principal, event, gateway, config)
    except ProblemError as exc:
        if exc.status == 503:
            raise Retry(f"gateway not ready: {exc.detail}", delay=1.0) from exc
        answer = problem_answer(exc)
        if isinstance(command, StatusCommand):
            return Done(answer)
        result: Literal["denied", "failed"] = "denied" if exc.status in (401, 403) else "failed"
        if isinstance(command, RunCommand):
            audit = audit_record(
                event,
                principal,
                "run.submit",
                result,
                target=f"project {command.project}",
                project=command.project,
                detail=exc.detail,
            )
        else:
            audit = audit_record(
                event, principal, "run.cancel", result, target=command.run_id, project=None, detail=exc.detail
            )
        return Done(answer, audit)


async def _run(
    command: RunCommand,
    principal: Principal,
    event: SlackCommandReceived,
    gateway: CommandTarget,
    config: SlackConfig,
) -> Done:
    body = submit_body(command, config)
    if isinstance(body, Answer):
        return Done(body)
    valid, key = gateway.validate_submit(msgspec.json.encode(body), idempotency_key(event))
    view, created = await gateway.submit(valid, key, principal)
    answer = Answer(
        f":rocket: <@{event.user_id}> started run <{config.run_url(view.run_id)}|{view.run_id}> "
        f"of `{esc(command.spec)}` in *{esc(view.project)}* ({view.state}).",
        "in_channel",
    )
    audit = audit_record(
        event,
        principal,
        "run.submit",
        "ok",
        target=view.run_id,
        project=view.project,
        detail="" if created else "replayed (Idempotency-Key)",
    )
    return Done(answer, audit)


def _status(
    command: StatusCommand, principal: Principal, gateway: CommandTarget, config: SlackConfig
) -> Done:
    record = gateway.find(command.run_id, principal)
    return Done(Answer(describe(record, gateway.readmodel.view(record), config.run_url(record.run_id))))


async def _cancel(
    command: CancelCommand,
    principal: Principal,
    event: SlackCommandReceived,
    gateway: CommandTarget,
    config: SlackConfig,
) -> Done:
    record = gateway.find(command.run_id, principal)
    if not principal.has_role("developer", record.project):
        problem = _role_problem(principal, "developer", "cancel runs", record.project)
        return Done(
            Answer(f":no_entry: {problem}"),
            audit_record(
                event,
                principal,
                "run.cancel",
                "denied",
                target=record.run_id,
                project=record.project,
                detail=problem,
            ),
        )
    reason = command.reason or f"cancelled from Slack by {event.user_name or event.user_id}"
    accepted = await gateway.cancel(record.run_id, principal, reason)
    link = f"<{config.run_url(record.run_id)}|{record.run_id}>"
    answer = Answer(
        f":stop_sign: <@{event.user_id}> asked to cancel run {link} in *{esc(record.project)}* "
        f"(it was {accepted.state}).",
        "in_channel",
    )
    return Done(
        answer,
        audit_record(event, principal, "run.cancel", "ok", target=record.run_id, project=record.project),
    )


# ------------------------------------------------------------------------------------------------
# Formatting


def esc(text: str) -> str:
    """Text placed in a Slack message: `&`, `<` and `>` escaped so nothing becomes a link or a mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def spec_name(record: RunRecord) -> str | None:
    if record.spec_id:
        return record.spec_id
    path = record.params.spec_path
    if path:
        stem = path.rsplit("/", 1)[-1]
        return stem.removesuffix(".json")
    return None


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "?"


def duration_text(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def describe(record: RunRecord, view: RunView, url: str) -> str:
    """The status of a run, several lines of mrkdwn."""
    lines = [
        f"*Run <{url}|{record.run_id}>* in *{esc(record.project)}* is *{record.state}*"
        + (f" ({esc(record.reason)})" if record.reason else "")
        + (f", attempt {record.attempt}" if record.attempt > 1 else "")
    ]
    facts = []
    spec = spec_name(record)
    if spec:
        facts.append(f"spec `{esc(spec)}`")
    if record.requested_by:
        facts.append(f"requested by {esc(record.requested_by)}")
    facts.append(f"created {_when(record.created_at)}")
    lines.append(" · ".join(facts))
    if view.queue is not None and view.queue.position is not None:
        eta = f", starts around {_when(view.queue.eta)}" if view.queue.eta is not None else ""
        lines.append(f"queue position {view.queue.position} ({view.queue.ahead_count or 0} ahead){eta}")
    progress = record.progress
    if progress.phase or progress.total:
        parts = [esc(progress.phase)] if progress.phase else []
        if progress.total:
            parts.append(f"{progress.finished or 0}/{progress.total}")
        if progress.task:
            parts.append(f"(task {esc(progress.task)})")
        lines.append("progress: " + " ".join(parts))
    if record.started_at is not None:
        end = record.finished_at or utcnow()
        verb = "ran" if record.state in TERMINAL_STATES else "running for"
        lines.append(f"{verb} {duration_text((end - record.started_at).total_seconds())}")
    if record.cost_usd or record.tokens.input or record.tokens.output:
        lines.append(
            f"cost ${record.cost_usd:.2f} · tokens {record.tokens.input:,} in / {record.tokens.output:,} out"
        )
    if record.message:
        lines.append(f"> {esc(record.message[:500])}")
    return "\n".join(lines)
