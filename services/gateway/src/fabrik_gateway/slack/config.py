"""The Slack settings, parsed and validated: who may do what (`FABRIK_SLACK_USERS`), where run
notifications go (`FABRIK_SLACK_CHANNELS`), the signing secret and the bot token.

Everything here is pure and cheap, so `GatewaySettings.__post_init__` calls
`check_slack_settings(self)` and a bad value stops the start with the variable and the rule named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from fabrik_common.ids import DNS1123_RULE, is_dns1123_label
from fabrik_gateway.roles import ROLES, Principal, Role, higher_role

if TYPE_CHECKING:
    from fabrik_gateway.settings import GatewaySettings

USERS_VARIABLE: Final = "FABRIK_SLACK_USERS"
CHANNELS_VARIABLE: Final = "FABRIK_SLACK_CHANNELS"
BOT_TOKEN_VARIABLE: Final = "FABRIK_SLACK_BOT_TOKEN"  # noqa: S105 - a name
API_URL_VARIABLE: Final = "FABRIK_SLACK_API_URL"
PUBLIC_URL_VARIABLE: Final = "FABRIK_PUBLIC_URL"
EVERYONE: Final = "*"

USERS_RULE: Final = (
    "entries are USER_ID=role, USER_ID=project:role or *=role, comma-separated; USER_ID is a Slack "
    "member id (U... or W...), role one of " + ", ".join(ROLES)
)
CHANNELS_RULE: Final = (
    "entries are project=CHANNEL_ID or *=CHANNEL_ID, comma-separated; CHANNEL_ID is a Slack channel id "
    "(C..., G... or D...: channel details -> About), not a #name"
)
_USER_ID = re.compile(r"^[UW][A-Z0-9]+$")
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]+$")


class SlackConfigError(ValueError):
    """A Slack setting is unusable; the message names the variable and the rule (never a secret)."""


# ------------------------------------------------------------------------------------------------
# Users -> roles


@dataclass(frozen=True)
class Grant:
    """The roles one entry key (a user, or `*`) was given."""

    role: Role | None = None
    project_roles: Mapping[str, Role] = field(default_factory=dict)

    def merged(self, other: Grant | None) -> Grant:
        if other is None:
            return self
        projects = dict(self.project_roles)
        for project, role in other.project_roles.items():
            best = higher_role(projects.get(project), role)
            assert best is not None
            projects[project] = best
        return Grant(higher_role(self.role, other.role), projects)


@dataclass(frozen=True)
class UserRoles:
    """`FABRIK_SLACK_USERS`: Slack users -> Fabrik roles. `*` applies to everyone in the workspace,
    on top of a user's own entries (the higher role wins)."""

    users: Mapping[str, Grant] = field(default_factory=dict)
    everyone: Grant | None = None

    def principal(self, user_id: str, name: str = "") -> Principal | None:
        """The caller as a principal, or None when the user has no role at all."""
        own = self.users.get(user_id)
        grant = own.merged(self.everyone) if own is not None else self.everyone
        if grant is None or (grant.role is None and not grant.project_roles):
            return None
        return Principal(
            subject=f"slack:{user_id}",
            role=grant.role,
            project_roles=dict(grant.project_roles),
            authenticated=True,
            kind="integration",
            name=name,
        )


