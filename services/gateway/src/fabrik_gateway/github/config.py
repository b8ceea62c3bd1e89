"""What the `FABRIK_GITHUB_*` settings mean, validated at start.

`check_settings(settings)` is called from `GatewaySettings.__post_init__`: a bad value stops the
start (exit 2) with one line per problem naming the variable and the rule, before NATS is involved.
It imports nothing from `fabrik_gateway.settings` at run time (that module imports this one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from fabrik_common.ids import DNS1123_RULE, is_dns1123_label
from fabrik_gateway.chatops import ChatError, check_spec

if TYPE_CHECKING:
    from fabrik_gateway.settings import GatewaySettings

REPOSITORIES_VARIABLE: Final = "FABRIK_GITHUB_REPOSITORIES"
REPOSITORIES_RULE: Final = (
    "expected comma-separated `owner/repo=project` or `owner/*=project` entries (owner: letters, "
    "digits and '-', at most 39; repo: letters, digits, '.', '_' and '-', at most 100; project: "
    f"{DNS1123_RULE.removeprefix('must be ')}), each repository or owner at most once"
)
_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$")
_REPO = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class GithubConfigError(ValueError):
    """A `FABRIK_GITHUB_*` setting is unusable; the message names the variable and the rule."""


# ------------------------------------------------------------------------------------------------
# repository -> project


@dataclass(frozen=True)
class RepositoryMap:
    """`owner/repo` -> project; `owner/*` matches every repository of an owner. GitHub names are
    case-insensitive, so matching is too; an exact entry wins over the owner's wildcard."""

    exact: dict[str, str]
    owners: dict[str, str]

    def project_for(self, full_name: str) -> str | None:
        key = full_name.lower()
        if key in self.exact:
            return self.exact[key]
        owner, _, _ = key.partition("/")
        return self.owners.get(owner)

    def __bool__(self) -> bool:
        return bool(self.exact or self.owners)


def parse_repositories(text: str) -> RepositoryMap:
    """Parse `FABRIK_GITHUB_REPOSITORIES`; raises `GithubConfigError` naming every bad entry."""
    exact: dict[str, str] = {}
    owners: dict[str, str] = {}
    problems: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, project = (part.strip() for part in entry.partition("="))
        owner, slash, repo = name.partition("/")
        if not sep or not slash:
            problems.append(f"{entry!r} is not `owner/repo=project`")
            continue
        if not _OWNER.match(owner):
            problems.append(f"{entry!r}: owner {owner!r} is not a GitHub user or organization name")
        if repo != "*" and not _REPO.match(repo):
            problems.append(f"{entry!r}: repository {repo!r} is not a GitHub repository name")
        if not is_dns1123_label(project):
            problems.append(f"{entry!r}: project {project!r} {DNS1123_RULE}")
        target = owners if repo == "*" else exact
        key = owner.lower() if repo == "*" else f"{owner}/{repo}".lower()
        if key in target:
            problems.append(f"{entry!r}: {name} is mapped twice")
        target[key] = project
    if problems:
        raise GithubConfigError(
            f"{REPOSITORIES_VARIABLE}={text!r} is invalid: {'; '.join(problems)} ({REPOSITORIES_RULE})"
        )
    return RepositoryMap(exact=exact, owners=owners)


# ------------------------------------------------------------------------------------------------
# secrets and credentials


def _secret(settings: GatewaySettings, name: str) -> str | None:
    """`settings.secret(name)` (the value or its `_FILE`; an empty file is refused), None when
    neither is set; raises `GithubConfigError`."""
    try:
        return settings.secret(name, empty_file_ok=False) or None
    except ValueError as exc:
        raise GithubConfigError(str(exc)) from None


@dataclass(frozen=True)
class Credentials:
    """How the gateway calls the GitHub API: as a GitHub App (installation tokens; needed for check
    runs) or with a plain token (commit statuses instead of check runs)."""

    mode: Literal["app", "token"]
    app_id: str = ""
    private_key: str = ""
    token: str = ""


