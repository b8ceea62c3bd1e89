"""Kubernetes API double routes for the cluster-level reads of `fabrik doctor`.

Behaves like the API server for the subset it serves (JSON bodies of the real shapes, `Status`
objects for errors), so the real `kubernetes-asyncio` client is tested against it.

Two ways to use it:

- `ClusterFront(double)` composes with the workload double (`fabrik_common.testing.k8s_double.
  KubeDouble`: namespaces, storage classes, quotas, limit ranges, secrets, roles and role bindings,
  self subject access reviews): a small HTTP server in front of it that adds what that double does
  not serve, and forwards every other request to it:
    GET  /version                                            (every field of `version.Info`)
    POST /apis/authorization.k8s.io/v1/subjectaccessreviews  (answered from the double's Roles and
                                                              RoleBindings, as RBAC would)
- `ClusterDouble(ClusterObjects())` serves the whole subset on its own, with a bearer token check
  (for the failure modes: 401, a user who may not review others, ...):
    GET  /version, /api/v1/namespaces/{name}, /apis/storage.k8s.io/v1/storageclasses,
         /api/v1/namespaces/{ns}/resourcequotas, .../limitranges, .../secrets/{name}
    POST /apis/authorization.k8s.io/v1/subjectaccessreviews, .../selfsubjectaccessreviews

Both write a kubeconfig (`kubeconfig(path)`) pointing at themselves.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from aiohttp import ClientSession, web

from fabrik_common.testing.http_double import HttpDouble

JSON = dict[str, Any]
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"


@dataclass(frozen=True)
class Permission:
    namespace: str
    """"" for cluster-scoped, "*" for every namespace."""
    group: str
    resource: str
    verb: str
    subresource: str = ""

    def covers(self, namespace: str, group: str, resource: str, subresource: str, verb: str) -> bool:
        return (
            self.namespace in ("*", namespace)
            and self.group in ("*", group)
            and self.resource in ("*", resource)
            and self.subresource in ("*", subresource)
            and self.verb in ("*", verb)
        )


@dataclass
class ClusterObjects:
    """What the double's cluster holds; tests change it between requests."""

    namespaces: dict[str, JSON] = field(default_factory=dict)
    storage_classes: dict[str, JSON] = field(default_factory=dict)
    resource_quotas: dict[str, list[JSON]] = field(default_factory=dict)
    limit_ranges: dict[str, list[JSON]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], JSON] = field(default_factory=dict)
    grants: dict[str, list[Permission]] = field(default_factory=dict)
    """User name -> what it may do (SubjectAccessReview answers from here)."""
    self_user: str = "kubernetes-admin"
    """Who the kubeconfig's token authenticates as (SelfSubjectAccessReview)."""
    may_review_others: bool = True
    """False: creating a SubjectAccessReview is forbidden (403), as for a user without the right."""
    token: str = "double-token"  # noqa: S105 - a test double's credential
    version: str = "v1.31.0+double"
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(method, path) of every request, for assertions."""

    # -- helpers for tests -------------------------------------------------------------------

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.namespaces[name] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
            "status": {"phase": "Active"},
        }

    def add_storage_class(
        self, name: str, *, default: bool = False, provisioner: str = "rancher.io/local-path"
    ) -> None:
        annotations = {DEFAULT_CLASS_ANNOTATION: "true"} if default else {}
        self.storage_classes[name] = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name, "annotations": annotations},
            "provisioner": provisioner,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
        }

    def add_resource_quota(self, namespace: str, name: str, hard: dict[str, str]) -> None:
        self.resource_quotas.setdefault(namespace, []).append(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"hard": hard},
                "status": {"hard": hard, "used": {k: "0" for k in hard}},
            }
        )

    def add_limit_range(
        self, namespace: str, name: str, default: dict[str, str], request: dict[str, str]
    ) -> None:
        self.limit_ranges.setdefault(namespace, []).append(
            {
                "apiVersion": "v1",
                "kind": "LimitRange",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"limits": [{"type": "Container", "default": default, "defaultRequest": request}]},
            }
        )

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.secrets[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    def allow(
        self,
        user: str,
        namespace: str,
        group: str,
        resource: str,
        verbs: list[str],
        subresource: str = "",
    ) -> None:
        self.grants.setdefault(user, []).extend(
            Permission(namespace, group, resource, verb, subresource) for verb in verbs
        )

    def revoke(self, user: str, resource: str, verb: str, subresource: str = "") -> None:
        self.grants[user] = [
            p
            for p in self.grants.get(user, [])
            if not (p.resource == resource and p.verb == verb and p.subresource == subresource)
        ]

    def allowed(self, user: str, attributes: JSON) -> bool:
        namespace = str(attributes.get("namespace") or "")
        group = str(attributes.get("group") or "")
        resource = str(attributes.get("resource") or "")
        subresource = str(attributes.get("subresource") or "")
        verb = str(attributes.get("verb") or "")
        return any(p.covers(namespace, group, resource, subresource, verb) for p in self.grants.get(user, []))


def status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def _list(kind: str, api_version: str, items: list[JSON]) -> web.Response:
    return web.json_response(
        {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}
    )


def add_cluster_routes(app: web.Application, cluster: ClusterObjects) -> None:
    """Serve the cluster-level subset from `cluster` on `app` (with its token check)."""

    def authorized(request: web.Request) -> web.Response | None:
        cluster.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {cluster.token}":
            return status(401, "Unauthorized", "Unauthorized")
        return None

    async def version(request: web.Request) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        major, minor = cluster.version.lstrip("v").split(".")[:2]
        return web.json_response(
            {
                "major": major,
                "minor": minor,
                "gitVersion": cluster.version,
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.23",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def namespace(request: web.Request) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        name = request.match_info["name"]
        found = cluster.namespaces.get(name)
        if found is None:
            return status(404, "NotFound", f'namespaces "{name}" not found')
        return web.json_response(found)

    async def storage_classes(request: web.Request) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        return _list("StorageClassList", "storage.k8s.io/v1", list(cluster.storage_classes.values()))

    async def quotas(request: web.Request) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        return _list("ResourceQuotaList", "v1", cluster.resource_quotas.get(request.match_info["ns"], []))

    async def limit_ranges(request: web.Request) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        return _list("LimitRangeList", "v1", cluster.limit_ranges.get(request.match_info["ns"], []))

    async def secret(request: web.Request) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        ns, name = request.match_info["ns"], request.match_info["name"]
        found = cluster.secrets.get((ns, name))
        if found is None:
            return status(404, "NotFound", f'secrets "{name}" not found')
        return web.json_response(found)

    async def review(request: web.Request, *, self_review: bool) -> web.Response:
        if (denied := authorized(request)) is not None:
            return denied
        kind = "SelfSubjectAccessReview" if self_review else "SubjectAccessReview"
        if not self_review and not cluster.may_review_others:
            return status(
                403,
                "Forbidden",
                f'subjectaccessreviews.authorization.k8s.io is forbidden: User "{cluster.self_user}" cannot '
                'create resource "subjectaccessreviews" in API group "authorization.k8s.io" '
                "at the cluster scope",
            )
        try:
            body = json.loads(await request.read())
        except ValueError:
            return status(400, "BadRequest", "the body is not JSON")
        spec = body.get("spec") if isinstance(body, dict) else None
        attributes = spec.get("resourceAttributes") if isinstance(spec, dict) else None
        if not isinstance(attributes, dict):
            return status(422, "Invalid", f"{kind}.authorization.k8s.io: spec.resourceAttributes is required")
        user = cluster.self_user if self_review else str(spec.get("user") or "")  # type: ignore[union-attr]
        allowed = cluster.allowed(user, attributes)
        return web.json_response(
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": kind,
                "metadata": {},
                "spec": spec,
                "status": {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule allows it"})},
            },
            status=201,
        )

    async def subject_review(request: web.Request) -> web.Response:
        return await review(request, self_review=False)

    async def self_review(request: web.Request) -> web.Response:
        return await review(request, self_review=True)

    app.router.add_get("/version", version)
    app.router.add_get("/version/", version)
    app.router.add_get("/api/v1/namespaces/{name}", namespace)
    app.router.add_get("/apis/storage.k8s.io/v1/storageclasses", storage_classes)
    app.router.add_get("/api/v1/namespaces/{ns}/resourcequotas", quotas)
    app.router.add_get("/api/v1/namespaces/{ns}/limitranges", limit_ranges)
    app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", secret)
    app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", subject_review)
    app.router.add_post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", self_review)


def write_kubeconfig(path: Path, server: str, token: str, *, context: str = "double") -> Path:
    """A kubeconfig (JSON is YAML) pointing at `server` with a bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server}}],
        "users": [{"name": context, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "current-context": context,
    }
    path.write_text(json.dumps(config, indent=2))
    return path


class ClusterDouble(HttpDouble):
    """The cluster-level double on its own HTTP server; `async with ClusterDouble() as k8s:`."""

    def __init__(self, cluster: ClusterObjects | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.cluster = cluster or ClusterObjects()

    def make_app(self) -> web.Application:
        app = web.Application()
        add_cluster_routes(app, self.cluster)
        return app

    def kubeconfig(self, path: Path) -> Path:
        return write_kubeconfig(path, self.url, self.cluster.token)


# --------------------------------------------------------------------------------------------
# RBAC evaluation and the front of the workload double


def _subject_matches(subject: JSON, user: str) -> bool:
    kind = subject.get("kind")
    name = str(subject.get("name") or "")
    if kind == "User":
        return name == user
    if kind == "ServiceAccount":
        return user == f"system:serviceaccount:{subject.get('namespace') or ''}:{name}"
    if kind == "Group" and user.startswith("system:serviceaccount:"):
        namespace = user.split(":")[2]
        return name in (
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        )
    return False


def _rule_allows(rule: JSON, attributes: JSON) -> bool:
    group = str(attributes.get("group") or "")
    resource = str(attributes.get("resource") or "")
    subresource = str(attributes.get("subresource") or "")
    verb = str(attributes.get("verb") or "")
    name = str(attributes.get("name") or "")
    full = f"{resource}/{subresource}" if subresource else resource
    groups = rule.get("apiGroups") or []
    resources = rule.get("resources") or []
    verbs = rule.get("verbs") or []
    names = rule.get("resourceNames") or []
    return (
        ("*" in groups or group in groups)
        and ("*" in resources or full in resources)
        and ("*" in verbs or verb in verbs)
        and (not names or name in names)
    )


def rbac_allows(roles: list[JSON], bindings: list[JSON], user: str, attributes: JSON) -> bool:
    """Whether the RoleBindings (and their Roles) of the attributes' namespace let `user` do it."""
    by_name = {str(r.get("metadata", {}).get("name")): r for r in roles}
    for binding in bindings:
        if not any(_subject_matches(s, user) for s in binding.get("subjects") or []):
            continue
        ref = binding.get("roleRef") or {}
        role = by_name.get(str(ref.get("name"))) if ref.get("kind") == "Role" else None
        if role is not None and any(_rule_allows(rule, attributes) for rule in role.get("rules") or []):
            return True
    return False


class WorkloadDouble(Protocol):
    """What the front needs of the workload double: where it listens (it reads Roles and
    RoleBindings through the double's API, like any client)."""

    @property
    def url(self) -> str: ...


class ClusterFront(HttpDouble):
    """In front of the workload double: `/version` and subject access reviews here, the rest there."""

    def __init__(
        self, double: WorkloadDouble, *, version: str = "v1.31.0+double", may_review_others: bool = True
    ) -> None:
        super().__init__()
        self.double = double
        self.version = version
        self.may_review_others = may_review_others
        self.requests: list[tuple[str, str]] = []
        self._session: ClientSession | None = None

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/version", self._version)
        app.router.add_get("/version/", self._version)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self._review)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        return app

    async def start(self) -> Self:
        self._session = ClientSession()
        return await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def kubeconfig(self, path: Path, token: str = "front-token") -> Path:  # noqa: S107 - a test double's
        return write_kubeconfig(path, self.url, token)

    async def _version(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        major, minor = self.version.lstrip("v").split(".")[:2]
        return web.json_response(
            {
                "major": major,
                "minor": minor,
                "gitVersion": self.version,
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.23",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def _review(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if not self.may_review_others:
            return status(
                403,
                "Forbidden",
                'subjectaccessreviews.authorization.k8s.io is forbidden: User "front" cannot create resource '
                '"subjectaccessreviews" in API group "authorization.k8s.io" at the cluster scope',
            )
        body = await request.json()
        spec = body.get("spec") if isinstance(body, dict) else None
        attributes = spec.get("resourceAttributes") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(attributes, dict):
            return status(
                422,
                "Invalid",
                "SubjectAccessReview.authorization.k8s.io: spec.resourceAttributes is required",
            )
        namespace = str(attributes.get("namespace") or "")
        allowed = rbac_allows(
            await self._items(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles"),
            await self._items(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"),
            str(spec.get("user") or ""),
            attributes,
        )
        return web.json_response(
            {
                **body,
                "status": {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule allows it"})},
            },
            status=201,
        )

    async def _items(self, path: str) -> list[JSON]:
        assert self._session is not None
        async with self._session.get(self.double.url + path) as response:
            if response.status == 404:
                return []
            response.raise_for_status()
            body = await response.json()
        items = body.get("items") if isinstance(body, dict) else None
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []

    async def _forward(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.double.url + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            body = await upstream.read()
            return web.Response(
                body=body, status=upstream.status, content_type=upstream.content_type or "application/json"
            )
