"""Resolving an image tag to its digest through the OCI Distribution API.

`HEAD /v2/<name>/manifests/<tag>` with the manifest media types in `Accept`, the digest read from
`Docker-Content-Digest` (a registry that leaves it out of HEAD answers a GET, whose body is hashed
if need be). A `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is answered by
fetching a token from the realm (anonymous, or with the registry's credentials from a Docker config
file) and asking again; a `Basic` challenge is answered with the credentials.

References are normalised as Docker does: no registry → `docker.io` (`registry-1.docker.io` on the
wire), a one-component name on Docker Hub → `library/<name>`, no tag → `latest`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_API: Final = "registry-1.docker.io"
_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

MANIFEST_TYPES: Final = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]*))')


class RegistryError(Exception):
    """The tag could not be resolved; the message names the image and the registry's answer."""


@dataclass(frozen=True)
class ImageRef:
    registry: str
    """As written (`docker.io` for Docker Hub), host[:port]."""
    repository: str
    tag: str

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry


def parse_reference(ref: str) -> ImageRef:
    """`[registry/]name[:tag]` (no digest) → its parts, normalised as Docker does."""
    ref = ref.strip()
    if not ref or "@" in ref:
        raise ValueError(f"not a tag reference: {ref!r}")
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, remainder = first, rest
    else:
        registry, remainder = DOCKER_HUB, ref
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        repository, tag = remainder[:colon], remainder[colon + 1 :]
    else:
        repository, tag = remainder, "latest"
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not repository or not tag:
        raise ValueError(f"not a valid image reference: {ref!r}")
    return ImageRef(registry, repository, tag)


def _host_key(text: str) -> str:
    """A registry as written in a Docker config's `auths` (maybe a URL) → host[:port]."""
    host = re.sub(r"^[a-z]+://", "", text.strip().lower()).split("/", 1)[0]
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def load_credentials(path: str | Path) -> dict[str, tuple[str, str]]:
    """host → (user, password) from a Docker config JSON (`auths.<host>.auth`, base64 user:password,
    or `username` / `password`)."""
    data = json.loads(Path(path).expanduser().read_text())
    out: dict[str, tuple[str, str]] = {}
    for host, entry in (data.get("auths") or {}).items():
        if not isinstance(entry, Mapping):
            continue
        user, password = str(entry.get("username") or ""), str(entry.get("password") or "")
        if entry.get("auth"):
            decoded = base64.b64decode(str(entry["auth"])).decode()
            user, _, password = decoded.partition(":")
        if user or password:
            out[_host_key(host)] = (user, password)
    return out


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…"` → ("bearer", {realm, service, …})."""
    scheme, _, params = header.strip().partition(" ")
    found = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(params)
    }
    return scheme.lower(), found


@dataclass(frozen=True)
class RegistryClient:
    insecure: Iterable[str] = ()
    """Registries (host[:port]) reached over plain http."""
    auth_file: str = ""
    """A Docker config JSON with credentials; empty: anonymous."""
    timeout_seconds: float = 15.0
    _insecure: frozenset[str] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_insecure", frozenset(_host_key(h) for h in self.insecure if h.strip()))

    def base_url(self, ref: ImageRef) -> str:
        scheme = "http" if _host_key(ref.registry) in self._insecure else "https"
        return f"{scheme}://{ref.api_host}"

    def _credentials(self, ref: ImageRef) -> tuple[str, str] | None:
        if not self.auth_file:
            return None
        try:
            creds = load_credentials(self.auth_file)
        except (OSError, ValueError) as exc:
            raise RegistryError(f"the registry auth file {self.auth_file} cannot be read: {exc}") from exc
        return creds.get(_host_key(ref.registry))

    async def resolve(self, image: str) -> str:
        """The digest (`sha256:<hex>`) the tag of `image` points at now."""
        try:
            ref = parse_reference(image)
        except ValueError as exc:
            raise RegistryError(str(exc)) from exc
        creds = self._credentials(ref)
        url = f"{self.base_url(ref)}/v2/{ref.repository}/manifests/{ref.tag}"
        where = f"image {image!r} could not be resolved to a digest: registry {ref.registry}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_seconds)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await self._resolve(session, ref, url, creds, where)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryError(f"{where} is unreachable ({type(exc).__name__}: {exc})") from exc
        except ValueError as exc:  # a token endpoint answering something that is not JSON
            raise RegistryError(f"{where} gave an unreadable answer: {exc}") from exc

    async def _resolve(
        self,
        session: aiohttp.ClientSession,
        ref: ImageRef,
        url: str,
        creds: tuple[str, str] | None,
        where: str,
    ) -> str:
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        async with session.head(url, headers=headers) as resp:
            status, answer = resp.status, dict(resp.headers)
        if status == 401:
            headers["Authorization"] = await self._authorize(session, ref, answer, creds, where)
            async with session.head(url, headers=headers) as resp:
                status, answer = resp.status, dict(resp.headers)
        if status == 200 and _DIGEST.match(answer.get("Docker-Content-Digest", "")):
            return answer["Docker-Content-Digest"]
        if status in (200, 405):  # no digest in HEAD (or HEAD not allowed): ask with GET
            async with session.get(url, headers=headers) as resp:
                status, answer, body = resp.status, dict(resp.headers), await resp.read()
            if status == 200:
                digest = answer.get("Docker-Content-Digest", "")
                return digest if _DIGEST.match(digest) else "sha256:" + hashlib.sha256(body).hexdigest()
        raise RegistryError(f"{where} answered {status} {_describe(status)}".rstrip())

    async def _authorize(
        self,
        session: aiohttp.ClientSession,
        ref: ImageRef,
        answer: Mapping[str, str],
        creds: tuple[str, str] | None,
        where: str,
    ) -> str:
        scheme, params = parse_challenge(answer.get("WWW-Authenticate", ""))
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        if scheme == "basic" and basic is not None:
            return basic
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"{where} answered 401 {_describe(401)} (no usable challenge)")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        token_headers = {"Authorization": basic} if basic else {}
        async with session.get(params["realm"], params=query, headers=token_headers) as resp:
            status = resp.status
            body = await resp.json(content_type=None) if status == 200 else None
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if status != 200 or not token:
            who = "with the configured credentials" if creds else "anonymously"
            raise RegistryError(f"{where} refused a pull token {who} (token endpoint answered {status})")
        return f"Bearer {token}"


def _describe(status: int) -> str:
    return {
        401: "(unauthorized: credentials missing or refused)",
        403: "(forbidden)",
        404: "(no such repository or tag)",
        429: "(rate limited)",
    }.get(status, "")
