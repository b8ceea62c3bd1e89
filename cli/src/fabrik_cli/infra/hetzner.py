"""The `hcloud` client as `fabrik infra` uses it: retries that honour the API's rate limit.

The library retries `rate_limit_exceeded` itself with a blind jittered backoff and does not expose
the response headers. We replace the request method of the client's transport (the `ClientBase`
every resource client shares) with one that, on a 429, waits until `RateLimit-Reset` (a UNIX
timestamp) — but never longer than the current backoff step (1 s doubling, capped at 32 s),
because the bucket refills one request per second and the reset is when it is *full* again — and
retries up to `max_retries` times. 502/504 and the codes `conflict`, `timeout`, `bad_gateway` are
retried with the same backoff. Anything else surfaces as `hcloud.APIException`.

A create whose answer was lost (a 504 after the API did the work) is retried and then meets
`uniqueness_error`; `fabrik_cli.infra.cluster` adopts the existing resource when it carries our
labels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import requests
from hcloud import APIException, Client

DEFAULT_ENDPOINT: Final = "https://api.hetzner.cloud/v1"
ENV_TOKEN: Final = "HCLOUD_TOKEN"  # noqa: S105 - the variable's name (the hcloud CLI's own)
ENV_ENDPOINT: Final = "FABRIK_HCLOUD_ENDPOINT"
ENV_POLL: Final = "FABRIK_HCLOUD_POLL_INTERVAL"
TOKEN_FILE_NAME: Final = "hcloud-token"  # noqa: S105 - a file name
RETRIED_CODES: Final = frozenset({"rate_limit_exceeded", "conflict", "timeout", "bad_gateway"})
RETRIED_STATUS: Final = frozenset({429, 502, 503, 504})
TRANSPORT_ATTRIBUTES: Final = ("_session", "_endpoint", "_headers", "_timeout", "_read_response")


class TokenMissingError(Exception):
    pass


@dataclass
class RetryPolicy:
    base: float = 1.0
    cap: float = 32.0
    max_retries: int = 6
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    waits: list[float] = field(default_factory=list)

    def step(self, attempt: int) -> float:
        return float(min(self.cap, self.base * 2**attempt))

    def wait_for(self, attempt: int, response: requests.Response) -> float:
        step = self.step(attempt)
        reset = response.headers.get("RateLimit-Reset")
        if response.status_code == 429 and reset is not None:
            try:
                until = float(reset) - self.clock()
            except ValueError:
                return step
            return max(0.05, min(until, step))
        return step


def _code(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", ""))
    return ""


def install_retries(client: Client, policy: RetryPolicy) -> None:
    """Route every request of `client` through `policy` (see the module's docstring)."""
    base = client._client  # the transport every resource client of hcloud 2.x shares
    missing = [name for name in TRANSPORT_ATTRIBUTES if not hasattr(base, name)]
    if missing:
        raise RuntimeError(
            f"this hcloud version's transport lacks {', '.join(missing)}; fabrik infra supports hcloud 2.x"
        )

    def request(method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("timeout", base._timeout)
        attempt = 0
        while True:
            try:
                response = base._session.request(
                    method=method,
                    url=base._endpoint + url,
                    headers=base._headers,
                    **kwargs,
                )
            except requests.exceptions.Timeout:
                if attempt >= policy.max_retries:
                    raise
                wait = policy.step(attempt)
            else:
                retry = response.status_code in RETRIED_STATUS or (
                    response.status_code >= 400 and _code(response) in RETRIED_CODES
                )
                if not retry or attempt >= policy.max_retries:
                    return base._read_response(response)
                wait = policy.wait_for(attempt, response)
            policy.waits.append(wait)
            policy.sleep(wait)
            attempt += 1

    base.request = request  # type: ignore[method-assign]


def config_dir(environ: Mapping[str, str]) -> Path:
    """Where `fabrik init` keeps the CLI's configuration (as `fabrik login`'s credentials)."""
    from fabrik_cli.credentials import credentials_file

    return credentials_file(environ).parent


def find_token(environ: Mapping[str, str]) -> str:
    """`$HCLOUD_TOKEN`, else the file `fabrik init` wrote (`<config dir>/hcloud-token`)."""
    if environ.get(ENV_TOKEN):
        return environ[ENV_TOKEN].strip()
    path = config_dir(environ) / TOKEN_FILE_NAME
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise TokenMissingError(
            f"no Hetzner Cloud API token: set ${ENV_TOKEN} (a read & write token of the project, "
            f"Hetzner Console > Security > API tokens) or run `fabrik init` to store it in {path}"
        )
    return token


def connect(
    environ: Mapping[str, str] | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    poll_interval: float | None = None,
    policy: RetryPolicy | None = None,
    page_size: int | None = None,
) -> Client:
    env = os.environ if environ is None else environ
    token = token if token is not None else find_token(env)
    endpoint = endpoint or env.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT
    if poll_interval is None:
        poll_interval = float(env.get(ENV_POLL, "1.0"))
    client = Client(
        token,
        api_endpoint=endpoint,
        application_name="fabrik",
        poll_interval=poll_interval,
        poll_max_retries=max(10, int(600 / max(poll_interval, 0.001))),
        timeout=30,
    )
    install_retries(client, policy or RetryPolicy())
    if page_size is not None:
        for resource in (client.servers, client.networks, client.firewalls, client.load_balancers):
            resource.max_per_page = page_size
        client.ssh_keys.max_per_page = page_size
        client.volumes.max_per_page = page_size
    return client


def check_token(client: Client) -> str:
    """A cheap authenticated call; "" when the token works, else the reason."""
    try:
        client.locations.get_list(page=1, per_page=1)
    except APIException as exc:
        if exc.code == "unauthorized":
            return "the API refused the token (unauthorized): create a read & write token for the project"
        return f"the API answered {exc.code}: {exc.message}"
    except requests.exceptions.RequestException as exc:
        return f"cannot reach the Hetzner Cloud API: {exc}"
    return ""
