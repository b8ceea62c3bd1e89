"""A small synchronous client of the gateway's REST API (`/api/v1`), over httpx.

Where the API is (first match wins):

1. `--api URL` on the command line,
2. `$FABRIK_API_URL`,
3. `api_url` in the config.yaml `fabrik init` writes (`fabrik_cli.userconfig`),
4. the gateway of the local stack, from the state file `fabrik up` writes (`<data>/stack.json`,
   data directory as for `fabrik up`: `$FABRIK_HOME`, `$XDG_DATA_HOME/fabrik`, ...),
5. `http://127.0.0.1:8080`.

A URL may be given with or without the `/api/v1` suffix. The bearer credential is `$FABRIK_TOKEN`,
else the one `fabrik login` stored for that URL (`fabrik_cli.credentials`), else the token in
config.yaml's `token_file`, else none. Reads,
and submits (which always carry an `Idempotency-Key`), are retried a few times while the gateway
answers 502/503/504; cancel and resume are sent once.

Error answers (RFC 9457 `application/problem+json`) become `ApiError`s that print the problem
readably, one `field: rule` line per invalid field (a 401 or 403 also says which credential was
sent and how to log in); a connection failure becomes
`ApiUnreachableError`, whose message says how to start the local stack or point elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from fabrik_cli.credentials import ENV_TOKEN, Credential, CredentialStore, resolve_credential
from fabrik_cli.errors import EXIT_FAILURE, EXIT_USAGE, CliError, field_lines
from fabrik_cli.local import StackError, StackPaths, default_data_dir, read_state
from fabrik_cli.sse import ServerSentEvent, SseParser
from fabrik_cli.userconfig import load_user_config

DEFAULT_API_URL = "http://127.0.0.1:8080"
API_PREFIX = "/api/v1"
ENV_API_URL = "FABRIK_API_URL"
DEFAULT_TIMEOUT = 15.0
RETRIES = 3
RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 5.0
REBUILD_TIMEOUT = 960.0
"""`fabrik analytics rebuild` waits this long: longer than the gateway's own wait for the optimizer
(`FABRIK_OPTIMIZER_REBUILD_TIMEOUT_SECONDS`, 900 s), so that its answer arrives."""
STREAM_READ_TIMEOUT = 60.0
"""Longest silence on a log stream before it counts as broken (the gateway sends a heartbeat
comment every 15 s by default)."""


def _user_agent() -> str:
    try:
        return f"fabrik-cli/{version('fabrik-cli')}"
    except PackageNotFoundError:  # pragma: no cover - always installed in the workspace
        return "fabrik-cli"


# --------------------------------------------------------------------------------------------
# Where the API is


@dataclass(frozen=True)
class ApiTarget:
    """The gateway's base URL (without `/api/v1`) and where that URL came from."""

    url: str
    source: str

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX


def normalize_base_url(url: str) -> str:
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    return text.removesuffix(API_PREFIX).rstrip("/")


def local_stack_url(environ: Mapping[str, str] | None = None) -> tuple[str, Path] | None:
    """The gateway URL recorded by `fabrik up` in the default data directory, if there is one."""
    paths = StackPaths(default_data_dir(environ).expanduser().absolute())
    try:
        state = read_state(paths.state_file)
    except (StackError, OSError):
        return None
    if state is None:
        return None
    gateway = state.services.get("gateway")
    if gateway is None or not gateway.url:
        return None
    return gateway.url, paths.state_file


def resolve_api_target(api: str | None, environ: Mapping[str, str] | None = None) -> ApiTarget:
    env = os.environ if environ is None else environ
    if api:
        return ApiTarget(normalize_base_url(api), "--api")
    if env.get(ENV_API_URL):
        return ApiTarget(normalize_base_url(env[ENV_API_URL]), f"${ENV_API_URL}")
    config = load_user_config(env)
    if config.api_url:
        return ApiTarget(normalize_base_url(config.api_url), f"api_url in {config.path}")
    local = local_stack_url(env)
    if local is not None:
        url, state_file = local
        return ApiTarget(normalize_base_url(url), f"the local stack's state file {state_file}")
    return ApiTarget(DEFAULT_API_URL, "the built-in default")


# --------------------------------------------------------------------------------------------
# Errors


