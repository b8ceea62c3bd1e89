"""GitHub webhook deliveries: signature verification, the delivery event, and the payloads that can
start a run. Plain functions, no I/O.

A delivery is verified (HMAC-SHA256 of the raw body with the webhook secret, constant-time
compare), then published as received on `fabrik.ingest.github.<event>` with an `event_id`
derived from `X-GitHub-Delivery`, so that JetStream stores a redelivered delivery once within its
dedupe window. What a delivery starts is decided later, from the `INGEST` stream
(`parse_trigger`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec

from fabrik_common.events import GithubDeliveryReceived
from fabrik_common.ids import derived_ulid, utcnow
from fabrik_gateway.github.commands import find_command_line

SIGNATURE_HEADER: Final = "X-Hub-Signature-256"
EVENT_HEADER: Final = "X-GitHub-Event"
DELIVERY_HEADER: Final = "X-GitHub-Delivery"
HOOK_ID_HEADER: Final = "X-GitHub-Hook-ID"

HANDLED_EVENTS: Final = frozenset({"issue_comment", "issues", "pull_request"})
"""Events that may start a run; every other verified event is only stored."""

_EVENT_NAME = re.compile(r"^[a-z_]{1,64}$")
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9-]{1,128}$")


class DeliveryError(ValueError):
    """The request is not a GitHub delivery we can store (a missing or malformed header)."""

    def __init__(self, header: str, rule: str) -> None:
        super().__init__(f"{header} {rule}")
        self.header = header
        self.rule = rule


# ------------------------------------------------------------------------------------------------
# signature


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`: `sha256=<hex HMAC-SHA256>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Whether `header` is the signature of `body` with `secret` (constant-time compare)."""
    if not header:
        return False
    expected = sign(secret, body)
    return hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", "replace"))


# ------------------------------------------------------------------------------------------------
# the delivery event


def delivery_event_id(delivery_id: str) -> str:
    """A ULID-shaped event id that is the same for every (re)delivery of one GitHub delivery, so
    JetStream (`Nats-Msg-Id` = event id) stores a redelivery within its dedupe window only once.

    Its time part is zero (`received_at` and `occurred_at` carry the time)."""
    return derived_ulid(f"github-delivery:{delivery_id}")


def delivery_event(
    *, event: str | None, delivery_id: str | None, body: bytes, received_at: datetime | None = None
) -> GithubDeliveryReceived:
    """The `ingest.github` event for a verified delivery; raises `DeliveryError` for bad headers."""
    if not event:
        raise DeliveryError(EVENT_HEADER, "is required")
    if not _EVENT_NAME.match(event):
        raise DeliveryError(EVENT_HEADER, "must be a GitHub event name: lowercase letters and '_'")
    if not delivery_id:
        raise DeliveryError(DELIVERY_HEADER, "is required")
    if not _DELIVERY_ID.match(delivery_id):
        raise DeliveryError(DELIVERY_HEADER, "must be a GitHub delivery GUID: letters, digits and '-'")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise DeliveryError(
            "body", "must be UTF-8 JSON (set the webhook's content type to application/json)"
        ) from None
    now = received_at or utcnow()
    return GithubDeliveryReceived(
        event_id=delivery_event_id(delivery_id),
        occurred_at=now,
        delivery_id=delivery_id,
        github_event=event,
        body=text,
        received_at=now,
    )


# ------------------------------------------------------------------------------------------------
# payloads (the fields Fabrik reads; everything else is ignored)


class User(msgspec.Struct, frozen=True, kw_only=True):
    login: str
    id: int = 0
    type: str = "User"


class Owner(msgspec.Struct, frozen=True, kw_only=True):
    login: str


class Repository(msgspec.Struct, frozen=True, kw_only=True):
    id: int = 0
    name: str
    full_name: str
    owner: Owner
    private: bool = False
    html_url: str = ""
    clone_url: str
    default_branch: str = "main"


class Installation(msgspec.Struct, frozen=True, kw_only=True):
    id: int


class Label(msgspec.Struct, frozen=True, kw_only=True):
    name: str


class IssuePullLink(msgspec.Struct, frozen=True, kw_only=True):
    url: str = ""
    html_url: str = ""