def load_credentials(settings: GatewaySettings) -> Credentials | None:
    """The configured credentials, None when there are none; raises `GithubConfigError`."""
    plain = _secret(settings, "github_token")
    app_id = settings.github_app_id.strip()
    private_key_file = settings.github_app_private_key_file
    if bool(app_id) != bool(private_key_file):
        raise GithubConfigError(
            "FABRIK_GITHUB_APP_ID and FABRIK_GITHUB_APP_PRIVATE_KEY_FILE go together: set both (a GitHub "
            "App) or neither"
        )
    if app_id:
        if plain is not None:
            raise GithubConfigError(
                "set a GitHub App (FABRIK_GITHUB_APP_ID) or a token (FABRIK_GITHUB_TOKEN), not both"
            )
        if not app_id.isdigit():
            raise GithubConfigError(f"FABRIK_GITHUB_APP_ID={app_id!r} must be the App's numeric id")
        key = _secret(settings, "github_app_private_key")
        assert key is not None
        check_private_key(key, private_key_file)
        return Credentials(mode="app", app_id=app_id, private_key=key)
    if plain is not None:
        return Credentials(mode="token", token=plain)
    return None


def check_private_key(pem: str, file: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise GithubConfigError(
            f"FABRIK_GITHUB_APP_PRIVATE_KEY_FILE={file!r} is not a PEM private key without a "
            f"passphrase (the .pem file GitHub generates for the App): {exc}"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise GithubConfigError(
            f"FABRIK_GITHUB_APP_PRIVATE_KEY_FILE={file!r} must hold an RSA key (GitHub App keys are RSA)"
        )


def check_public_url(value: str) -> None:
    if value and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise GithubConfigError(
            f"FABRIK_PUBLIC_URL={value!r} must be an absolute http(s) URL such as https://fabrik.example.com"
        )


def public_url(value: str, http_port: int) -> str:
    """Where users reach the gateway: the setting, else `http://127.0.0.1:<port>`."""
    return value.rstrip("/") if value else f"http://127.0.0.1:{http_port}"


def run_link(base_url: str, run_id: str) -> str:
    return f"{base_url}/runs/{run_id}"


# ------------------------------------------------------------------------------------------------
# everything, at start


@dataclass(frozen=True)
class GithubConfig:
    repositories: RepositoryMap
    webhook_secret: str | None
    credentials: Credentials | None
    trigger_label: str
    default_spec: str


def load_config(settings: GatewaySettings) -> GithubConfig:
    """Every GitHub setting, parsed; raises `GithubConfigError` listing every problem."""
    problems: list[str] = []
    repositories = RepositoryMap({}, {})
    secret: str | None = None
    credentials: Credentials | None = None
    try:
        repositories = parse_repositories(settings.github_repositories)
    except GithubConfigError as exc:
        problems.append(str(exc))
    try:
        secret = _secret(settings, "github_webhook_secret")
    except GithubConfigError as exc:
        problems.append(str(exc))
    try:
        credentials = load_credentials(settings)
    except GithubConfigError as exc:
        problems.append(str(exc))
    try:
        check_public_url(settings.public_url)
    except GithubConfigError as exc:
        problems.append(str(exc))
    if not re.match(r"^https?://\S+$", settings.github_api_url):
        problems.append(
            f"FABRIK_GITHUB_API_URL={settings.github_api_url!r} must be an absolute http(s) URL "
            "(https://api.github.com, or https://<host>/api/v3 for GitHub Enterprise Server)"
        )
    default_spec = settings.github_default_spec.strip()
    if default_spec:
        try:
            check_spec(default_spec)
        except ChatError as exc:
            problems.append(f"FABRIK_GITHUB_DEFAULT_SPEC={default_spec!r} is invalid: {exc}")
    if len(settings.github_trigger_label) > 50:
        problems.append(
            f"FABRIK_GITHUB_TRIGGER_LABEL={settings.github_trigger_label!r} is longer than a GitHub label "
            "(50 characters)"
        )
    if problems:
        raise GithubConfigError("\n  ".join(problems))
    return GithubConfig(
        repositories=repositories,
        webhook_secret=secret,
        credentials=credentials,
        trigger_label=settings.github_trigger_label.strip(),
        default_spec=default_spec,
    )


def check_settings(settings: GatewaySettings) -> None:
    """For `GatewaySettings.__post_init__`: raise (a ValueError) when a GitHub setting is unusable."""
    load_config(settings)
