"""Pull requests for harness changes that won an experiment (docs/optimizer.md#pull-requests).

A `harness.<key>` setting belongs to the spec a run works from, not to the defaults every run gets.
When such an experiment wins and a spec repository is configured, the optimizer proposes the
winning value as a pull request through the GitHub REST API: it reads the spec's harness file on
the default branch, creates a branch `fabrik/optimizer/<experiment id>`, commits the file with
`harness.<key>` set, and opens the pull request. The experiment ends as `shipped` with the pull
request's URL, and the defaults stay as they were.

Each step accepts its own earlier result (the branch exists, the value is committed, the pull
request is open): when the optimizer stops after opening the pull request but before recording
it, the experiment is still active, the next round decides SHIP again and finds the same pull
request instead of failing on the leftovers.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, Final

import httpx

from fabrik_common import experiments as ex
from fabrik_optimizer.settings import SpecRepository

log = logging.getLogger(__name__)

API_VERSION: Final = "2022-11-28"
HARNESS_PREFIX: Final = "harness."


class PullRequestError(Exception):
    """GitHub refused a step; the message says which and why."""


def harness_file(text: str | None, key: str, value: ex.OverrideValue) -> str:
    """The harness file with `harness.<key>` set to `value`, every other field and the order of
    the keys kept; a missing file becomes `{"harness": {key: value}}`. Written as the project's
    JSON documents are: two-space indentation, UTF-8 as is, a final newline."""
    document: Any = {} if text is None or not text.strip() else json.loads(text)
    if not isinstance(document, dict):
        raise PullRequestError("the harness file is not a JSON object")
    harness = document.get("harness")
    if harness is None:
        harness = document["harness"] = {}
    if not isinstance(harness, dict):
        raise PullRequestError("the harness file's `harness` is not a JSON object")
    harness[key] = value
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def spec_path(template: str, experiment: ex.Experiment) -> str | None:
    """The file to change, or None when the template needs a spec the target does not name."""
    if "{spec}" in template and experiment.target.spec is None:
        return None
    return template.format(spec=experiment.target.spec or "")


def pull_request_body(experiment: ex.Experiment, key: str, value: ex.OverrideValue, path: str) -> str:
    arm = experiment.winner or "-"
    numbers = experiment.numbers.get("arms", {}).get(arm, {})
    control = experiment.control.name

    def rate(name: str) -> str:
        found = numbers.get(f"{name}.success_rate")
        return "-" if found is None else f"{float(found):.3f}"

    lines = [
        f"The optimizer's experiment `{experiment.id}` ({experiment.name}) decided **SHIP**: "
        f"its arm `{arm}` sets `harness.{key}` to `{json.dumps(value)}`.",
        "",
        f"This pull request sets it in `{path}`; Fabrik's defaults were not changed.",
        "",
        "| | value |",
        "|---|---|",
        f"| experiment | `{experiment.id}` |",
        f"| decision | {experiment.decision or 'SHIP'} |",
        f"| parameter | `harness.{key}` |",
        f"| winner | `{arm}` = `{json.dumps(value)}` |",
    ]
    sizes = experiment.numbers.get("sample_sizes", {})
    for name, runs in sorted(sizes.items()):
        lines.append(f"| runs in `{name}` | {runs} |")
    lines.append(f"| success rate `{control}` / `{arm}` | {rate('control')} / {rate('treatment')} |")
    for name in ("estimate", "lower", "upper", "p_value"):
        found = numbers.get(f"primary.{name}")
        if found is not None:
            lines.append(f"| success rate difference {name} | {float(found):.4f} |")
    lines += ["", "Reasons:", *[f"- {reason}" for reason in experiment.reasons]]
    return "\n".join(lines) + "\n"


class SpecPullRequests:
    """Opens the pull request of a winning harness experiment (`propose` is the hook the
    experiments' evaluation calls on a SHIP)."""

    def __init__(self, config: SpecRepository, *, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.config.api_url,
            timeout=self.timeout,
            headers={
                "Authorization": f"Bearer {self.config.token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "fabrik-optimizer",
            },
        )

    async def propose(self, experiment: ex.Experiment) -> str | None:
        """The pull request's URL; None when the experiment's change does not go to the spec
        repository (not a harness parameter, or no target spec to name the file): it ships as any
        other. Raises `PullRequestError` when GitHub refuses a step."""
        if not experiment.parameter.startswith(HARNESS_PREFIX) or experiment.winner is None:
            return None
        arm = experiment.arm(experiment.winner)
        if arm is None or experiment.parameter not in arm.overrides:
            return None
        path = spec_path(self.config.path, experiment)
        if path is None:
            return None
        try:
            return await self.open(experiment, path, arm.overrides[experiment.parameter])
        except httpx.HTTPError as exc:
            raise PullRequestError(f"GitHub is not reachable: {exc!r}") from exc
        except ValueError as exc:  # the file is not JSON
            raise PullRequestError(f"{path} cannot be read as JSON: {exc}") from exc

    async def open(self, experiment: ex.Experiment, path: str, value: ex.OverrideValue) -> str:
        key = experiment.parameter.removeprefix(HARNESS_PREFIX)
        repo = f"/repos/{self.config.repository}"
        branch = f"fabrik/optimizer/{experiment.id.lower()}"
        async with self._client() as client:
            base = _json(await client.get(repo), "read the repository")["default_branch"]
            head = _json(await client.get(f"{repo}/git/ref/heads/{base}"), f"read the branch {base}")
            base_sha = head["object"]["sha"]
            created = await client.post(
                f"{repo}/git/refs", json={"ref": f"refs/heads/{branch}", "sha": base_sha}
            )
            if created.status_code == 422 and "already exists" in created.text:
                pass  # a previous round created it
            else:
                _json(created, f"create the branch {branch}")
            current = await client.get(f"{repo}/contents/{path}", params={"ref": branch})
            text: str | None = None
            sha: str | None = None
            if current.status_code != 404:
                found = _json(current, f"read {path}")
                text = base64.b64decode(found["content"]).decode("utf-8")
                sha = found["sha"]
            updated = harness_file(text, key, value)
            if updated != text:
                content: dict[str, Any] = {
                    "message": f"Set harness.{key} to {json.dumps(value)} (experiment {experiment.id})",
                    "content": base64.b64encode(updated.encode("utf-8")).decode("ascii"),
                    "branch": branch,
                }
                if sha is not None:
                    content["sha"] = sha
                _json(await client.put(f"{repo}/contents/{path}", json=content), f"commit {path}")
            opened = await client.post(
                f"{repo}/pulls",
                json={
                    "title": f"Optimizer: set harness.{key} to {json.dumps(value)}",
                    "head": branch,
                    "base": base,
                    "body": pull_request_body(experiment, key, value, path),
                },
            )
            if opened.status_code == 422 and "already exists" in opened.text:
                owner = self.config.repository.split("/")[0]
                listed = _json(
                    await client.get(f"{repo}/pulls", params={"head": f"{owner}:{branch}", "state": "open"}),
                    "find the open pull request",
                )
                if not listed:
                    raise PullRequestError(
                        f"GitHub says a pull request exists for {branch}, but none is open"
                    )
                return str(listed[0]["html_url"])
            url = str(_json(opened, "open the pull request")["html_url"])
        log.info("pull request opened", extra={"id": experiment.id, "url": url})
        return url


def _json(response: httpx.Response, step: str) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise PullRequestError(f"could not {step}: GitHub answered {response.status_code} {message}")
    return response.json()
