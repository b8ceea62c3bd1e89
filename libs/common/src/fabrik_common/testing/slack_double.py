"""A local HTTP double of Slack, for tests that talk to Slack the way production code does.

`SlackDouble` serves, on 127.0.0.1 (a free port), the subset of the Slack Web API that Fabrik uses,
with the semantics client code depends on, and plays Slack's own part of a slash command:

- Web API (`POST /api/<method>`, JSON `application/json; charset=utf-8` or form bodies):
  `chat.postMessage` (channel, text, `thread_ts`), `chat.update` (channel, ts, text) and
  `auth.test`. The bot token is checked (`Authorization: Bearer` or a `token` form field): none is
  `not_authed`, a wrong one `invalid_auth`. Answers are Slack's: HTTP 200 with `{"ok": true, ...}`
  or `{"ok": false, "error": ...}` (`channel_not_found`, `not_in_channel`, `is_archived`,
  `no_text`, `thread_not_found`, `message_not_found`, `cant_update_message`, `invalid_json`,
  `unknown_method`), `warning: missing_charset` for a JSON body without a charset, and a `ts` per
  message (increasing). A `thread_ts` must name a message of that channel (`thread_not_found`;
  the double is strict here so that a wrong `ts` is caught); a reply to a reply joins the parent's
  thread, as in Slack.
- `response_url`s (`POST /hooks/<id>`, from `new_response_url()` or a slash command): JSON
  `{"text", "response_type", ...}`; `200 ok` (plain text) as Slack answers; at most five uses
  (`used_url`), `expire()` makes one `expired_url`; no text is `no_text`; an unknown one `no_service`.
- Faults: `fail(method, error=..., status=..., retry_after=..., times=...)` makes the next calls
  of a method (or `"response_url"`) fail: `ok: false` with an error, or an HTTP status (429 with
  `Retry-After` and `{"ok": false, "error": "ratelimited"}`, 5xx).
- Slack's side of a slash command: `command_request(...)` builds the form body Slack sends and
  `signed_headers()` signs it (v0 scheme, `signing_secret`); `send_command(url, ...)` does both and
  posts it to an app.

Recorded for assertions: `calls` (every Web API call: method, headers, body, answer),
`channels[<id>].messages` (with `thread_ts`, edits), `responses[<id>]` (bodies posted to a
response_url), and `thread(channel, ts)`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web

from fabrik_common.testing.http_double import HttpDouble

MAX_RESPONSE_URL_USES = 5


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    thread_ts: str | None = None
    bot: bool = True
    edits: list[str] = field(default_factory=list)
    """Earlier texts, oldest first, when `chat.update` changed it."""
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Channel:
    id: str
    name: str
    member: bool = True
    archived: bool = False
    messages: list[Message] = field(default_factory=list)

    def find(self, ts: str) -> Message | None:
        return next((m for m in self.messages if m.ts == ts), None)


@dataclass
class ApiCall:
    method: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    answer: dict[str, Any]


@dataclass
class Fault:
    error: str | None = None
    status: int = 200
    retry_after: float | None = None


@dataclass
class CommandResult:
    status: int
    body: Any
    """The app's answer: JSON when it sent JSON, else the text."""
    response_id: str
    seconds: float