class Issue(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    title: str = ""
    body: str | None = None
    html_url: str = ""
    state: str = "open"
    user: User | None = None
    pull_request: IssuePullLink | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Comment(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    body: str = ""
    html_url: str = ""
    user: User
    created_at: datetime | None = None
    updated_at: datetime | None = None


class PullRef(msgspec.Struct, frozen=True, kw_only=True):
    ref: str
    sha: str
    repo: Repository | None = None


class PullRequest(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    title: str = ""
    body: str | None = None
    html_url: str = ""
    state: str = "open"
    user: User | None = None
    head: PullRef
    base: PullRef
    created_at: datetime | None = None
    updated_at: datetime | None = None


class IssueCommentPayload(msgspec.Struct, frozen=True, kw_only=True):
    action: str
    issue: Issue
    comment: Comment
    repository: Repository
    sender: User
    installation: Installation | None = None


class IssuesPayload(msgspec.Struct, frozen=True, kw_only=True):
    action: str
    issue: Issue
    label: Label | None = None
    repository: Repository
    sender: User
    installation: Installation | None = None


class PullRequestPayload(msgspec.Struct, frozen=True, kw_only=True):
    action: str
    number: int
    pull_request: PullRequest
    label: Label | None = None
    repository: Repository
    sender: User
    installation: Installation | None = None


TriggerKind = Literal["comment", "issue_label", "pull_request_label"]


@dataclass(frozen=True)
class Trigger:
    """A delivery that asks for a run: what, where, by whom, and when."""

    kind: TriggerKind
    event: str
    repository: Repository
    installation_id: int | None
    number: int
    is_pull: bool
    sender: str
    at: datetime
    """When the triggering action happened (comment creation, issue/PR update), from the signed
    payload: deliveries older than `MAX_TRIGGER_AGE` start nothing."""
    command_text: str | None
    """The comment (or, for labels, the issue/PR body): where `/fabrik run ...` is looked for."""
    comment_id: int | None = None
    html_url: str = ""
    head_sha: str | None = None
    """For pull requests whose payload carries the head (pull_request events)."""
    head_ref: str | None = None
    head_clone_url: str | None = None

    @property
    def full_name(self) -> str:
        return self.repository.full_name

    @property
    def owner(self) -> str:
        return self.repository.owner.login

    @property
    def repo(self) -> str:
        return self.repository.name


class PayloadError(ValueError):
    """A verified delivery whose payload is not what GitHub sends for its event."""


def parse_trigger(event: str, body: str | bytes, *, trigger_label: str) -> Trigger | None:
    """The run a delivery asks for, or None (not a trigger: other events and actions, bots, other
    labels, comments without `/fabrik`). Raises `PayloadError` for a payload that does not decode.

    - `issue_comment` `created` whose body has a line starting with `/fabrik`, on an issue or a PR;
    - `issues` `labeled` with the trigger label;
    - `pull_request` `labeled` with the trigger label (a run on the PR's head).
    """
    try:
        if event == "issue_comment":
            comment = msgspec.json.decode(body, type=IssueCommentPayload)
            if (
                comment.action != "created"
                or _is_bot(comment.sender)
                or find_command_line(comment.comment.body) is None
            ):
                return None
            return Trigger(
                kind="comment",
                event=event,
                repository=comment.repository,
                installation_id=comment.installation.id if comment.installation else None,
                number=comment.issue.number,
                is_pull=comment.issue.pull_request is not None,
                sender=comment.sender.login,
                at=_latest(comment.comment.created_at, comment.comment.updated_at),
                command_text=comment.comment.body,
                comment_id=comment.comment.id,
                html_url=comment.comment.html_url or comment.issue.html_url,
            )
        if event == "issues":
            issue = msgspec.json.decode(body, type=IssuesPayload)
            if not _labeled_with(issue.action, issue.label, trigger_label) or _is_bot(issue.sender):
                return None
            return Trigger(
                kind="issue_label",
                event=event,
                repository=issue.repository,
                installation_id=issue.installation.id if issue.installation else None,
                number=issue.issue.number,
                is_pull=issue.issue.pull_request is not None,
                sender=issue.sender.login,
                at=_latest(issue.issue.created_at, issue.issue.updated_at),
                command_text=issue.issue.body,
                html_url=issue.issue.html_url,
            )
        if event == "pull_request":
            pull = msgspec.json.decode(body, type=PullRequestPayload)
            if not _labeled_with(pull.action, pull.label, trigger_label) or _is_bot(pull.sender):
                return None
            head = pull.pull_request.head
            return Trigger(
                kind="pull_request_label",
                event=event,
                repository=pull.repository,
                installation_id=pull.installation.id if pull.installation else None,
                number=pull.pull_request.number,
                is_pull=True,
                sender=pull.sender.login,
                at=_latest(pull.pull_request.created_at, pull.pull_request.updated_at),
                command_text=pull.pull_request.body,
                html_url=pull.pull_request.html_url,
                head_sha=head.sha,
                head_ref=head.ref,
                head_clone_url=head.repo.clone_url if head.repo is not None else None,
            )
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise PayloadError(f"{event} payload does not decode: {exc}") from None
    return None


def _labeled_with(action: str, label: Label | None, trigger_label: str) -> bool:
    return (
        action == "labeled"
        and bool(trigger_label)
        and label is not None
        and label.name.casefold() == trigger_label.casefold()
    )


def _is_bot(user: User) -> bool:
    """Bots (this gateway's App included) never start runs: no loops between integrations."""
    return user.type == "Bot" or user.login.endswith("[bot]")


def _latest(*times: datetime | None) -> datetime:
    present = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in times if t is not None]
    return max(present) if present else datetime.fromtimestamp(0, UTC)