class ApiError(CliError):
    """The API answered with an error status. `problem` is the RFC 9457 body when there is one."""

    def __init__(
        self,
        status: int,
        *,
        method: str,
        url: str,
        problem: Mapping[str, Any] | None = None,
        body: str = "",
        reason: str = "",
        credential: Credential | None = None,
        target: ApiTarget | None = None,
    ) -> None:
        self.status = status
        self.credential = credential
        self.target = target
        self.method = method
        self.url = url
        self.problem = dict(problem) if problem is not None else None
        self.body = body
        self.errors = _field_errors(self.problem)
        exit_code = EXIT_USAGE if status in (400, 422) else EXIT_FAILURE
        super().__init__(self._message(reason), self._details(), exit_code=exit_code)

    @property
    def title(self) -> str:
        return str((self.problem or {}).get("title") or "")

    @property
    def detail(self) -> str:
        return str((self.problem or {}).get("detail") or "")

    def _message(self, reason: str) -> str:
        head = f"{self.title or reason or 'HTTP error'} ({self.status})"
        if self.problem is not None:
            return f"{head}: {self.detail}" if self.detail else head
        snippet = " ".join(self.body.split())[:200]
        where = f"{self.method} {self.url}"
        return f"{head} from {where}" + (f": {snippet}" if snippet else "")

    def name_flags(self, flag_for: Callable[[str], str | None]) -> None:
        """Add to each invalid field the command-line option that sets it: `cpu: ... (--cpu)`."""
        self.details = [
            line + (f" ({flag})" if (flag := flag_for(field)) else "")
            for line, (field, _) in zip(self.details, self.errors, strict=False)
        ] + self.details[len(self.errors) :]

    def _details(self) -> list[str]:
        lines = field_lines(self.errors)
        if self.status == 401:
            lines.extend(self._unauthorized_hint())
        elif self.status == 403:
            lines.extend(self._forbidden_hint())
        return lines

    def _login_command(self) -> str:
        if self.target is not None and self.target.source == "--api":
            return f"`fabrik login --api {self.target.url}`"
        return "`fabrik login`"

    def _unauthorized_hint(self) -> list[str]:
        login = self._login_command()
        credential = self.credential
        if credential is None:
            where = f"the API at {self.target.url}" if self.target is not None else "the API"
            return [
                f"{where} wants a credential: log in with {login}, or set ${ENV_TOKEN} to an API "
                "token or a JWT"
            ]
        if credential.source == "env":
            return [
                f"the token in ${ENV_TOKEN} was refused: set a valid one, or unset it to use the "
                f"credential {login} stores"
            ]
        if credential.source == "file":
            return [
                f"the credential stored by `fabrik login` ({credential.path}) was refused: log in again "
                f"with {login}, or set ${ENV_TOKEN}"
            ]
        if credential.source == "config":
            return [
                f"the token in {credential.path} (token_file of `fabrik init`'s config.yaml) was refused: "
                f"write a valid one there, log in with {login}, or set ${ENV_TOKEN}"
            ]
        return ["the token given was refused"]

    def _forbidden_hint(self) -> list[str]:
        if self.credential is None:
            return [
                f"anonymous callers may not do this: log in with {self._login_command()}, or set ${ENV_TOKEN}"
            ]
        return [
            f"the credential ({self.credential.describe()}) is not allowed to do this; "
            "`fabrik whoami` shows its roles"
        ]


