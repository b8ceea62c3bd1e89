"""The subset of the Slack Web API the gateway uses, and answers through a command's `response_url`.

Calls are `POST <api_url>/<method>` with `Authorization: Bearer xoxb-...` and a JSON body
(`application/json; charset=utf-8`). Slack answers HTTP 200 with `{"ok": false, "error": ...}`
for most failures, 429 with `Retry-After` when rate limited, and 5xx when it is in trouble.
`SlackApiError.retryable` sorts them: a rate limit, a server error, a transport error or an
unknown `ok: false` error is worth another try later (the caller raises the bus `Retry`); the
errors below are permanent (the channel, the token or the message is wrong) and retrying would
never help.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import httpx

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
PERMANENT_ERRORS: Final = frozenset(
    {
        "account_inactive",
        "as_user_not_supported",
        "cannot_reply_to_message",
        "cant_update_message",
        "channel_is_archived",
        "channel_not_found",
        "ekm_access_denied",
        "edit_window_closed",
        "invalid_arguments",
        "invalid_auth",
        "invalid_blocks",
        "invalid_json",
        "is_archived",
        "message_not_found",
        "missing_scope",
        "msg_too_long",
        "no_permission",
        "no_text",
        "not_allowed_token_type",
        "not_authed",
        "not_in_channel",
        "org_login_required",
        "restricted_action",
        "team_access_not_granted",
        "thread_not_found",
        "token_expired",
        "token_revoked",
        "too_many_attachments",
        # response_url answers
        "expired_url",
        "used_url",
        "no_service",
    }
)
DEFAULT_RETRY_AFTER: Final = 1.0
MAX_TEXT: Final = 3900
"""Slack truncates `text` beyond 40,000 characters; messages stay well below, readable in a channel."""


class SlackApiError(Exception):
    """A Slack call failed. `error` is Slack's error code (`channel_not_found`, `ratelimited`,
    `http_503`, `transport`, ...); `retry_after` is Slack's `Retry-After` when it sent one."""

    def __init__(
        self, method: str, error: str, *, status: int = 200, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return is_retryable(self.status, self.error)


def is_retryable(status: int, error: str) -> bool:
    """Whether a failed call may succeed when tried again later."""
    if status == 429 or status >= 500:
        return True
    if 400 <= status < 500:
        return False  # a bad URL, method or body: the same request fails the same way
    return error not in PERMANENT_ERRORS


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return DEFAULT_RETRY_AFTER if response.status_code == 429 else None
    try:
        return max(0.0, float(value))
    except ValueError:
        return DEFAULT_RETRY_AFTER


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class PostedMessage:
    channel: str
    ts: str


class SlackClient:
    """Slack Web API calls with a bot token, over a shared `httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient, api_url: str, token: str) -> None:
        self.http = http
        self.api_url = api_url.rstrip("/")
        self._token = token

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `method`; the answer when `ok`, else `SlackApiError`."""
        try:
            response = await self.http.post(
                f"{self.api_url}/{method}",
                json=body,
                headers={"Authorization": f"Bearer {self._token}", "Content-Type": JSON_CONTENT_TYPE},
            )
        except httpx.HTTPError as exc:
            raise SlackApiError(method, f"transport: {type(exc).__name__}", status=599) from exc
        if response.status_code != 200:
            error = f"http_{response.status_code}"
            try:
                answer = response.json()
                if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                    error = answer["error"]
            except ValueError:
                pass
            raise SlackApiError(
                method, error, status=response.status_code, retry_after=_retry_after(response)
            )
        try:
            answer = response.json()
        except ValueError:
            raise SlackApiError(method, "invalid_response", status=502) from None
        if not isinstance(answer, dict):
            raise SlackApiError(method, "invalid_response", status=502)
        if not answer.get("ok"):
            raise SlackApiError(method, str(answer.get("error") or "unknown_error"))
        warning = answer.get("warning")
        if warning:
            log.debug("slack warning", extra={"method": method, "warning": warning})
        return answer

    async def post_message(self, channel: str, text: str, *, thread_ts: str | None = None) -> PostedMessage:
        body: dict[str, Any] = {"channel": channel, "text": clip(text), "unfurl_links": False}
        if thread_ts is not None:
            body["thread_ts"] = thread_ts
        answer = await self.call("chat.postMessage", body)
        ts = answer.get("ts")
        if not isinstance(ts, str):
            raise SlackApiError("chat.postMessage", "invalid_response", status=502)
        posted_channel = answer.get("channel")
        return PostedMessage(posted_channel if isinstance(posted_channel, str) else channel, ts)

    async def update_message(self, channel: str, ts: str, text: str) -> None:
        await self.call("chat.update", {"channel": channel, "ts": ts, "text": clip(text)})

    async def auth_test(self) -> dict[str, Any]:
        return await self.call("auth.test", {})


async def respond(http: httpx.AsyncClient, response_url: str, text: str, response_type: str) -> None:
    """Answer a slash command through its `response_url` (valid 30 minutes, five times).

    Slack answers `200 ok` (plain text); errors are 4xx with a short code (`expired_url`,
    `used_url`, `no_text`) and are permanent; 429 and 5xx are worth another try."""
    body = {"response_type": response_type, "text": clip(text), "replace_original": False}
    try:
        response = await http.post(response_url, json=body, headers={"Content-Type": JSON_CONTENT_TYPE})
    except httpx.HTTPError as exc:
        raise SlackApiError("response_url", f"transport: {type(exc).__name__}", status=599) from exc
    if response.status_code >= 300:
        error = response.text.strip()[:100] or f"http_{response.status_code}"
        raise SlackApiError(
            "response_url", error, status=response.status_code, retry_after=_retry_after(response)
        )