def _entries(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def parse_users(text: str) -> UserRoles:
    """Parse `FABRIK_SLACK_USERS`; raise `SlackConfigError` naming the variable and the rule."""
    users: dict[str, dict[str | None, Role]] = {}
    for entry in _entries(text):
        key, sep, value = (s.strip() for s in entry.partition("="))
        if not sep or not key or not value:
            raise _bad_user(entry, "is not KEY=VALUE")
        if key != EVERYONE and not _USER_ID.match(key):
            raise _bad_user(entry, f"{key!r} is not a Slack member id (like U024BE7LH) or *")
        project: str | None
        project, colon, role = (s.strip() for s in value.rpartition(":"))
        if not colon:
            project = None
        elif not is_dns1123_label(project):
            raise _bad_user(entry, f"the project {project!r} {DNS1123_RULE}")
        if role not in ROLES:
            raise _bad_user(entry, f"the role {role!r} is not one of {', '.join(ROLES)}")
        grants = users.setdefault(key, {})
        if project in grants and grants[project] != role:
            where = f"in project {project}" if project else "everywhere"
            raise _bad_user(entry, f"{key} is given two different roles {where}")
        grants[project] = role
    built = {
        key: Grant(grants.get(None), {p: r for p, r in grants.items() if p is not None})
        for key, grants in users.items()
    }
    everyone = built.pop(EVERYONE, None)
    return UserRoles(users=built, everyone=everyone)


def _bad_user(entry: str, why: str) -> SlackConfigError:
    return SlackConfigError(f"{USERS_VARIABLE}: the entry {entry!r} is invalid: {why} ({USERS_RULE})")


# ------------------------------------------------------------------------------------------------
# Projects -> channels


@dataclass(frozen=True)
class ChannelMap:
    """`FABRIK_SLACK_CHANNELS`: where each project's run notifications go."""

    projects: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    def channel_for(self, project: str) -> str | None:
        return self.projects.get(project, self.default)

    def __bool__(self) -> bool:
        return bool(self.projects) or self.default is not None


def parse_channels(text: str) -> ChannelMap:
    projects: dict[str, str] = {}
    default: str | None = None
    for entry in _entries(text):
        key, sep, value = (s.strip() for s in entry.partition("="))
        if not sep or not key or not value:
            raise _bad_channel(entry, "is not KEY=VALUE")
        if key != EVERYONE and not is_dns1123_label(key):
            raise _bad_channel(entry, f"the project {key!r} {DNS1123_RULE}")
        if not _CHANNEL_ID.match(value):
            raise _bad_channel(entry, f"{value!r} is not a Slack channel id")
        previous = default if key == EVERYONE else projects.get(key)
        if previous is not None and previous != value:
            raise _bad_channel(entry, f"{key} is given two different channels")
        if key == EVERYONE:
            default = value
        else:
            projects[key] = value
    return ChannelMap(projects, default)


def _bad_channel(entry: str, why: str) -> SlackConfigError:
    return SlackConfigError(f"{CHANNELS_VARIABLE}: the entry {entry!r} is invalid: {why} ({CHANNELS_RULE})")


# ------------------------------------------------------------------------------------------------
# Everything together


@dataclass(frozen=True)
class SlackConfig:
    signing_secret: str = ""
    bot_token: str = ""
    api_url: str = "https://slack.com/api"
    users: UserRoles = field(default_factory=UserRoles)
    channels: ChannelMap = field(default_factory=ChannelMap)
    public_url: str = "http://127.0.0.1:8080"
    default_repos: Mapping[str, str] = field(default_factory=dict)
    """Project -> repository URL for `/fabrik run` without `--repo` (from the GitHub mapping)."""

    @property
    def commands_enabled(self) -> bool:
        return bool(self.signing_secret)

    @property
    def notifications_enabled(self) -> bool:
        return bool(self.bot_token) and bool(self.channels)

    def run_url(self, run_id: str) -> str:
        return f"{self.public_url}/runs/{run_id}"

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> SlackConfig:
        api_url = settings.slack_api_url.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", api_url):
            raise SlackConfigError(f"{API_URL_VARIABLE}={settings.slack_api_url!r} must be an http(s) URL")
        public_url = settings.public_url.strip().rstrip("/") or f"http://127.0.0.1:{settings.http_port}"
        if not re.match(r"^https?://[^/\s]+", public_url):
            raise SlackConfigError(f"{PUBLIC_URL_VARIABLE}={settings.public_url!r} must be an http(s) URL")
        try:
            # the value or its `_FILE` (an empty file is refused)
            signing_secret = settings.secret("slack_signing_secret", empty_file_ok=False)
            token = settings.secret("slack_bot_token", empty_file_ok=False)
        except ValueError as exc:
            raise SlackConfigError(str(exc)) from None
        if token and not token.startswith("xox"):
            raise SlackConfigError(
                f"{BOT_TOKEN_VARIABLE} must be a Slack bot token (xoxb-...); the value is not shown"
            )
        return cls(
            signing_secret=signing_secret,
            bot_token=token,
            api_url=api_url,
            users=parse_users(settings.slack_users),
            channels=parse_channels(settings.slack_channels),
            public_url=public_url,
            default_repos=default_repositories(settings.github_repositories, settings.github_api_url),
        )


def check_slack_settings(settings: GatewaySettings) -> None:
    """For `GatewaySettings.__post_init__`: raise `SlackConfigError` (a ValueError) on a bad value."""
    SlackConfig.from_settings(settings)


def default_repositories(github_repositories: str, github_api_url: str) -> dict[str, str]:
    """Projects that exactly one GitHub repository maps to (`owner/repo=project`, no wildcard) ->
    that repository's clone URL. Malformed entries are skipped here: the GitHub integration owns
    and validates that setting."""
    web = _github_web_url(github_api_url)
    seen: dict[str, list[str]] = {}
    for entry in _entries(github_repositories):
        repo, sep, project = (s.strip() for s in entry.partition("="))
        owner, slash, name = repo.partition("/")
        if not sep or not slash or not owner or not name or "*" in repo or "/" in name:
            continue
        if is_dns1123_label(project):
            seen.setdefault(project, []).append(f"{web}/{owner}/{name}")
    return {project: urls[0] for project, urls in seen.items() if len(set(urls)) == 1}


def _github_web_url(api_url: str) -> str:
    url = api_url.strip().rstrip("/")
    if url in ("", "https://api.github.com"):
        return "https://github.com"
    return url.removesuffix("/api/v3")