class SlackDouble(HttpDouble):
    def __init__(
        self,
        *,
        token: str = "xoxb-0000-double-token",  # noqa: S107 - a test double's fixed token
        signing_secret: str = "double-signing-secret-0123456789abcdef",  # noqa: S107
        team_id: str = "T0DOUBLE1",
        team_domain: str = "fabrik-double",
        bot_user_id: str = "U0FABRIKBOT",
        channels: tuple[str, ...] = ("C0GENERAL",),
    ) -> None:
        super().__init__()
        self.token = token
        self.signing_secret = signing_secret
        self.team_id = team_id
        self.team_domain = team_domain
        self.bot_user_id = bot_user_id
        self.channels: dict[str, Channel] = {}
        for channel_id in channels:
            self.add_channel(channel_id)
        self.calls: list[ApiCall] = []
        self.responses: dict[str, list[dict[str, Any]]] = {}
        self._response_meta: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._ts_counter = itertools.count(1)
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------------------- lifecycle

    @property
    def api_url(self) -> str:
        """What `FABRIK_SLACK_API_URL` should be."""
        return f"{self.url}/api"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_post("/hooks/{hook}", self._hook)
        return app

    # ------------------------------------------------------------------------------- controls

    def add_channel(
        self, channel_id: str, *, name: str | None = None, member: bool = True, archived: bool = False
    ) -> Channel:
        channel = Channel(channel_id, name or channel_id.lower(), member=member, archived=archived)
        self.channels[channel_id] = channel
        return channel

    def fail(
        self,
        method: str,
        *,
        error: str | None = None,
        status: int = 200,
        retry_after: float | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` (`chat.postMessage`, ..., or `response_url`) fail."""
        if status == 200 and error is None:
            raise ValueError("a fault needs an error or an HTTP status")
        queue = self._faults.setdefault(method, deque())
        for _ in range(times):
            queue.append(Fault(error=error, status=status, retry_after=retry_after))

    def new_response_url(self) -> str:
        hook = secrets.token_hex(8)
        self.responses[hook] = []
        self._response_meta[hook] = {"uses": 0, "expired": False}
        return f"{self.url}/hooks/{hook}"

    def expire(self, response_url: str) -> None:
        self._response_meta[response_url.rsplit("/", 1)[-1]]["expired"] = True

    def messages(self, channel: str) -> list[Message]:
        return list(self.channels[channel].messages)

    def parents(self, channel: str) -> list[Message]:
        """Messages at the channel's top level (not replies)."""
        return [m for m in self.channels[channel].messages if m.thread_ts is None]

    def thread(self, channel: str, ts: str) -> list[Message]:
        """The replies in the thread of message `ts`, in order."""
        return [m for m in self.channels[channel].messages if m.thread_ts == ts]

    def calls_of(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        """Wait until `predicate()` is true; it is checked after every request the double answers."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --------------------------------------------------------------------------- Slack's side of a command

    def command_request(
        self,
        text: str,
        *,
        user_id: str = "U0ALICE01",
        user_name: str = "alice",
        channel_id: str = "C0GENERAL",
        channel_name: str = "general",
        command: str = "/fabrik",
        trigger_id: str | None = None,
        response_url: str | None = None,
    ) -> tuple[bytes, str]:
        """The form body Slack sends for a slash command, and its response_url."""
        url = response_url or self.new_response_url()
        fields = {
            "token": "verification-token-unused",
            "team_id": self.team_id,
            "team_domain": self.team_domain,
            "channel_id": channel_id,
            "channel_name": channel_name,
            "user_id": user_id,
            "user_name": user_name,
            "command": command,
            "text": text,
            "api_app_id": "A0FABRIK1",
            "is_enterprise_install": "false",
            "response_url": url,
            "trigger_id": trigger_id
            or f"{secrets.randbelow(10**11)}.{secrets.randbelow(10**10)}.{secrets.token_hex(16)}",
        }
        return urlencode(fields).encode(), url

    def signed_headers(
        self, body: bytes, *, timestamp: float | None = None, secret: str | None = None
    ) -> dict[str, str]:
        ts = str(int(time.time() if timestamp is None else timestamp))
        base = f"v0:{ts}:".encode() + body
        digest = hmac.new((secret or self.signing_secret).encode(), base, hashlib.sha256).hexdigest()
        return {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": f"v0={digest}",
            "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
        }

    async def send_command(
        self,
        app_url: str,
        text: str,
        *,
        timestamp: float | None = None,
        secret: str | None = None,
        retry_num: int | None = None,
        body: bytes | None = None,
        response_url: str | None = None,
        **fields: Any,
    ) -> CommandResult:
        """Post a signed slash command to `app_url`, as Slack does (it gives up after 3 s)."""
        if body is None:
            body, response_url = self.command_request(text, response_url=response_url, **fields)
        else:
            response_url = response_url or dict(parse_qsl(body.decode())).get("response_url", "")
        headers = self.signed_headers(body, timestamp=timestamp, secret=secret)
        if retry_num is not None:
            headers["X-Slack-Retry-Num"] = str(retry_num)
            headers["X-Slack-Retry-Reason"] = "http_timeout"
        started = time.monotonic()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3.0)) as session,
            session.post(app_url, data=body, headers=headers) as response,
        ):
            raw = await response.read()
            elapsed = time.monotonic() - started
            try:
                answer: Any = json.loads(raw) if raw else None
            except ValueError:
                answer = raw.decode(errors="replace")
            return CommandResult(response.status, answer, (response_url or "").rsplit("/", 1)[-1], elapsed)

    # ------------------------------------------------------------------------------- the Web API

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        raw = await request.read()
        content_type = request.headers.get("Content-Type", "")
        warnings: list[str] = []
        body: dict[str, Any]
        if content_type.startswith("application/json"):
            if "charset" not in content_type.lower():
                warnings.append("missing_charset")
            try:
                parsed = json.loads(raw or b"{}")
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return await self._answer(method, request, {}, {"ok": False, "error": "invalid_json"})
            body = parsed
        else:
            body = dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True))
        fault = self._take_fault(method)
        if fault is not None:
            return await self._fault(method, request, body, fault)
        token = body.get("token") if isinstance(body.get("token"), str) else None
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :]
        if not token:
            return await self._answer(method, request, body, {"ok": False, "error": "not_authed"})
        if not hmac.compare_digest(token, self.token):
            return await self._answer(method, request, body, {"ok": False, "error": "invalid_auth"})
        handler = {
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "auth.test": self._auth_test,
        }.get(method)
        answer = handler(body) if handler is not None else {"ok": False, "error": "unknown_method"}
        if warnings and answer.get("ok"):
            answer["warning"] = ",".join(warnings)
            answer["response_metadata"] = {"warnings": warnings}
        return await self._answer(method, request, body, answer)

    def _take_fault(self, method: str) -> Fault | None:
        queue = self._faults.get(method)
        return queue.popleft() if queue else None

    async def _fault(
        self, method: str, request: web.Request, body: dict[str, Any], fault: Fault
    ) -> web.Response:
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        error = fault.error or ("ratelimited" if fault.status == 429 else f"http_{fault.status}")
        return await self._answer(method, request, body, {"ok": False, "error": error}, fault.status, headers)

    async def _answer(
        self,
        method: str,
        request: web.Request,
        body: dict[str, Any],
        answer: dict[str, Any],
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self.calls.append(ApiCall(method, dict(request.headers), body, status, answer))
        await self._notify()
        return web.json_response(answer, status=status, headers=headers)

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts_counter):06d}"

    def _channel(self, body: dict[str, Any]) -> Channel | dict[str, Any]:
        channel = self.channels.get(str(body.get("channel", "")))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        if channel.archived:
            return {"ok": False, "error": "is_archived"}
        if not channel.member:
            return {"ok": False, "error": "not_in_channel"}
        return channel

    def _post_message(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(body)
        if not isinstance(channel, Channel):
            return channel
        text = body.get("text")
        if not text and not body.get("blocks") and not body.get("attachments"):
            return {"ok": False, "error": "no_text"}
        thread_ts = body.get("thread_ts") or None
        if thread_ts is not None:
            parent = channel.find(str(thread_ts))
            if parent is None:
                return {"ok": False, "error": "thread_not_found"}
            thread_ts = parent.thread_ts or parent.ts  # a reply to a reply joins the thread
        message = Message(channel.id, self._next_ts(), str(text or ""), thread_ts, body=body)
        channel.messages.append(message)
        shown: dict[str, Any] = {
            "type": "message",
            "text": message.text,
            "user": self.bot_user_id,
            "ts": message.ts,
        }
        if thread_ts is not None:
            shown["thread_ts"] = thread_ts
        return {"ok": True, "channel": channel.id, "ts": message.ts, "message": shown}

    def _update(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(body)
        if not isinstance(channel, Channel):
            return channel
        message = channel.find(str(body.get("ts", "")))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if not message.bot:
            return {"ok": False, "error": "cant_update_message"}
        text = body.get("text")
        if not text and not body.get("blocks") and not body.get("attachments"):
            return {"ok": False, "error": "no_text"}
        message.edits.append(message.text)
        message.text = str(text or "")
        return {"ok": True, "channel": channel.id, "ts": message.ts, "text": message.text}

    def _auth_test(self, _body: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": f"https://{self.team_domain}.slack.com/",
            "team": self.team_domain,
            "user": "fabrik",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": "B0FABRIK1",
        }

    # ------------------------------------------------------------------------------- response_url

    async def _hook(self, request: web.Request) -> web.Response:
        hook = request.match_info["hook"]
        raw = await request.read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        fault = self._take_fault("response_url")
        try:
            if fault is not None:
                headers = (
                    {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else None
                )
                return web.Response(
                    status=fault.status if fault.status != 200 else 500,
                    text=fault.error or "service_unavailable",
                    headers=headers,
                )
            meta = self._response_meta.get(hook)
            if meta is None:
                return web.Response(status=404, text="no_service")
            if meta["expired"]:
                return web.Response(status=404, text="expired_url")
            if meta["uses"] >= MAX_RESPONSE_URL_USES:
                return web.Response(status=404, text="used_url")
            if not isinstance(body, dict):
                return web.Response(status=400, text="invalid_payload")
            if not body.get("text") and not body.get("blocks"):
                return web.Response(status=400, text="no_text")
            meta["uses"] += 1
            self.responses[hook].append(body)
            return web.Response(status=200, text="ok", content_type="text/html")
        finally:
            await self._notify()
