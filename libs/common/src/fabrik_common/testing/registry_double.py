"""A tiny OCI registry double (aiohttp on 127.0.0.1, a free port) for tests that resolve tags.

`GET /token` issues Bearer tokens (anonymous, or for the configured user with Basic auth);
`HEAD|GET /v2/<name>/manifests/<tag-or-digest>` answers with `Docker-Content-Digest` once a token
is presented, else `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`; unknown
repositories or tags are `404`. `private` repositories need the credentialed token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets

from aiohttp import web

from fabrik_common.testing.http_double import HttpDouble

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class RegistryDouble(HttpDouble):
    def __init__(
        self,
        *,
        user: str = "robot",
        password: str = "s3cret",  # noqa: S107 - a test double's fixed password
        service: str = "registry.double",
    ) -> None:
        super().__init__()
        self.user = user
        self.password = password
        self.service = service
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.private: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._tokens: dict[str, bool] = {}
        """token → issued with credentials"""

    @property
    def host(self) -> str:
        """host:port, as written in an image reference."""
        return f"{self.address}:{self.port}"

    def push(self, repository: str, tag: str, *, private: bool = False, content: str = "") -> str:
        """Store a manifest under `repository:tag`; returns its digest."""
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "annotations": {"x": content or f"{repository}:{tag}"},
            }
        ).encode()
        self.manifests[(repository, tag)] = body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[(repository, digest)] = body
        if private:
            self.private.add(repository)
        return digest

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{reference}", self._manifest)
        return app

    def _credentialed(self, request: web.Request) -> bool | None:
        """None: no Basic auth; else whether it is the configured user."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user == self.user and password == self.password

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path_qs, dict(request.headers)))
        if request.query.get("service") != self.service:
            return web.json_response({"errors": [{"code": "DENIED"}]}, status=400)
        credentialed = self._credentialed(request)
        if credentialed is False:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        token = secrets.token_hex(16)
        self._tokens[token] = bool(credentialed)
        return web.json_response({"token": token, "access_token": token, "expires_in": 300})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        name, reference = request.match_info["name"], request.match_info["reference"]
        if request.method not in ("HEAD", "GET"):
            return web.Response(status=405)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        allowed = token in self._tokens and (name not in self.private or self._tokens[token])
        if not allowed:
            challenge = (
                f'Bearer realm="{self.url}/token",service="{self.service}",scope="repository:{name}:pull"'
            )
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={"WWW-Authenticate": challenge}
            )
        body = self.manifests.get((name, reference))
        if body is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        headers = {
            "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest(),
            "Content-Type": MANIFEST_TYPE,
        }
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(len(body))})
        return web.Response(status=200, body=body, headers=headers)
