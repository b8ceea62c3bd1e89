"""A local HTTP double of the GitHub REST API subset Fabrik uses, for tests of real clients.

`GithubDouble` serves on 127.0.0.1 (a free port) with the semantics client code depends on, so the
same code runs against it and against api.github.com:

- authentication: GitHub App JWTs (RS256, verified with the App's public key: `iss` = App id,
  `exp` at most 10 minutes after `iat`, not expired, `iat` not in the future) for
  `POST /app/installations/{id}/access_tokens`, which issues installation tokens (`ghs_...`, one
  hour, scoped to the installation's repositories); plain tokens (`add_token`) for the rest.
  No authorization is `401 Requires authentication`; an unknown or expired token (an App JWT on a
  repository endpoint included) is `401 Bad credentials`;
- check runs (`POST /repos/{o}/{r}/check-runs`, `PATCH`/`GET .../check-runs/{id}`,
  `GET .../commits/{ref}/check-runs`) only with an installation token (a plain token gets
  `403 Resource not accessible by personal access token`), with GitHub's validation: `name`,
  a `head_sha` that is a commit of the repository, `status`, a `conclusion` when completed (a
  conclusion completes the run), an http(s) `details_url`, `output.title` and `output.summary`
  (at most 65535 characters), ISO 8601 times;
- commit statuses (`POST .../statuses/{sha}`: `state` one of error, failure, pending, success;
  `description` at most 140 characters), issue comments (`POST`/`GET .../issues/{n}/comments`),
  reactions on issue comments (201 new, 200 existing), collaborator permissions, pull requests,
  commits by branch or sha;
- repository contents, branches and pull requests as a client changes them: `GET /repos/{o}/{r}`,
  `GET .../git/ref/heads/{branch}`, `POST .../git/refs` (422 `Reference already exists`, 422
  `Object does not exist` for an unknown sha), `GET .../contents/{path}?ref=` (base64 content and
  the blob sha; 404 for a missing file or ref), `PUT .../contents/{path}` (201 created, 200
  updated; 422 when `sha` is missing for an existing file, 409 when it is not the file's sha, 404
  for an unknown branch), `POST .../pulls` (201; 422 `Validation Failed` for an unknown head or
  base, an open pull request of the same head, or no commits between them) and
  `GET .../pulls?state=&head=owner:branch`;
- every request needs a `User-Agent` (403 otherwise, as GitHub), an `X-GitHub-Api-Version` (when
  sent) GitHub knows (400 otherwise); bodies must be JSON objects (400 `Problems parsing JSON`);
  validation errors are 422 with `errors`; answers carry `x-ratelimit-*` headers.

Test controls: `add_repo`, `add_commit`, `add_file`, `file_at`, `add_pull`, `add_issue`, `add_issue_comment`,
`set_permission`, `add_installation`, `add_token`, `fail(method, path_regex, status, ...)`
(injected failures, e.g. 502 or a rate limit), `delay(method, path_regex, seconds)`,
`expire_tokens()`, and the records `calls`, `check_runs` (each with its `history` of states),
`statuses`, `comments`, `reactions`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fabrik_common.testing.http_double import HttpDouble

Obj = dict[str, Any]

API_VERSIONS = frozenset({"2022-11-28", "2026-03-10"})
CHECK_STATUSES = frozenset({"queued", "in_progress", "completed", "waiting", "requested", "pending"})
CHECK_CONCLUSIONS = frozenset(
    {"action_required", "cancelled", "failure", "neutral", "success", "skipped", "stale", "timed_out"}
)
STATUS_STATES = frozenset({"error", "failure", "pending", "success"})
REACTIONS = frozenset({"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"})
WRITE_ROLES = frozenset({"admin", "maintain", "write"})
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
DOCS = "https://docs.github.com/rest"
PAYLOAD: web.RequestKey[Any] = web.RequestKey("payload", object)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_sha() -> str:
    return secrets.token_hex(20)


class GithubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        errors: list[Obj] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers or {}

    def response(self) -> web.Response:
        body: Obj = {"message": self.message, "documentation_url": DOCS, "status": str(self.status)}
        if self.errors:
            body["errors"] = self.errors
        return web.json_response(body, status=self.status, headers=self.headers)


def _invalid(resource: str, field_name: str, message: str | None = None) -> GithubError:
    error: Obj = {"resource": resource, "field": field_name, "code": "invalid"}
    if message:
        error["message"] = message
    return GithubError(422, "Invalid request." if message is None else message, errors=[error])


@dataclass
class Repo:
    id: int
    owner: str
    name: str
    default_branch: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: set[str] = field(default_factory=set)
    pulls: dict[int, Obj] = field(default_factory=dict)
    issues: set[int] = field(default_factory=set)
    collaborators: dict[str, str] = field(default_factory=dict)
    """login -> role (admin, maintain, write, triage, read)"""
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """commit sha -> {path: content}: the files of each commit (none: an empty tree)"""
    parents: dict[str, str] = field(default_factory=dict)
    """commit sha -> its parent, for commits made through the contents API or `add_file`"""

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def clone_url(self) -> str:
        return f"https://github.com/{self.full_name}.git"

    def json(self) -> Obj:
        return {
            "id": self.id,
            "node_id": f"R_{self.id}",
            "name": self.name,
            "full_name": self.full_name,
            "private": self.private,
            "owner": {"login": self.owner, "id": self.id * 10, "type": "Organization"},
            "html_url": f"https://github.com/{self.full_name}",
            "clone_url": self.clone_url,
            "default_branch": self.default_branch,
        }


@dataclass
class Token:
    value: str
    kind: str  # "installation" or "pat"
    installation_id: int | None
    expires_at: float | None
    login: str


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    message: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """lower-cased names"""
    json: Any
    status: int


class GithubDouble(HttpDouble):
    def __init__(
        self, *, app_id: str = "424242", app_slug: str = "fabrik-test", token_seconds: float = 3600
    ) -> None:
        super().__init__()
        self.app_id = app_id
        self.app_slug = app_slug
        self.token_seconds = token_seconds
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.app_private_key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
        self.repos: dict[str, Repo] = {}
        self.installations: dict[int, set[str]] = {}
        """installation id -> repositories (lower-case full names) it may access"""
        self.tokens: dict[str, Token] = {}
        self.check_runs: dict[int, Obj] = {}
        self.statuses: list[Obj] = []
        self.comments: dict[int, Obj] = {}
        self.reactions: list[Obj] = []
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.delays: list[tuple[str, re.Pattern[str], float]] = []
        self._ids = itertools.count(1000)

    # ---- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_post("/app/installations/{installation}/access_tokens", self._access_token)
        r.add_get("/repos/{owner}/{repo}/collaborators/{user}/permission", self._permission)
        r.add_get("/repos/{owner}/{repo}/pulls/{number}", self._pull)
        r.add_get("/repos/{owner}/{repo}/commits/{ref:.+}/check-runs", self._list_check_runs)
        r.add_get("/repos/{owner}/{repo}/commits/{ref:.+}", self._commit)
        r.add_post("/repos/{owner}/{repo}/check-runs", self._create_check_run)
        r.add_patch("/repos/{owner}/{repo}/check-runs/{id}", self._update_check_run)
        r.add_get("/repos/{owner}/{repo}/check-runs/{id}", self._get_check_run)
        r.add_post("/repos/{owner}/{repo}/statuses/{sha}", self._create_status)
        r.add_post("/repos/{owner}/{repo}/issues/comments/{id}/reactions", self._react)
        r.add_post("/repos/{owner}/{repo}/issues/{number}/comments", self._create_comment)
        r.add_get("/repos/{owner}/{repo}/issues/{number}/comments", self._list_comments)
        r.add_get("/repos/{owner}/{repo}", self._get_repo)
        r.add_get("/repos/{owner}/{repo}/git/ref/{ref:.+}", self._get_ref)
        r.add_post("/repos/{owner}/{repo}/git/refs", self._create_ref)
        r.add_get("/repos/{owner}/{repo}/contents/{path:.+}", self._get_contents)
        r.add_put("/repos/{owner}/{repo}/contents/{path:.+}", self._put_contents)
        r.add_post("/repos/{owner}/{repo}/pulls", self._create_pull)
        r.add_get("/repos/{owner}/{repo}/pulls", self._list_pulls)
        return app

    # ---- test controls ---------------------------------------------------------------------

    def add_repo(
        self,
        full_name: str,
        *,
        default_branch: str = "main",
        private: bool = False,
        installation_id: int | None = None,
    ) -> Repo:
        owner, _, name = full_name.partition("/")
        repo = Repo(
            id=next(self._ids), owner=owner, name=name, default_branch=default_branch, private=private
        )
        self.repos[full_name.lower()] = repo
        self.add_commit(full_name, branch=default_branch)
        if installation_id is not None:
            self.installations.setdefault(installation_id, set()).add(full_name.lower())
        return repo

    def repo(self, full_name: str) -> Repo:
        return self.repos[full_name.lower()]

    def add_commit(self, full_name: str, sha: str | None = None, *, branch: str | None = None) -> str:
        repo = self.repo(full_name)
        sha = sha or new_sha()
        repo.commits.add(sha)
        if branch is not None:
            repo.branches[branch] = sha
        return sha

    def add_file(self, full_name: str, path: str, content: str | bytes, *, branch: str | None = None) -> str:
        """A commit on `branch` (default: the default branch) that adds or replaces one file."""
        repo = self.repo(full_name)
        branch = branch or repo.default_branch
        data = content.encode() if isinstance(content, str) else content
        return self._commit_file(repo, branch, path, data)

    def file_at(self, full_name: str, path: str, ref: str | None = None) -> bytes | None:
        """A file's content at a branch or commit (default: the default branch), None if absent."""
        repo = self.repo(full_name)
        sha = self._resolve(repo, ref or repo.default_branch)
        return None if sha is None else repo.trees.get(sha, {}).get(path)

    def _commit_file(self, repo: Repo, branch: str, path: str, data: bytes) -> str:
        parent = repo.branches[branch]
        sha = new_sha()
        repo.commits.add(sha)
        repo.trees[sha] = {**repo.trees.get(parent, {}), path: data}
        repo.parents[sha] = parent
        repo.branches[branch] = sha
        return sha

    def add_issue(self, full_name: str, number: int) -> None:
        self.repo(full_name).issues.add(number)

    def add_pull(
        self,
        full_name: str,
        number: int,
        *,
        head_sha: str | None = None,
        head_ref: str = "feature",
        head_repo: str | None = None,
        title: str = "A change",
        user: str = "octocat",
    ) -> Obj:
        """A pull request (and its issue); `head_repo` names a fork (the head commit is added to the
        base repository too, as GitHub keeps `refs/pull/<n>/head` there)."""
        repo = self.repo(full_name)
        head_sha = self.add_commit(full_name, head_sha)
        head = self.repos.get((head_repo or full_name).lower())
        if head is None and head_repo is not None:
            head = self.add_repo(head_repo)
        assert head is not None
        head.commits.add(head_sha)
        head.branches[head_ref] = head_sha
        repo.issues.add(number)
        pull = {
            "url": f"{self.url}/repos/{repo.full_name}/pulls/{number}",
            "id": next(self._ids),
            "number": number,
            "state": "open",
            "title": title,
            "body": None,
            "user": {"login": user, "id": 1, "type": "User"},
            "html_url": f"https://github.com/{repo.full_name}/pull/{number}",
            "head": {
                "label": f"{head.owner}:{head_ref}",
                "ref": head_ref,
                "sha": head_sha,
                "repo": head.json(),
            },
            "base": {
                "label": f"{repo.owner}:{repo.default_branch}",
                "ref": repo.default_branch,
                "sha": repo.branches[repo.default_branch],
                "repo": repo.json(),
            },
            "created_at": now_iso(),
            "updated_at": now_iso(),
        }
        repo.pulls[number] = pull
        return pull

    def add_issue_comment(
        self, full_name: str, number: int, body: str, *, user: str = "octocat", comment_id: int | None = None
    ) -> int:
        """A comment written by someone (e.g. the `/fabrik run` of a delivery: its `comment.id`)."""
        comment_id = comment_id if comment_id is not None else next(self._ids)
        self.repo(full_name).issues.add(number)
        self.comments[comment_id] = {
            "id": comment_id,
            "repository": full_name.lower(),
            "issue_number": number,
            "body": body,
            "user": {"login": user, "type": "User"},
            "created_at": now_iso(),
        }
        return comment_id

    def set_permission(self, full_name: str, login: str, role: str) -> None:
        self.repo(full_name).collaborators[login] = role

    def add_installation(self, installation_id: int, *repos: str) -> None:
        self.installations.setdefault(installation_id, set()).update(r.lower() for r in repos)

    def add_token(self, token: str | None = None, *, login: str = "fabrik-bot") -> str:
        """A plain (personal access) token accepted for every repository."""
        token = token or "github_pat_" + secrets.token_hex(20)
        self.tokens[token] = Token(token, "pat", None, None, login)
        return token

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int = 1,
        message: str = "Server Error",
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `times` requests matching `method` and the regex `path` get `status`."""
        self.faults.append(Fault(method.upper(), re.compile(path), status, times, message, headers or {}))

    def delay(self, method: str, path: str, seconds: float) -> None:
        """Every request matching `method` and the regex `path` is answered `seconds` late."""
        self.delays.append((method.upper(), re.compile(path), seconds))

    def rate_limit_next(self, method: str, path: str, *, retry_after: int = 1) -> None:
        """A secondary rate limit on the next matching request (403 with Retry-After)."""
        self.fail(
            method,
            path,
            403,
            message="You have exceeded a secondary rate limit. Please wait a few minutes before you try "
            "again.",
            headers={"retry-after": str(retry_after), "x-ratelimit-remaining": "0"},
        )

    def expire_tokens(self) -> None:
        """Every installation token issued so far expires now."""
        for token in self.tokens.values():
            if token.kind == "installation":
                token.expires_at = time.time() - 1

    def calls_to(self, method: str, path: str) -> list[Call]:
        pattern = re.compile(path)
        return [c for c in self.calls if c.method == method.upper() and pattern.search(c.path)]

    def check_runs_for(self, full_name: str, sha: str | None = None) -> list[Obj]:
        return [
            run
            for run in self.check_runs.values()
            if run["repository"] == full_name.lower() and (sha is None or run["head_sha"] == sha)
        ]

    def comments_on(self, full_name: str, number: int, *, by_app: bool | None = None) -> list[Obj]:
        result = [
            c
            for c in self.comments.values()
            if c["repository"] == full_name.lower() and c["issue_number"] == number
        ]
        if by_app is not None:
            result = [c for c in result if c["user"]["login"].endswith("[bot]") == by_app]
        return result

    # ---- plumbing --------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        payload: Any = None
        response: web.StreamResponse
        for method, pattern, seconds in self.delays:
            if method == request.method and pattern.search(request.path):
                await asyncio.sleep(seconds)
        try:
            payload = self._check_request(request, raw)
            request[PAYLOAD] = payload
            response = await handler(request)
        except GithubError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            response = web.json_response(
                {"message": "Not Found" if exc.status == 404 else exc.reason, "documentation_url": DOCS},
                status=exc.status,
            )
        response.headers.update(
            {
                "x-ratelimit-limit": "5000",
                "x-ratelimit-remaining": response.headers.get("x-ratelimit-remaining", "4999"),
                "x-ratelimit-reset": str(int(time.time()) + 3600),
                "x-ratelimit-resource": "core",
                "x-github-api-version-selected": request.headers.get("X-GitHub-Api-Version", "2022-11-28"),
            }
        )
        self.calls.append(
            Call(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                json=payload,
                status=response.status,
            )
        )
        return response

    def _check_request(self, request: web.Request, raw: bytes) -> Any:
        """What GitHub checks of every request; the JSON body (or None)."""
        if "user-agent" not in {k.lower() for k in request.headers}:
            raise GithubError(
                403,
                "Request forbidden by administrative rules. Please make sure your request has a "
                "User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api"
                "#user-agent-required).",
            )
        version = request.headers.get("X-GitHub-Api-Version")
        if version is not None and version not in API_VERSIONS:
            raise GithubError(400, f"Unsupported 'X-GitHub-Api-Version' header: {version}")
        payload: Any = None
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                raise GithubError(400, "Problems parsing JSON") from None
            if not isinstance(payload, dict):
                raise GithubError(400, "Problems parsing JSON")
        fault = self._fault(request.method, request.path)
        if fault is not None:
            raise GithubError(fault.status, fault.message, headers=fault.headers)
        return payload

    def _fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.path.search(path):
                fault.times -= 1
                return fault
        return None

    def _bearer(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() not in ("bearer", "token") or not value:
            raise GithubError(401, "Requires authentication")
        return value.strip()

    def _token(self, request: web.Request, repo: Repo) -> Token:
        value = self._bearer(request)
        token = self.tokens.get(value)
        if token is None or (token.expires_at is not None and token.expires_at < time.time()):
            raise GithubError(401, "Bad credentials")
        if token.kind == "installation":
            assert token.installation_id is not None
            if repo.full_name.lower() not in self.installations.get(token.installation_id, set()):
                raise GithubError(403, "Resource not accessible by integration")
        return token

    def _repo(self, request: web.Request) -> Repo:
        full_name = f"{request.match_info['owner']}/{request.match_info['repo']}".lower()
        repo = self.repos.get(full_name)
        if repo is None:
            self._bearer(request)
            raise GithubError(404, "Not Found")
        return repo

    def _verify_jwt(self, token: str) -> Obj:
        """An App JWT: RS256 with the App's key, `iss` = App id, at most 10 minutes, current."""
        try:
            header_b64, claims_b64, signature_b64 = token.split(".")
            header = json.loads(_b64decode(header_b64))
            claims = json.loads(_b64decode(claims_b64))
            signature = _b64decode(signature_b64)
        except (ValueError, TypeError):
            raise GithubError(401, "A JSON web token could not be decoded") from None
        if header.get("alg") != "RS256":
            raise GithubError(401, "A JSON web token could not be decoded")
        try:
            self._key.public_key().verify(
                signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise GithubError(401, "A JSON web token could not be decoded") from None
        now = time.time()
        iat, exp, iss = claims.get("iat"), claims.get("exp"), claims.get("iss")
        if str(iss) != self.app_id:
            raise GithubError(401, "'Issuer' claim ('iss') must be an Integer")
        if not isinstance(iat, int) or not isinstance(exp, int):
            raise GithubError(401, "A JSON web token could not be decoded")
        if exp <= now:
            raise GithubError(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the future time "
                "at which the assertion expires",
            )
        if exp - iat > 600:
            raise GithubError(401, "'Expiration time' claim ('exp') is too far in the future")
        if iat > now + 60:
            raise GithubError(
                401,
                "'Issued at' claim ('iat') must be an Integer representing the time that the assertion "
                "was issued",
            )
        return dict(claims)

    def _bot(self) -> Obj:
        return {"login": f"{self.app_slug}[bot]", "id": 41898282, "type": "Bot"}

    # ---- endpoints -------------------------------------------------------------------------

    async def _access_token(self, request: web.Request) -> web.Response:
        self._verify_jwt(self._bearer(request))
        try:
            installation_id = int(request.match_info["installation"])
        except ValueError:
            raise GithubError(404, "Not Found") from None
        if installation_id not in self.installations:
            raise GithubError(404, "Not Found")
        value = "ghs_" + secrets.token_hex(18)
        expires = time.time() + self.token_seconds
        self.tokens[value] = Token(value, "installation", installation_id, expires, f"{self.app_slug}[bot]")
        expires_at = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response(
            {
                "token": value,
                "expires_at": expires_at,
                "permissions": {
                    "checks": "write",
                    "issues": "write",
                    "pull_requests": "write",
                    "metadata": "read",
                },
                "repository_selection": "selected",
            },
            status=201,
        )

    async def _permission(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        login = request.match_info["user"]
        role = repo.collaborators.get(login, "none" if repo.private else "read")
        permission = {"maintain": "write", "triage": "read"}.get(role, role)
        return web.json_response(
            {
                "permission": permission,
                "role_name": role,
                "user": {"login": login, "id": abs(hash(login)) % 10**8, "type": "User", "permissions": {}},
            }
        )

    async def _pull(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        pull = repo.pulls.get(_int(request.match_info["number"]))
        if pull is None:
            raise GithubError(404, "Not Found")
        return web.json_response(pull)

    def _resolve(self, repo: Repo, ref: str) -> str | None:
        if ref in repo.branches:
            return repo.branches[ref]
        matches = [sha for sha in repo.commits if len(ref) >= 7 and sha.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    async def _commit(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        ref = request.match_info["ref"]
        sha = self._resolve(repo, ref)
        if sha is None:
            raise GithubError(422, f"No commit found for SHA: {ref}")
        return web.json_response(
            {
                "sha": sha,
                "node_id": f"C_{sha[:10]}",
                "commit": {"message": "A commit", "author": {"name": "Octo Cat", "date": now_iso()}},
                "html_url": f"https://github.com/{repo.full_name}/commit/{sha}",
                "parents": [],
            }
        )

    def _require_app(self, token: Token) -> None:
        if token.kind != "installation":
            raise GithubError(403, "Resource not accessible by personal access token")

    def _check_fields(self, body: Obj, *, creating: bool, repo: Repo) -> None:
        if creating:
            if not isinstance(body.get("name"), str) or not body["name"]:
                raise _invalid("CheckRun", "name", "name wasn't supplied.")
            head_sha = body.get("head_sha")
            if not isinstance(head_sha, str) or not head_sha:
                raise _invalid("CheckRun", "head_sha", "head_sha wasn't supplied.")
            if not _SHA.match(head_sha) or head_sha not in repo.commits:
                raise GithubError(422, f"No commit found for SHA: {head_sha}")
        status = body.get("status")
        if status is not None and status not in CHECK_STATUSES:
            raise _invalid("CheckRun", "status")
        conclusion = body.get("conclusion")
        if conclusion is not None and conclusion not in CHECK_CONCLUSIONS:
            raise _invalid("CheckRun", "conclusion")
        if status == "completed" and conclusion is None and creating:
            raise GithubError(422, "Conclusion is required when status is completed.")
        details_url = body.get("details_url")
        if details_url is not None and (
            not isinstance(details_url, str) or not re.match(r"^https?://[^\s/]+", details_url)
        ):
            raise _invalid("CheckRun", "details_url", "details_url must be a valid http(s) URL")
        for name in ("started_at", "completed_at"):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or not _ISO.match(value)):
                raise _invalid("CheckRun", name, f"{name} must be an ISO 8601 timestamp")
        output = body.get("output")
        if output is not None:
            if not isinstance(output, dict):
                raise _invalid("CheckRun", "output")
            for name in ("title", "summary"):
                if not isinstance(output.get(name), str) or not output[name]:
                    raise _invalid("CheckRun", f"output.{name}", f"output.{name} wasn't supplied.")
            if len(output["summary"]) > 65535:
                raise _invalid(
                    "CheckRun", "output.summary", "output.summary is too long (maximum is 65535 characters)"
                )
        external_id = body.get("external_id")
        if external_id is not None and not isinstance(external_id, str):
            raise _invalid("CheckRun", "external_id")

    def _check_run_json(self, run: Obj) -> Obj:
        return {k: v for k, v in run.items() if k != "repository"}

    async def _create_check_run(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        token = self._token(request, repo)
        self._require_app(token)
        body: Obj = request[PAYLOAD] or {}
        self._check_fields(body, creating=True, repo=repo)
        run_id = next(self._ids)
        status = "completed" if body.get("conclusion") else body.get("status", "queued")
        run: Obj = {
            "id": run_id,
            "repository": repo.full_name.lower(),
            "head_sha": body["head_sha"],
            "node_id": f"CR_{run_id}",
            "external_id": body.get("external_id", ""),
            "url": f"{self.url}/repos/{repo.full_name}/check-runs/{run_id}",
            "html_url": f"https://github.com/{repo.full_name}/runs/{run_id}",
            "details_url": body.get("details_url"),
            "status": status,
            "conclusion": body.get("conclusion"),
            "started_at": body.get("started_at", now_iso()),
            "completed_at": body.get("completed_at", now_iso()) if status == "completed" else None,
            "output": {
                "title": None,
                "summary": None,
                "text": None,
                "annotations_count": 0,
                **(body.get("output") or {}),
            },
            "name": body["name"],
            "app": {"id": int(self.app_id), "slug": self.app_slug},
            "pull_requests": [],
            "history": [],
        }
        run["history"].append(
            {"status": run["status"], "conclusion": run["conclusion"], "output": run["output"]}
        )
        self.check_runs[run_id] = run
        return web.json_response(self._check_run_json(run), status=201)

    def _find_check_run(self, request: web.Request, repo: Repo) -> Obj:
        run = self.check_runs.get(_int(request.match_info["id"]))
        if run is None or run["repository"] != repo.full_name.lower():
            raise GithubError(404, "Not Found")
        return run

    async def _update_check_run(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        token = self._token(request, repo)
        self._require_app(token)
        run = self._find_check_run(request, repo)
        body: Obj = request[PAYLOAD] or {}
        self._check_fields(body, creating=False, repo=repo)
        if body.get("status") == "completed" and body.get("conclusion") is None and run["conclusion"] is None:
            raise GithubError(422, "Conclusion is required when status is completed.")
        for name in (
            "name",
            "details_url",
            "external_id",
            "started_at",
            "completed_at",
            "status",
            "conclusion",
        ):
            if name in body:
                run[name] = body[name]
        if body.get("conclusion") is not None:
            run["status"] = "completed"
            run.setdefault("completed_at", now_iso())
            if run["completed_at"] is None:
                run["completed_at"] = now_iso()
        elif body.get("status") in ("queued", "in_progress"):
            run["conclusion"] = None
            run["completed_at"] = None
        if body.get("output") is not None:
            run["output"] = {**run["output"], **body["output"]}
        run["history"].append(
            {"status": run["status"], "conclusion": run["conclusion"], "output": dict(run["output"])}
        )
        return web.json_response(self._check_run_json(run))

    async def _get_check_run(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        return web.json_response(self._check_run_json(self._find_check_run(request, repo)))

    async def _list_check_runs(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        sha = self._resolve(repo, request.match_info["ref"])
        if sha is None:
            raise GithubError(422, f"No commit found for SHA: {request.match_info['ref']}")
        name = request.query.get("check_name")
        runs = [
            self._check_run_json(r)
            for r in self.check_runs.values()
            if r["repository"] == repo.full_name.lower()
            and r["head_sha"] == sha
            and (name is None or r["name"] == name)
        ]
        return web.json_response({"total_count": len(runs), "check_runs": runs})

    async def _create_status(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        token = self._token(request, repo)
        body: Obj = request[PAYLOAD] or {}
        sha = request.match_info["sha"]
        if sha not in repo.commits:
            raise GithubError(422, f"No commit found for SHA: {sha}")
        state = body.get("state")
        if state not in STATUS_STATES:
            raise _invalid("Status", "state")
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > 140):
            raise _invalid("Status", "description", "description is too long (maximum is 140 characters)")
        target_url = body.get("target_url")
        if target_url is not None and not isinstance(target_url, str):
            raise _invalid("Status", "target_url")
        status = {
            "id": next(self._ids),
            "repository": repo.full_name.lower(),
            "sha": sha,
            "state": state,
            "description": description,
            "target_url": target_url,
            "context": body.get("context") or "default",
            "creator": {"login": token.login},
            "created_at": now_iso(),
        }
        self.statuses.append(status)
        return web.json_response({k: v for k, v in status.items() if k != "repository"}, status=201)

    async def _create_comment(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        token = self._token(request, repo)
        number = _int(request.match_info["number"])
        if number not in repo.issues:
            raise GithubError(404, "Not Found")
        body = (request[PAYLOAD] or {}).get("body")
        if not isinstance(body, str) or not body.strip():
            raise _invalid("IssueComment", "body", "body wasn't supplied.")
        if len(body) > 65536:
            raise _invalid("IssueComment", "body", "body is too long (maximum is 65536 characters)")
        comment_id = next(self._ids)
        user = self._bot() if token.kind == "installation" else {"login": token.login, "type": "User"}
        comment = {
            "id": comment_id,
            "repository": repo.full_name.lower(),
            "issue_number": number,
            "body": body,
            "user": user,
            "html_url": f"https://github.com/{repo.full_name}/issues/{number}#issuecomment-{comment_id}",
            "created_at": now_iso(),
            "updated_at": now_iso(),
        }
        self.comments[comment_id] = comment
        return web.json_response({k: v for k, v in comment.items() if k != "repository"}, status=201)

    async def _list_comments(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        number = _int(request.match_info["number"])
        if number not in repo.issues:
            raise GithubError(404, "Not Found")
        return web.json_response(
            [
                {k: v for k, v in c.items() if k != "repository"}
                for c in self.comments_on(repo.full_name, number)
            ]
        )

    async def _react(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        token = self._token(request, repo)
        comment = self.comments.get(_int(request.match_info["id"]))
        if comment is None or comment["repository"] != repo.full_name.lower():
            raise GithubError(404, "Not Found")
        content = (request[PAYLOAD] or {}).get("content")
        if content not in REACTIONS:
            raise _invalid("Reaction", "content")
        for reaction in self.reactions:
            if (
                reaction["comment_id"] == comment["id"]
                and reaction["content"] == content
                and reaction["user"] == token.login
            ):
                return web.json_response(reaction, status=200)
        reaction = {
            "id": next(self._ids),
            "comment_id": comment["id"],
            "content": content,
            "user": token.login,
        }
        self.reactions.append(reaction)
        return web.json_response(reaction, status=201)

    # ---- contents, refs and pull requests --------------------------------------------------

    async def _get_repo(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        return web.json_response(repo.json())

    def _ref_json(self, repo: Repo, branch: str) -> Obj:
        sha = repo.branches[branch]
        return {
            "ref": f"refs/heads/{branch}",
            "node_id": f"REF_{sha[:10]}",
            "url": f"{self.url}/repos/{repo.full_name}/git/refs/heads/{branch}",
            "object": {
                "sha": sha,
                "type": "commit",
                "url": f"{self.url}/repos/{repo.full_name}/git/commits/{sha}",
            },
        }

    async def _get_ref(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        ref = request.match_info["ref"]
        branch = ref.removeprefix("heads/")
        if not ref.startswith("heads/") or branch not in repo.branches:
            raise GithubError(404, "Not Found")
        return web.json_response(self._ref_json(repo, branch))

    async def _create_ref(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        body: Obj = request[PAYLOAD] or {}
        ref, sha = body.get("ref"), body.get("sha")
        if not isinstance(ref, str) or not ref:
            raise GithubError(422, 'Invalid request.\n\n"ref" wasn\'t supplied.')
        if not isinstance(sha, str) or not sha:
            raise GithubError(422, 'Invalid request.\n\n"sha" wasn\'t supplied.')
        if not ref.startswith("refs/") or ref.count("/") < 2:
            raise GithubError(422, "Reference name must start with 'refs/' and have at least two slashes.")
        if not ref.startswith("refs/heads/"):
            raise GithubError(422, "Only branches (refs/heads/...) are supported by this double")
        branch = ref.removeprefix("refs/heads/")
        if branch in repo.branches:
            raise GithubError(422, "Reference already exists")
        if sha not in repo.commits:
            raise GithubError(422, "Object does not exist")
        repo.branches[branch] = sha
        return web.json_response(self._ref_json(repo, branch), status=201)

    def _content_json(self, repo: Repo, path: str, data: bytes, ref: str) -> Obj:
        sha = blob_sha(data)
        api = f"{self.url}/repos/{repo.full_name}/contents/{path}?ref={ref}"
        html = f"https://github.com/{repo.full_name}/blob/{ref}/{path}"
        encoded = base64.b64encode(data).decode()
        return {
            "type": "file",
            "encoding": "base64",
            "size": len(data),
            "name": path.rsplit("/", 1)[-1],
            "path": path,
            # GitHub wraps the base64 text at 60 characters
            "content": "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60)) + "\n",
            "sha": sha,
            "url": api,
            "git_url": f"{self.url}/repos/{repo.full_name}/git/blobs/{sha}",
            "html_url": html,
            "download_url": f"https://raw.githubusercontent.com/{repo.full_name}/{ref}/{path}",
            "_links": {
                "self": api,
                "git": f"{self.url}/repos/{repo.full_name}/git/blobs/{sha}",
                "html": html,
            },
        }

    async def _get_contents(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        path = request.match_info["path"]
        ref = request.query.get("ref") or repo.default_branch
        sha = self._resolve(repo, ref)
        if sha is None:
            raise GithubError(404, f"No commit found for the ref {ref}")
        data = repo.trees.get(sha, {}).get(path)
        if data is None:
            raise GithubError(404, "Not Found")
        return web.json_response(self._content_json(repo, path, data, ref))

    async def _put_contents(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        path = request.match_info["path"]
        body: Obj = request[PAYLOAD] or {}
        message, content = body.get("message"), body.get("content")
        if not isinstance(message, str) or not message:
            raise GithubError(422, 'Invalid request.\n\n"message" wasn\'t supplied.')
        if not isinstance(content, str):
            raise GithubError(422, 'Invalid request.\n\n"content" wasn\'t supplied.')
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise GithubError(422, "content is not valid Base64") from None
        branch = body.get("branch") or repo.default_branch
        if not isinstance(branch, str) or branch not in repo.branches:
            raise GithubError(404, f"Branch {branch} not found")
        existing = repo.trees.get(repo.branches[branch], {}).get(path)
        given = body.get("sha")
        if existing is not None:
            if not given:
                raise GithubError(422, 'Invalid request.\n\n"sha" wasn\'t supplied.')
            if given != blob_sha(existing):
                raise GithubError(409, f"{path} does not match {given}")
        elif given:
            raise GithubError(409, f"{path} does not match {given}")
        commit = self._commit_file(repo, branch, path, data)
        answer = {
            "content": self._content_json(repo, path, data, branch),
            "commit": {
                "sha": commit,
                "node_id": f"C_{commit[:10]}",
                "url": f"{self.url}/repos/{repo.full_name}/git/commits/{commit}",
                "html_url": f"https://github.com/{repo.full_name}/commit/{commit}",
                "message": message,
                "parents": [{"sha": repo.parents[commit]}],
            },
        }
        return web.json_response(answer, status=200 if existing is not None else 201)

    def _head_branch(self, repo: Repo, head: str) -> str | None:
        """`branch` or `owner:branch` of this repository (forks are not served here)."""
        owner, sep, branch = head.partition(":")
        if sep and owner.lower() != repo.owner.lower():
            return None
        name = branch if sep else head
        return name if name in repo.branches else None

    async def _create_pull(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        token = self._token(request, repo)
        body: Obj = request[PAYLOAD] or {}
        title, head, base = body.get("title"), body.get("head"), body.get("base")
        if not isinstance(title, str) or not title:
            raise GithubError(422, 'Invalid request.\n\n"title" wasn\'t supplied.')
        if not isinstance(head, str) or not isinstance(base, str):
            raise GithubError(422, 'Invalid request.\n\n"head", "base" weren\'t supplied.')
        branch = self._head_branch(repo, head)
        errors: list[Obj] = []
        if branch is None:
            errors.append({"resource": "PullRequest", "field": "head", "code": "invalid"})
        if base not in repo.branches:
            errors.append({"resource": "PullRequest", "field": "base", "code": "invalid"})
        if errors:
            raise GithubError(422, "Validation Failed", errors=errors)
        assert branch is not None
        for pull in repo.pulls.values():
            if pull["state"] == "open" and pull["head"]["ref"] == branch and pull["base"]["ref"] == base:
                raise GithubError(
                    422,
                    "Validation Failed",
                    errors=[
                        {
                            "resource": "PullRequest",
                            "code": "custom",
                            "message": f"A pull request already exists for {repo.owner}:{branch}.",
                        }
                    ],
                )
        head_sha, base_sha = repo.branches[branch], repo.branches[base]
        if self._ancestry(repo, head_sha) <= self._ancestry(repo, base_sha):
            raise GithubError(
                422,
                "Validation Failed",
                errors=[
                    {
                        "resource": "PullRequest",
                        "code": "custom",
                        "message": f"No commits between {base} and {branch}",
                    }
                ],
            )
        number = max([0, *repo.issues, *repo.pulls]) + 1
        repo.issues.add(number)
        user = (
            self._bot() if token.kind == "installation" else {"login": token.login, "id": 1, "type": "User"}
        )
        pull = {
            "url": f"{self.url}/repos/{repo.full_name}/pulls/{number}",
            "id": next(self._ids),
            "number": number,
            "state": "open",
            "title": title,
            "body": body.get("body"),
            "draft": bool(body.get("draft", False)),
            "user": user,
            "html_url": f"https://github.com/{repo.full_name}/pull/{number}",
            "head": {"label": f"{repo.owner}:{branch}", "ref": branch, "sha": head_sha, "repo": repo.json()},
            "base": {"label": f"{repo.owner}:{base}", "ref": base, "sha": base_sha, "repo": repo.json()},
            "created_at": now_iso(),
            "updated_at": now_iso(),
        }
        repo.pulls[number] = pull
        return web.json_response(pull, status=201)

    def _ancestry(self, repo: Repo, sha: str) -> set[str]:
        """`sha` and the commits before it (as far as the double knows its parents)."""
        found = {sha}
        while sha in repo.parents:
            sha = repo.parents[sha]
            found.add(sha)
        return found

    async def _list_pulls(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._token(request, repo)
        state = request.query.get("state", "open")
        if state not in ("open", "closed", "all"):
            raise _invalid("PullRequest", "state")
        head = request.query.get("head")
        found = [
            p
            for p in sorted(repo.pulls.values(), key=lambda p: -int(p["number"]))
            if (state == "all" or p["state"] == state) and (head is None or p["head"]["label"] == head)
        ]
        return web.json_response(found)


def blob_sha(data: bytes) -> str:
    """Git's blob id of `data` (what the contents API calls a file's `sha`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise GithubError(404, "Not Found") from None


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