def _field_errors(problem: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    raw = (problem or {}).get("errors")
    if not isinstance(raw, list):
        return []
    errors: list[tuple[str, str]] = []
    for item in raw:
        if isinstance(item, Mapping):
            errors.append((str(item.get("field") or "$"), str(item.get("rule") or item.get("message") or "")))
        else:
            errors.append(("$", str(item)))
    return errors


class ApiUnreachableError(CliError):
    """No answer from the API at all: nothing listening, a wrong URL, a timeout."""

    def __init__(self, target: ApiTarget, reason: str) -> None:
        self.target = target
        self.reason = reason
        details = [
            f"(API URL from {target.source})",
            "Is the local stack running? Start it with `fabrik up` (and check it with `fabrik status`),",
            f"or point to another API with --api URL or ${ENV_API_URL}.",
        ]
        super().__init__(f"cannot reach the Fabrik API at {target.url}: {reason}", details)


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "refused" in text.lower() or "errno 111" in text.lower() or "errno 61" in text.lower():
            return "connection refused"
        return text or "cannot connect"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# The client


def run_path(run_id: str, *rest: str) -> str:
    return "/".join(["/runs", quote(run_id, safe=""), *rest])


QueryValue = str | int | float | bool | None
Params = Sequence[tuple[str, QueryValue]]


class ApiClient:
    """One HTTP connection pool to the API; use as a context manager."""

    def __init__(
        self,
        target: ApiTarget,
        *,
        token: str | None = None,
        credential: Credential | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`credential` is the bearer credential with its origin (for the hints of a 401/403);
        a bare `token` counts as given on the command line."""
        self.target = target
        self._sleep = sleep
        if credential is None and token:
            credential = Credential(token, "option")
        self.credential = credential
        headers = {"User-Agent": _user_agent(), "Accept": "application/json, application/problem+json"}
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential.token}"
        self._http = httpx.Client(
            base_url=target.api_url, headers=headers, timeout=timeout, transport=transport
        )

    @classmethod
    def from_env(cls, api: str | None, environ: Mapping[str, str] | None = None) -> ApiClient:
        """The API from `--api` and the environment; the credential `$FABRIK_TOKEN`, else the one
        stored by `fabrik login` for that API (a warning on stderr if its file is readable by
        others)."""
        env = os.environ if environ is None else environ
        target = resolve_api_target(api, env)
        credential = resolve_credential(target.url, env)
        if credential is None:
            config = load_user_config(env)
            token = config.token()
            if token is not None:
                credential = Credential(token, "config", config.token_path())
        if credential is not None and credential.path is not None:
            warning = CredentialStore(credential.path).loose_permissions()
            if warning:
                print(f"Warning: {warning}", file=sys.stderr)
        return cls(target, credential=credential)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The decoded JSON answer (None for an empty one); raises ApiError or ApiUnreachableError.

        A request that is safe to repeat (GETs by default) is retried `retries` times when the
        gateway is momentarily unavailable (502/503/504, honouring `Retry-After`) or the
        connection broke mid-way; a refused connection is reported at once.
        """
        if retries is None:
            retries = RETRIES if method == "GET" else 0
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method,
                    path,
                    params=list(params) if params else None,
                    json=json_body,
                    headers=dict(headers) if headers else None,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                if attempt < retries and not isinstance(exc, httpx.ConnectError):
                    attempt += 1
                    self._sleep(RETRY_DELAY)
                    continue
                raise ApiUnreachableError(self.target, _describe_transport_error(exc)) from exc
            if response.status_code in RETRY_STATUSES and attempt < retries:
                attempt += 1
                self._sleep(_retry_after(response))
                continue
            if response.status_code >= 400:
                raise self._error(response)
            return _decode(response)

    def _error(self, response: httpx.Response) -> ApiError:
        return _api_error(response, credential=self.credential, target=self.target)

    # -- runs ----------------------------------------------------------------------------------

    def submit_run(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Any:
        """Submit with an `Idempotency-Key` (a fresh one when none is given), which makes the
        submit safe to retry: a retry returns the run the first attempt created."""
        key = idempotency_key or f"fabrik-cli-{uuid.uuid4()}"
        return self.request(
            "POST", "/runs", json_body=dict(body), headers={"Idempotency-Key": key}, retries=RETRIES
        )

    def list_runs(
        self,
        *,
        project: str | None = None,
        states: Sequence[str] = (),
        labels: Sequence[str] = (),
        limit: int | None = None,
        cursor: str | None = None,
        healths: Sequence[str] = (),
    ) -> Any:
        params: list[tuple[str, QueryValue]] = []
        if project:
            params.append(("project", project))
        params.extend(("state", s) for s in states)
        if healths:
            params.append(("health", ",".join(healths)))
        params.extend(("label", label) for label in labels)
        if limit is not None:
            params.append(("limit", limit))
        if cursor:
            params.append(("cursor", cursor))
        return self.request("GET", "/runs", params=params)

    def iter_run_pages(
        self,
        *,
        project: str | None = None,
        states: Sequence[str] = (),
        labels: Sequence[str] = (),
        limit: int | None = None,
        cursor: str | None = None,
        healths: Sequence[str] = (),
    ) -> Iterator[Mapping[str, Any]]:
        """Every page, following `next_cursor` until it is null."""
        seen: set[str] = set()
        while True:
            page = self.list_runs(
                project=project, states=states, labels=labels, limit=limit, cursor=cursor, healths=healths
            )
            if not isinstance(page, Mapping):
                raise CliError(f"unexpected answer to GET {API_PREFIX}/runs: {json.dumps(page)[:200]}")
            yield page
            cursor = page.get("next_cursor")
            if not cursor or cursor in seen:
                return
            seen.add(cursor)

    def get_run(self, run_id: str) -> Any:
        return self.request("GET", run_path(run_id))

    def cancel_run(self, run_id: str, *, reason: str | None = None) -> Any:
        body = {"reason": reason} if reason else None
        return self.request("POST", run_path(run_id, "cancel"), json_body=body)

    def resume_run(self, run_id: str) -> Any:
        return self.request("POST", run_path(run_id, "resume"))

    def run_events(self, run_id: str, *, after: str | None = None, limit: int | None = None) -> Any:
        params: list[tuple[str, QueryValue]] = []
        if after:
            params.append(("after", after))
        if limit is not None:
            params.append(("limit", limit))
        return self.request("GET", run_path(run_id, "events"), params=params)

    def run_logs(self, run_id: str, *, tail: int | None = None) -> Any:
        params: list[tuple[str, QueryValue]] = [("tail", tail)] if tail is not None else []
        return self.request("GET", run_path(run_id, "logs"), params=params)

    def stream_logs(
        self,
        run_id: str,
        *,
        tail: int | None = None,
        last_event_id: str | None = None,
        parser: SseParser | None = None,
    ) -> Iterator[ServerSentEvent]:
        """`GET /runs/{id}/logs?follow=true` as server-sent events, until the server ends it."""
        params: list[tuple[str, QueryValue]] = [("follow", "true")]
        if tail is not None:
            params.append(("tail", tail))
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=STREAM_READ_TIMEOUT)
        parser = parser or SseParser()
        try:
            with self._http.stream(
                "GET", run_path(run_id, "logs"), params=params, headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise ApiUnreachableError(self.target, _describe_transport_error(exc)) from exc

    # -- the rest --------------------------------------------------------------------------------

    def queue(self, *, project: str | None = None, limit: int | None = None) -> Any:
        params: list[tuple[str, QueryValue]] = []
        if project:
            params.append(("project", project))
        if limit is not None:
            params.append(("limit", limit))
        return self.request("GET", "/queue", params=params)

    def projects(self) -> Any:
        return self.request("GET", "/projects")

    # -- access: the caller, API tokens, the audit trail -----------------------------------------

    def whoami(self) -> Any:
        return self.request("GET", "/whoami")

    def create_token(self, body: Mapping[str, Any]) -> Any:
        """Sent once: a retry could create a second token."""
        return self.request("POST", "/tokens", json_body=dict(body))

    def list_tokens(self) -> Any:
        return self.request("GET", "/tokens")

    def get_token(self, token_id: str) -> Any:
        return self.request("GET", f"/tokens/{quote(token_id, safe='')}")

    def revoke_token(self, token_id: str) -> Any:
        """Idempotent on the gateway (revoking twice answers the revoked token), so retried."""
        return self.request("DELETE", f"/tokens/{quote(token_id, safe='')}", retries=RETRIES)

    def audit(self, params: Params, *, after: str | None = None, limit: int | None = None) -> Any:
        query = [(k, v) for k, v in params if v is not None and v != ""]
        if after:
            query.append(("after", after))
        if limit is not None:
            query.append(("limit", limit))
        return self.request("GET", "/audit", params=query)

    def iter_audit_pages(
        self, params: Params, *, after: str | None = None, limit: int | None = None
    ) -> Iterator[Mapping[str, Any]]:
        """Every page, following `next_cursor` (as `after`) until it is null."""
        seen: set[str] = set()
        while True:
            page = self.audit(params, after=after, limit=limit)
            if not isinstance(page, Mapping):
                raise CliError(f"unexpected answer to GET {API_PREFIX}/audit: {json.dumps(page)[:200]}")
            yield page
            after = page.get("next_cursor")
            if not after or after in seen:
                return
            seen.add(after)

    # -- costs, budgets, run analytics (answered by the optimizer through the gateway) -----------

    def costs(
        self,
        *,
        group_by: str | None = None,
        since: str | None = None,
        until: str | None = None,
        project: str | None = None,
    ) -> Any:
        params: list[tuple[str, QueryValue]] = [
            (k, v)
            for k, v in (("group_by", group_by), ("from", since), ("to", until), ("project", project))
            if v
        ]
        return self.request("GET", "/costs", params=params)

    def budgets(self, *, project: str | None = None, period: str | None = None) -> Any:
        params: list[tuple[str, QueryValue]] = [
            (k, v) for k, v in (("project", project), ("period", period)) if v
        ]
        return self.request("GET", "/budgets", params=params)

    def set_budget(self, body: Mapping[str, Any]) -> Any:
        """A PUT of the whole budget: repeating it changes nothing more, so it is retried."""
        return self.request("PUT", "/budgets", json_body=dict(body), retries=RETRIES)

    def insights(
        self, *, project: str | None = None, min_runs: int | None = None, top: int | None = None
    ) -> Any:
        params: list[tuple[str, QueryValue]] = [
            (k, v) for k, v in (("project", project), ("min_runs", min_runs), ("top", top)) if v is not None
        ]
        return self.request("GET", "/analytics/insights", params=params)

    def rebuild_analytics(self) -> Any:
        """Sent once, and waited for long: the answer comes when the rebuild is done."""
        return self.request("POST", "/analytics/rebuild", timeout=REBUILD_TIMEOUT)

    # -- backups (answered by the backup service through the gateway) -------------------------

    def create_backup(self, body: Mapping[str, Any]) -> Any:
        """Sent once: a retry could start a second backup."""
        return self.request("POST", "/backups", json_body=dict(body))

    def list_backups(self, *, operations: int | None = None) -> Any:
        params: list[tuple[str, QueryValue]] = [("operations", operations)] if operations is not None else []
        return self.request("GET", "/backups", params=params)

    def get_backup(self, backup_id: str) -> Any:
        return self.request("GET", "/backups/" + quote(backup_id, safe=""))

    def backup_operations(self, *, limit: int | None = None) -> Any:
        params: list[tuple[str, QueryValue]] = [("limit", limit)] if limit is not None else []
        return self.request("GET", "/backups/operations", params=params)

    def backup_operation(self, operation_id: str) -> Any:
        return self.request("GET", "/backups/operations/" + quote(operation_id, safe=""))

    def verify_backup(self, backup_id: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", f"/backups/{quote(backup_id, safe='')}/verify", json_body=dict(body))

    def restore_backup(self, body: Mapping[str, Any]) -> Any:
        """`POST /restores`: by `backup_id` or `at`."""
        return self.request("POST", "/restores", json_body=dict(body))

    def cancel_backup_operation(self, operation_id: str) -> Any:
        return self.request("POST", f"/backups/operations/{quote(operation_id, safe='')}/cancel")

    def delete_backup(self, backup_id: str) -> Any:
        return self.request("DELETE", "/backups/" + quote(backup_id, safe=""))

    def prune_backups(self, *, dry_run: bool) -> Any:
        return self.request("POST", "/backups/prune", json_body={"dry_run": dry_run})

    def backup_schedule(self) -> Any:
        return self.request("GET", "/backups/schedule")


def _retry_after(response: httpx.Response) -> float:
    text = response.headers.get("Retry-After", "")
    try:
        seconds = float(text)
    except ValueError:
        seconds = RETRY_DELAY
    return min(max(seconds, 0.1), MAX_RETRY_DELAY)


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    content_type = response.headers.get("content-type", "")
    if "json" in content_type:
        return response.json()
    try:
        return response.json()
    except ValueError:
        return response.text


def _api_error(
    response: httpx.Response, *, credential: Credential | None = None, target: ApiTarget | None = None
) -> ApiError:
    problem: Mapping[str, Any] | None = None
    text = ""
    try:
        text = response.text
        decoded = response.json()
    except ValueError:
        decoded = None
    if isinstance(decoded, Mapping) and ("title" in decoded or "detail" in decoded or "errors" in decoded):
        problem = decoded
    return ApiError(
        response.status_code,
        method=response.request.method,
        url=str(response.request.url),
        problem=problem,
        body=text,
        reason=response.reason_phrase,
        credential=credential,
        target=target,
    )
