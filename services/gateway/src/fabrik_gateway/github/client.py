"""The GitHub REST API subset Fabrik uses, over `httpx.AsyncClient`.

Authentication is either a GitHub App (an RS256 app JWT, `iss` = App id, buys an installation
access token per installation with `POST /app/installations/{id}/access_tokens`; tokens are cached
until five minutes before they expire and dropped on a 401) or a plain token (`Bearer <token>`).
Check runs need a GitHub App: with a plain token the reporter sets commit statuses instead.

Every call sends `Accept: application/vnd.github+json`, `X-GitHub-Api-Version: 2022-11-28` and a
`User-Agent`. Failures raise `GithubApiError`; `retryable` says whether trying again later can
help (transport errors, 5xx, 429, rate limits), and `retry_after` how long to wait when GitHub said.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx
import jwt
import msgspec

from fabrik_gateway.github.config import Credentials
from fabrik_gateway.github.webhook import PullRequest

log = logging.getLogger(__name__)

API_VERSION: Final = "2022-11-28"
ACCEPT: Final = "application/vnd.github+json"
USER_AGENT: Final = "fabrik-gateway"
TOKEN_REFRESH_MARGIN_SECONDS: Final = 300.0
APP_JWT_LIFETIME_SECONDS: Final = 540
"""GitHub accepts at most 10 minutes; `iat` is backdated 60 s for clock drift."""
WRITE_ROLES: Final = frozenset({"admin", "maintain", "write"})
SUMMARY_MAX: Final = 65535
TITLE_MAX: Final = 255
STATUS_DESCRIPTION_MAX: Final = 140

CheckStatus = Literal["queued", "in_progress", "completed"]
CheckConclusion = Literal[
    "success", "failure", "cancelled", "timed_out", "neutral", "action_required", "skipped"
]
StatusState = Literal["pending", "success", "failure", "error"]


class GithubApiError(Exception):
    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        rate_limited: bool = False,
    ) -> None:
        where = f"{method} {path}"
        super().__init__(f"{where}: {status or 'no answer'} {message}".strip())
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.rate_limited = rate_limited

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later (GitHub or the network had a problem)."""
        return self.status == 0 or self.status == 429 or self.status >= 500 or self.rate_limited


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AppAuth:
    """A GitHub App's JWT and its installation tokens, cached per installation."""

    def __init__(self, app_id: str, private_key: str, *, clock: Callable[[], float] = time.time) -> None:
        self.app_id = app_id
        self._private_key = private_key
        self._clock = clock
        self._tokens: dict[int, tuple[str, float]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def app_jwt(self) -> str:
        now = int(self._clock())
        claims = {"iat": now - 60, "exp": now + APP_JWT_LIFETIME_SECONDS, "iss": self.app_id}
        return jwt.encode(claims, self._private_key, algorithm="RS256")

    def cached(self, installation_id: int) -> str | None:
        token = self._tokens.get(installation_id)
        if token is None or token[1] - self._clock() < TOKEN_REFRESH_MARGIN_SECONDS:
            return None
        return token[0]

    def store(self, installation_id: int, token: str, expires_at: datetime) -> None:
        self._tokens[installation_id] = (token, expires_at.timestamp())

    def forget(self, installation_id: int) -> None:
        self._tokens.pop(installation_id, None)

    def lock(self, installation_id: int) -> asyncio.Lock:
        return self._locks.setdefault(installation_id, asyncio.Lock())


class _InstallationToken(msgspec.Struct, kw_only=True):
    token: str
    expires_at: datetime


class GithubClient:
    def __init__(
        self,
        credentials: Credentials,
        *,
        api_url: str = "https://api.github.com",
        http: httpx.AsyncClient | None = None,
        user_agent: str = USER_AGENT,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials
        self.api_url = api_url.rstrip("/")
        self.user_agent = user_agent
        self._own_http = http is None
        self._timeout = timeout
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._clock = clock
        self.app = (
            AppAuth(credentials.app_id, credentials.private_key, clock=clock)
            if credentials.mode == "app"
            else None
        )

    @property
    def supports_check_runs(self) -> bool:
        """Check runs can only be written by a GitHub App."""
        return self.app is not None

    async def aclose(self) -> None:
        """Close the HTTP client (one it was given is left to its owner); a later call opens a new one."""
        if self._own_http:
            await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http.is_closed and self._own_http:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        return self._http

    # ---------------------------------------------------------------- plumbing

    def _headers(self, authorization: str) -> dict[str, str]:
        return {
            "Accept": ACCEPT,
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": self.user_agent,
            "Authorization": authorization,
        }

    async def _authorization(self, installation_id: int | None) -> str:
        if self.app is None:
            return f"Bearer {self.credentials.token}"
        if installation_id is None:
            raise GithubApiError(
                "POST",
                "/app/installations/{id}/access_tokens",
                0,
                "no installation id: the delivery did not come from the GitHub App's webhook",
            )
        token = self.app.cached(installation_id)
        if token is not None:
            return f"Bearer {token}"
        async with self.app.lock(installation_id):
            token = self.app.cached(installation_id)
            if token is None:
                path = f"/app/installations/{installation_id}/access_tokens"
                data = await self._send("POST", path, f"Bearer {self.app.app_jwt()}", None, None)
                issued = msgspec.convert(data, _InstallationToken)
                self.app.store(installation_id, issued.token, issued.expires_at)
                token = issued.token
                log.info("GitHub installation token issued", extra={"installation_id": installation_id})
        return f"Bearer {token}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        installation_id: int | None,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """Call the API; the decoded JSON answer (None for 204). Raises `GithubApiError`."""
        authorization = await self._authorization(installation_id)
        try:
            return await self._send(method, path, authorization, json, params)
        except GithubApiError as exc:
            if exc.status == 401 and self.app is not None and installation_id is not None:
                # The installation token was revoked or expired early: get a new one, once.
                self.app.forget(installation_id)
                authorization = await self._authorization(installation_id)
                return await self._send(method, path, authorization, json, params)
            raise

    async def _send(
        self, method: str, path: str, authorization: str, body: Any, params: dict[str, str] | None
    ) -> Any:
        try:
            response = await self.http.request(
                method,
                self.api_url + path,
                headers=self._headers(authorization),
                json=body,
                params=params,
            )
        except httpx.HTTPError as exc:
            raise GithubApiError(method, path, 0, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise self._error(method, path, response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise GithubApiError(method, path, response.status_code, "answer is not JSON") from exc

    def _error(self, method: str, path: str, response: httpx.Response) -> GithubApiError:
        try:
            data = response.json()
            message = str(data.get("message", "")) if isinstance(data, dict) else ""
            errors = data.get("errors") if isinstance(data, dict) else None
            if errors:
                message += f" {errors}"
        except ValueError:
            message = response.text[:200]
        retry_after: float | None = None
        rate_limited = False
        header = response.headers.get("retry-after")
        if header is not None:
            try:
                retry_after = max(0.0, float(header))
            except ValueError:
                retry_after = None
        if response.status_code in (403, 429) and (
            header is not None or response.headers.get("x-ratelimit-remaining") == "0"
        ):
            rate_limited = True
            reset = response.headers.get("x-ratelimit-reset")
            if retry_after is None and reset is not None and reset.isdigit():
                retry_after = max(1.0, float(reset) - self._clock())
        return GithubApiError(
            method, path, response.status_code, message, retry_after=retry_after, rate_limited=rate_limited
        )

    # ---------------------------------------------------------------- the calls Fabrik makes

    async def permission(self, owner: str, repo: str, username: str, *, installation_id: int | None) -> str:
        """The user's role in the repository: `admin`, `maintain`, `write`, `triage`, `read` or
        `none` (a user GitHub does not know)."""
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/collaborators/{_seg(username)}/permission"
        try:
            data = await self.request("GET", path, installation_id=installation_id)
        except GithubApiError as exc:
            if exc.status == 404:
                return "none"
            raise
        role = data.get("role_name") or data.get("permission") or "none"
        return str(role)

    async def can_write(self, owner: str, repo: str, username: str, *, installation_id: int | None) -> bool:
        role = await self.permission(owner, repo, username, installation_id=installation_id)
        return role in WRITE_ROLES

    async def pull(self, owner: str, repo: str, number: int, *, installation_id: int | None) -> PullRequest:
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/pulls/{number}"
        data = await self.request("GET", path, installation_id=installation_id)
        return msgspec.convert(data, PullRequest)

    async def commit_sha(self, owner: str, repo: str, ref: str, *, installation_id: int | None) -> str:
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/commits/{quote(ref, safe='/')}"
        data = await self.request("GET", path, installation_id=installation_id)
        return str(data["sha"])

    async def create_check_run(
        self,
        owner: str,
        repo: str,
        *,
        installation_id: int | None,
        name: str,
        head_sha: str,
        external_id: str,
        details_url: str,
        status: CheckStatus,
        conclusion: CheckConclusion | None,
        title: str,
        summary: str,
        started_at: datetime | None = None,
        completed_at: datetime | None = None,
    ) -> int:
        body: dict[str, Any] = {
            "name": name,
            "head_sha": head_sha,
            "external_id": external_id,
            "details_url": details_url,
            **_check_state(status, conclusion, started_at, completed_at),
            "output": {"title": truncate(title, TITLE_MAX), "summary": truncate(summary, SUMMARY_MAX)},
        }
        data = await self.request(
            "POST",
            f"/repos/{_seg(owner)}/{_seg(repo)}/check-runs",
            installation_id=installation_id,
            json=body,
        )
        return int(data["id"])

    async def update_check_run(
        self,
        owner: str,
        repo: str,
        check_run_id: int,
        *,
        installation_id: int | None,
        details_url: str,
        status: CheckStatus,
        conclusion: CheckConclusion | None,
        title: str,
        summary: str,
        started_at: datetime | None = None,
        completed_at: datetime | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "details_url": details_url,
            **_check_state(status, conclusion, started_at, completed_at),
            "output": {"title": truncate(title, TITLE_MAX), "summary": truncate(summary, SUMMARY_MAX)},
        }
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/check-runs/{check_run_id}"
        await self.request("PATCH", path, installation_id=installation_id, json=body)

    async def find_check_run(
        self, owner: str, repo: str, sha: str, *, installation_id: int | None, name: str, external_id: str
    ) -> int | None:
        """The check run named `name` with `external_id` on the commit (one created before a
        crash), or None."""
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/commits/{_seg(sha)}/check-runs"
        data = await self.request(
            "GET",
            path,
            installation_id=installation_id,
            params={"check_name": name, "filter": "all", "per_page": "100"},
        )
        for run in data.get("check_runs", []):
            if run.get("external_id") == external_id:
                return int(run["id"])
        return None

    async def create_status(
        self,
        owner: str,
        repo: str,
        sha: str,
        *,
        installation_id: int | None,
        state: StatusState,
        target_url: str,
        description: str,
        context: str,
    ) -> None:
        body = {
            "state": state,
            "target_url": target_url,
            "description": truncate(description, STATUS_DESCRIPTION_MAX),
            "context": context,
        }
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/statuses/{_seg(sha)}"
        await self.request("POST", path, installation_id=installation_id, json=body)

    async def create_comment(
        self, owner: str, repo: str, number: int, body: str, *, installation_id: int | None
    ) -> int:
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/issues/{number}/comments"
        data = await self.request(
            "POST", path, installation_id=installation_id, json={"body": truncate(body, SUMMARY_MAX)}
        )
        return int(data["id"])

    async def add_reaction(
        self, owner: str, repo: str, comment_id: int, content: str, *, installation_id: int | None
    ) -> None:
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/issues/comments/{comment_id}/reactions"
        await self.request("POST", path, installation_id=installation_id, json={"content": content})


def _seg(value: str) -> str:
    """One path segment, escaped."""
    return quote(value, safe="")


def _check_state(
    status: CheckStatus,
    conclusion: CheckConclusion | None,
    started_at: datetime | None,
    completed_at: datetime | None,
) -> dict[str, Any]:
    state: dict[str, Any] = {"status": status}
    if started_at is not None and status != "queued":
        state["started_at"] = utc_iso(started_at)
    if status == "completed":
        state["conclusion"] = conclusion or "neutral"
        state["completed_at"] = utc_iso(completed_at or datetime.now(UTC))
    return state
