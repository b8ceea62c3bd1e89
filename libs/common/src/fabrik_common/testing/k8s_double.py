"""A local HTTP double of the Kubernetes API server, for tests that use a real Kubernetes client.

`KubeDouble` serves the subset of the API that Fabrik uses on 127.0.0.1 (a free port), with the
semantics that client code depends on, so the same code runs against it and against k3s:

- resources: pods (+ `log`, `eviction`), persistentvolumeclaims, secrets (`stringData` folded into
  `data`), configmaps, events, serviceaccounts, services, resourcequotas, limitranges, namespaces,
  nodes, persistentvolumes, jobs (batch/v1), storageclasses (storage.k8s.io/v1), roles and
  rolebindings, volumesnapshots and volumesnapshotclasses (snapshot.storage.k8s.io/v1, the CRDs
  of the CSI external snapshotter; `snapshot_api=False` serves a cluster without them), and
  `selfsubjectaccessreviews` (answered by `KubeDouble.authorize`);
- create / get / list / replace (PUT, with the resourceVersion precondition → 409 Conflict) /
  patch (JSON patch, merge patch, strategic merge patch with `finalizers` merged as a set) /
  delete (graceful for pods, finalizers, `propagationPolicy` Foreground / Background / Orphan);
- list + watch with `resourceVersion` (one global counter), synthetic `ADDED` events for a watch
  without one, `BOOKMARK` events (`allowWatchBookmarks`), `timeoutSeconds`, and `410 Gone` (an
  `ERROR` event with an `Expired` Status, as the API server's watch cache sends it) for a
  resourceVersion older than the kept history; label selectors (equality and set-based) and
  field selectors (`metadata.name`, `involvedObject.name`, `status.phase`, any dotted path);
- errors as real `Status` objects (`AlreadyExists`, `NotFound`, `Conflict`, `Invalid`,
  `BadRequest`, `Expired`);
- a snapshot controller: a new VolumeSnapshot whose class or source PVC does not exist, or whose
  class's `driver` is not the PVC's storage class's provisioner, gets `status.error` as the CSI
  snapshotter reports it; otherwise it becomes `readyToUse` with the PVC's capacity as
  `restoreSize` after `snapshot_ready_seconds` (None: only when the test calls `ready_snapshot`);
  `fail_snapshots` (PVC name → message) makes the driver fail a snapshot of that PVC;
- a Job controller (one pod per Job from its template, `activeDeadlineSeconds` →
  `DeadlineExceeded`, `backoffLimit: 0` → `BackoffLimitExceeded`, `Complete`), a garbage
  collector (owner references, foreground deletion) and a kubelet that plays a *script* per pod:
  pending, image pull back-off, init container, running, log lines, exit, OOM kill, eviction,
  node loss (`Script`, `KubeDouble.script`). Pods without a script start and exit 0.

Test controls: `drop_watches()` (abort every open watch connection), `compact()` (forget the
history: watches from an older resourceVersion get 410), `drop_log_streams()`, `evict(pod)`,
`lose_node(pod)`, `requests` (every request seen, for assertions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from fabrik_common.testing.http_double import HttpDouble

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How Status messages name the resource: `jobs.batch`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCE_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "pods", "Pod"),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("", "v1", "events", "Event"),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount"),
    ResourceType("", "v1", "services", "Service"),
    ResourceType("", "v1", "resourcequotas", "ResourceQuota"),
    ResourceType("", "v1", "limitranges", "LimitRange"),
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceType("", "v1", "nodes", "Node", namespaced=False),
    ResourceType("", "v1", "persistentvolumes", "PersistentVolume", namespaced=False),
    ResourceType("batch", "v1", "jobs", "Job"),
    ResourceType("storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot"),
    ResourceType(
        "snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", "VolumeSnapshotClass", namespaced=False
    ),
)
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCE_TYPES}
PODS = _BY_PATH[("", "v1", "pods")]
JOBS = _BY_PATH[("batch", "v1", "jobs")]
EVENTS = _BY_PATH[("", "v1", "events")]
NAMESPACES = _BY_PATH[("", "v1", "namespaces")]
PVCS = _BY_PATH[("", "v1", "persistentvolumeclaims")]
SECRETS = _BY_PATH[("", "v1", "secrets")]
STORAGE_CLASSES = _BY_PATH[("storage.k8s.io", "v1", "storageclasses")]
VOLUME_SNAPSHOTS = _BY_PATH[("snapshot.storage.k8s.io", "v1", "volumesnapshots")]
VOLUME_SNAPSHOT_CLASSES = _BY_PATH[("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses")]
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _flag(query: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (`true`, `True`, `1`, ...)."""
    return query.get(name, "").lower() in ("1", "t", "true")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_ts_ns(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


# ---------------------------------------------------------------------------------------------
# Status objects


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        status: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


def _details(rt: ResourceType, name: str) -> Obj:
    details: Obj = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return details


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        _details(rt, name),
    )


def invalid(rt: ResourceType, name: str, message: str) -> ApiError:
    return ApiError(
        422, "Invalid", f'{rt.kind} "{name}" is invalid: {message}', {**_details(rt, name), "kind": rt.kind}
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def gone(requested: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")


# ---------------------------------------------------------------------------------------------
# selectors


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # =, !=, in, notin, exists, !exists
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.values[0]
        if self.op == "!=":
            return labels.get(self.key) != self.values[0]
        if self.op == "in":
            return labels.get(self.key) in self.values
        if self.op == "notin":
            return labels.get(self.key) not in self.values
        raise ValueError(self.op)


def _split_selector(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


_SET_EXPR = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)$")


def parse_label_selector(text: str) -> list[Requirement]:
    requirements: list[Requirement] = []
    for part in _split_selector(text or ""):
        match = _SET_EXPR.match(part)
        if match:
            key, op, values = match.groups()
            requirements.append(
                Requirement(key, op, tuple(v.strip() for v in values.split(",") if v.strip()))
            )
        elif part.startswith("!"):
            requirements.append(Requirement(part[1:].strip(), "!exists"))
        elif "!=" in part:
            key, _, value = part.partition("!=")
            requirements.append(Requirement(key.strip(), "!=", (value.strip(),)))
        elif "==" in part:
            key, _, value = part.partition("==")
            requirements.append(Requirement(key.strip(), "=", (value.strip(),)))
        elif "=" in part:
            key, _, value = part.partition("=")
            requirements.append(Requirement(key.strip(), "=", (value.strip(),)))
        elif re.match(r"^[A-Za-z0-9./_-]+$", part):
            requirements.append(Requirement(part, "exists"))
        else:
            raise bad_request(f"unable to parse requirement: {part!r}")
    return requirements


def _path_value(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return ""
        node = node.get(part)
    return "" if node is None else str(node)


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for part in _split_selector(text or ""):
        for op in ("!=", "==", "="):
            if op in part:
                key, _, value = part.partition(op)
                out.append((key.strip(), "!=" if op == "!=" else "=", value.strip()))
                break
        else:
            raise bad_request(f"invalid field selector: {part!r}")
    return out


@dataclass(frozen=True)
class Filter:
    namespace: str | None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        for key, op, value in self.fields:
            actual = _path_value(obj, key)
            if (actual == value) != (op == "="):
                return False
        return True


# ---------------------------------------------------------------------------------------------
# patches


def merge_patch(target: Any, patch: Any, *, strategic: bool = False, path: str = "") -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        sub = f"{path}.{key}" if path else key
        if value is None:
            result.pop(key, None)
        elif strategic and sub == "metadata.finalizers" and isinstance(value, list):
            existing = list(result.get(key) or [])
            result[key] = existing + [v for v in value if v not in existing]
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic, path=sub)
    if strategic and path == "metadata" and "$deleteFromPrimitiveList/finalizers" in patch:
        drop = set(patch["$deleteFromPrimitiveList/finalizers"])
        result["finalizers"] = [f for f in result.get("finalizers") or [] if f not in drop]
    return result


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(str(op.get("path", "")))
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1]
        kind = op.get("op")
        try:
            if kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if current != op.get("value"):
                    raise ApiError(422, "Invalid", f"the test operation failed for path {op.get('path')}")
            elif kind == "remove":
                if isinstance(parent, list):
                    parent.pop(int(last))
                else:
                    del parent[last]
            elif kind in ("add", "replace"):
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, op.get("value"))
                    else:
                        parent[index] = op.get("value")
                else:
                    if kind == "replace" and last not in parent:
                        raise ApiError(422, "Invalid", f"replace of a missing path {op.get('path')}")
                    parent[last] = op.get("value")
            else:
                raise bad_request(f"unsupported JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the JSON patch does not apply: {op} ({exc})") from exc
    return doc


# ---------------------------------------------------------------------------------------------
# scripts (what the fake kubelet does with a pod)


@dataclass(frozen=True)
class Step:
    kind: str
    seconds: float = 0.0
    lines: tuple[str, ...] = ()
    code: int = 0
    reason: str = ""
    message: str = ""


class Script:
    """Steps the fake kubelet plays for a pod; a pod deleted meanwhile stops its script and its
    running containers end with exit code 143 (SIGTERM), as the kubelet does."""

    def __init__(self, *steps: Step) -> None:
        self.steps = steps

    # builders -----------------------------------------------------------------
    @staticmethod
    def wait(seconds: float) -> Step:
        """Stay as is (Pending / ContainerCreating before `start`) for a while."""
        return Step("wait", seconds=seconds)

    @staticmethod
    def init(code: int = 0, *lines: str) -> Step:
        """Run the pod's init container (if it has one) to its end with this exit code."""
        return Step("init", code=code, lines=lines)

    @staticmethod
    def image_pull_backoff(message: str = "") -> Step:
        """The workload image cannot be pulled: ErrImagePull, then ImagePullBackOff, forever."""
        return Step("pull_backoff", message=message)

    @staticmethod
    def start() -> Step:
        return Step("start")

    @staticmethod
    def log(*lines: str) -> Step:
        """Lines written in one write (they share one timestamp)."""
        return Step("log", lines=lines)

    @staticmethod
    def exit(code: int, message: str = "") -> Step:
        return Step("exit", code=code, message=message)

    @staticmethod
    def oom_kill() -> Step:
        return Step("oom")

    @staticmethod
    def evict(message: str = "The node was low on resource: memory.") -> Step:
        """Node-pressure eviction by the kubelet: pod Failed, reason Evicted."""
        return Step("evict", message=message)

    @staticmethod
    def lose_node() -> Step:
        """The node disappears: the pod is marked disrupted and force-deleted, no exit recorded."""
        return Step("lose_node")

    @staticmethod
    def hang() -> Step:
        """Keep running until deleted (or the Job's deadline)."""
        return Step("hang")


DEFAULT_SCRIPT = Script(Script.start(), Script.exit(0))


@dataclass
class ContainerLog:
    lines: list[tuple[int, str]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    closed: bool = False


@dataclass(eq=False)
class _Watcher:
    rt: ResourceType
    filter: Filter
    queue: asyncio.Queue[Obj | None]
    request: web.Request


@dataclass
class _HistoryEntry:
    rv: int
    rt: ResourceType
    kind: str
    obj: Obj
    old: Obj | None


# ---------------------------------------------------------------------------------------------
# the server


class KubeDouble(HttpDouble):
    def __init__(
        self,
        *,
        namespaces: Iterable[str] = ("default", "kube-system", "fabrik-system", "fabrik-runs"),
        history_limit: int = 10_000,
        bookmark_interval: float = 1.0,
        pod_termination_seconds: float = 0.05,
        default_storage_class: str | None = "local-path",
        node_name: str = "double-node-1",
        version: tuple[int, int] = (1, 30),
        snapshot_api: bool = True,
        snapshot_ready_seconds: float | None = 0.05,
    ) -> None:
        super().__init__()
        self.snapshot_api = snapshot_api
        """False: the snapshot CRDs are not installed (their API group answers 404)."""
        self.snapshot_ready_seconds = snapshot_ready_seconds
        self.fail_snapshots: dict[str, str] = {}
        """PVC name -> the error message the CSI driver reports for a snapshot of it."""
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.resource_version = 0
        self.history: list[_HistoryEntry] = []
        self.compacted_rv = 0
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.pod_termination_seconds = pod_termination_seconds
        self.default_storage_class = default_storage_class
        self.node_name = node_name
        self.version = version
        self.requests: list[tuple[str, str]] = []
        self.scripts: list[tuple[dict[str, str], Script]] = []
        self.authorize: Callable[[Obj], bool] = lambda attributes: True
        self.logs: dict[tuple[str, str, str], ContainerLog] = {}
        self._watchers: set[_Watcher] = set()
        self._log_requests: dict[int, web.Request] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pod_tasks: dict[str, asyncio.Task[Any]] = {}
        self._deadline_tasks: dict[str, asyncio.Task[Any]] = {}
        for ns in namespaces:
            namespace: Obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            # stored as any created object is (uid, creationTimestamp, resourceVersion), so that
            # put_object and the API can replace it later
            self._prepare_new(NAMESPACES, namespace, "")
            self._commit(NAMESPACES, "", ns, namespace, new=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_route("*", "/{tail:.*}", self._route)
        return app

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.drop_watches()
        self.drop_log_streams()
        await super().stop()

    def _spawn(self, coro: Any, name: str = "") -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- test controls ---------------------------------------------------------------------

    def script(self, labels: Mapping[str, str], script: Script) -> None:
        """Pods created from now on whose labels include `labels` play `script`."""
        self.scripts.append((dict(labels), script))

    def drop_watches(self) -> int:
        """Abort every open watch connection (the client sees the connection drop mid-stream)."""
        watchers = list(self._watchers)
        for watcher in watchers:
            transport = watcher.request.transport
            if transport is not None:
                transport.abort()
            watcher.queue.put_nowait(None)
        self._watchers.clear()
        return len(watchers)

    def drop_log_streams(self) -> int:
        requests = list(self._log_requests.values())
        for request in requests:
            if request.transport is not None:
                request.transport.abort()
        self._log_requests.clear()
        return len(requests)

    def compact(self) -> int:
        """Forget the change history: a watch from any resourceVersion before now gets 410 Gone."""
        self.history.clear()
        self.compacted_rv = self.resource_version
        return self.compacted_rv

    def get(self, rt_plural: str, namespace: str, name: str) -> Obj | None:
        rt = next(r for r in RESOURCE_TYPES if r.plural == rt_plural)
        obj = self.objects.get((self._rkey(rt), namespace if rt.namespaced else "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, rt_plural: str, namespace: str | None = None, selector: str = "") -> list[Obj]:
        rt = next(r for r in RESOURCE_TYPES if r.plural == rt_plural)
        flt = Filter(namespace, tuple(parse_label_selector(selector)))
        return [
            copy.deepcopy(o)
            for (k, _, _), o in sorted(self.objects.items())
            if k == self._rkey(rt) and flt.matches(o)
        ]

    def put_object(self, obj: Obj) -> Obj:
        """Create or replace an object directly (test setup), as the API would store it."""
        rt = self._type_of(obj)
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "") if rt.namespaced else ""
        key = (self._rkey(rt), ns, meta["name"])
        old = self.objects.get(key)
        if old is None:
            self._prepare_new(rt, obj, ns)
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        return self._commit(rt, ns, meta["name"], obj, new=old is None)

    def evict(self, namespace: str, pod: str, message: str = "Evicted by the test") -> None:
        self._spawn(self._evict_pod(namespace, pod, message))

    def lose_node(self, namespace: str, pod: str) -> None:
        self._spawn(self._lose_node(namespace, pod))

    def pods_of_job(self, namespace: str, job: str) -> list[Obj]:
        return self.list_objects("pods", namespace, f"batch.kubernetes.io/job-name={job}")

    def ready_snapshot(self, namespace: str, name: str) -> Obj | None:
        """Make a VolumeSnapshot ready to use now (as the controller does once the driver is done)."""
        return self._snapshot_ready(namespace, name)

    # ---- storage ---------------------------------------------------------------------------

    @staticmethod
    def _rkey(rt: ResourceType) -> str:
        return f"{rt.group}/{rt.plural}"

    def _type_of(self, obj: Obj) -> ResourceType:
        for rt in RESOURCE_TYPES:
            if rt.kind == obj.get("kind") and rt.api_version == obj.get("apiVersion"):
                return rt
        raise bad_request(f"unknown kind {obj.get('apiVersion')}/{obj.get('kind')}")

    def _prepare_new(self, rt: ResourceType, obj: Obj, ns: str) -> None:
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        if rt.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        if rt is JOBS:
            meta["generation"] = 1
            obj.setdefault("status", {})
            spec = obj.setdefault("spec", {})
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completions", 1)
            spec.setdefault("parallelism", 1)
            template_labels = (
                spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
            )
            template_labels.setdefault("batch.kubernetes.io/controller-uid", meta["uid"])
            template_labels.setdefault("batch.kubernetes.io/job-name", meta["name"])
        elif rt is SECRETS:
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) or {}
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data
        elif rt is PVCS:
            spec = obj.setdefault("spec", {})
            if "storageClassName" not in spec and self.default_storage_class:
                spec["storageClassName"] = self.default_storage_class
            spec.setdefault("volumeMode", "Filesystem")
            obj["status"] = {
                "phase": "Bound",
                "accessModes": spec.get("accessModes", []),
                "capacity": dict((spec.get("resources") or {}).get("requests") or {}),
            }
        elif rt is PODS:
            obj.setdefault("status", {"phase": "Pending", "qosClass": "Burstable"})
        elif rt is NAMESPACES:
            obj.setdefault("status", {"phase": "Active"})

    def _commit(self, rt: ResourceType, ns: str, name: str, obj: Obj | None, *, new: bool = False) -> Obj:
        """Store (or delete, obj=None) an object: one new resourceVersion, one watch event."""
        key = (self._rkey(rt), ns, name)
        old = self.objects.get(key)
        self.resource_version += 1
        rv = self.resource_version
        if obj is None:
            assert old is not None
            stored = copy.deepcopy(old)
            stored["metadata"]["resourceVersion"] = str(rv)
            del self.objects[key]
            kind = "DELETED"
        else:
            stored = copy.deepcopy(obj)
            stored["metadata"]["resourceVersion"] = str(rv)
            self.objects[key] = stored
            kind = "ADDED" if new or old is None else "MODIFIED"
        entry = _HistoryEntry(rv, rt, kind, copy.deepcopy(stored), copy.deepcopy(old) if old else None)
        self.history.append(entry)
        if len(self.history) > self.history_limit:
            dropped = self.history.pop(0)
            self.compacted_rv = dropped.rv
        for watcher in list(self._watchers):
            if watcher.rt is rt:
                event = self._event_for(watcher.filter, entry)
                if event is not None:
                    watcher.queue.put_nowait(event)
        self._react(rt, kind, stored, old)
        return copy.deepcopy(stored)

    @staticmethod
    def _event_for(flt: Filter, entry: _HistoryEntry) -> Obj | None:
        now_match = flt.matches(entry.obj)
        old_match = entry.old is not None and flt.matches(entry.old)
        if entry.kind == "DELETED":
            return {"type": "DELETED", "object": entry.obj} if (now_match or old_match) else None
        if entry.kind == "ADDED":
            return {"type": "ADDED", "object": entry.obj} if now_match else None
        if now_match and old_match:
            return {"type": "MODIFIED", "object": entry.obj}
        if now_match:
            return {"type": "ADDED", "object": entry.obj}
        if old_match:
            return {"type": "DELETED", "object": entry.obj}
        return None

    def _update(self, rt: ResourceType, ns: str, name: str, mutate: Callable[[Obj], None]) -> Obj | None:
        current = self.objects.get((self._rkey(rt), ns, name))
        if current is None:
            return None
        obj = copy.deepcopy(current)
        mutate(obj)
        return self._commit(rt, ns, name, obj)

    # ---- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        self.requests.append((request.method, request.path_qs))
        if path == "/version":
            major, minor = self.version
            # a complete VersionInfo: kubernetes-asyncio's VersionApi.get_code requires every field
            return web.json_response(
                {
                    "major": str(major),
                    "minor": str(minor),
                    "gitVersion": f"v{major}.{minor}.0-double",
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2024-01-01T00:00:00Z",
                    "goVersion": "go1.22.0",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            )
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" and request.method == "POST":
            review = await request.json()
            attributes = (review.get("spec") or {}).get("resourceAttributes") or {}
            review["status"] = {"allowed": bool(self.authorize(attributes))}
            return web.json_response(review, status=201)
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        ns = ""
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
            ns, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = _BY_PATH.get((group, version, rest[0]))
        if group == SNAPSHOT_GROUP and not self.snapshot_api:
            rt = None
        if rt is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if rt.namespaced and not ns and name:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        method = request.method
        if sub == "log" and rt is PODS and method == "GET":
            return await self._pod_log(request, ns, name)
        if sub == "eviction" and rt is PODS and method == "POST":
            return await self._eviction(ns, name)
        if sub == "status":
            if method == "GET":
                return web.json_response(self._get(rt, ns, name))
            body = await request.json()
            return web.json_response(await self._write(request, rt, ns, name, body, subresource="status"))
        if sub:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if not name:
            if method == "GET":
                if _flag(request.query, "watch"):
                    return await self._watch(request, rt, ns or None)
                return web.json_response(self._list(request, rt, ns or None))
            if method == "POST":
                return web.json_response(self._create(rt, ns, await request.json()), status=201)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        if method == "GET":
            return web.json_response(self._get(rt, ns, name))
        if method in ("PUT", "PATCH"):
            body = await request.json()
            return web.json_response(await self._write(request, rt, ns, name, body))
        if method == "DELETE":
            options: Obj = {}
            if request.can_read_body:
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    options = await request.json() or {}
            return self._delete(rt, ns, name, options, request.query)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    # ---- CRUD ------------------------------------------------------------------------------

    def _get(self, rt: ResourceType, ns: str, name: str) -> Obj:
        obj = self.objects.get((self._rkey(rt), ns if rt.namespaced else "", name))
        if obj is None:
            raise not_found(rt, name)
        return copy.deepcopy(obj)

    def _filter(self, request: web.Request, ns: str | None) -> Filter:
        return Filter(
            ns,
            tuple(parse_label_selector(request.query.get("labelSelector", ""))),
            tuple(parse_field_selector(request.query.get("fieldSelector", ""))),
        )

    def _list(self, request: web.Request, rt: ResourceType, ns: str | None) -> Obj:
        flt = self._filter(request, ns)
        items = []
        for (k, _, _), obj in sorted(self.objects.items()):
            if k == self._rkey(rt) and flt.matches(obj):
                item = copy.deepcopy(obj)
                item.pop("apiVersion", None)
                item.pop("kind", None)
                items.append(item)
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.resource_version)},
            "items": items,
        }

    def _create(self, rt: ResourceType, ns: str, body: Obj) -> Obj:
        if not isinstance(body, dict):
            raise bad_request("the body must be an object")
        meta = body.setdefault("metadata", {})
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and body_ns != ns:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            if (self._rkey(NAMESPACES), "", ns) not in self.objects:
                raise not_found(NAMESPACES, ns)
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + secrets.token_hex(3)[:5]
            meta["name"] = name
        if not name:
            raise invalid(rt, "", "metadata.name: Required value: name or generateName is required")
        if len(name) > 253 or not _NAME.match(name):
            raise invalid(
                rt,
                name,
                f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain "
                "must consist of lower case alphanumeric characters, '-' or '.'",
            )
        key = (self._rkey(rt), ns if rt.namespaced else "", name)
        if key in self.objects:
            raise already_exists(rt, name)
        for k in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp"):
            meta.pop(k, None)
        if rt is JOBS:
            labels = meta.get("labels") or {}
            if len(name) > 63:
                raise invalid(rt, name, "metadata.name: must be no more than 63 characters")
            for value in labels.values():
                if len(value) > 63:
                    raise invalid(rt, name, f"metadata.labels: Invalid value: {value!r}")
        self._prepare_new(rt, body, ns)
        return self._commit(rt, ns if rt.namespaced else "", name, body, new=True)

    async def _write(
        self, request: web.Request, rt: ResourceType, ns: str, name: str, body: Any, subresource: str = ""
    ) -> Obj:
        ns = ns if rt.namespaced else ""
        current = self.objects.get((self._rkey(rt), ns, name))
        if current is None:
            raise not_found(rt, name)
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if request.method == "PUT":
            if not isinstance(body, dict):
                raise bad_request("the body must be an object")
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                raise conflict(rt, name)
            new = copy.deepcopy(body)
        elif content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise bad_request("a JSON patch must be a list of operations")
            new = json_patch(current, body)
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise bad_request("a merge patch must be an object")
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                raise conflict(rt, name)
            new = merge_patch(current, body, strategic=content_type.startswith("application/strategic"))
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {content_type}",
            )
        meta = new.setdefault("metadata", {})
        old_meta = current["metadata"]
        if meta.get("name", name) != name:
            raise bad_request("the name of the object does not match the name on the URL")
        for k in (
            "uid",
            "creationTimestamp",
            "namespace",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if k in old_meta:
                meta[k] = old_meta[k]
            else:
                meta.pop(k, None)
        meta["name"] = name
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(current)
            new["status"] = status
        elif "status" in current:
            new["status"] = copy.deepcopy(current["status"])
        if rt is SECRETS:
            string_data = new.pop("stringData", None) or {}
            data = new.setdefault("data", {}) or {}
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            new["data"] = data
        if rt is JOBS and new.get("spec", {}).get("template") != current.get("spec", {}).get("template"):
            raise invalid(rt, name, "spec.template: Invalid value: field is immutable")
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise ApiError(
                    422,
                    "Invalid",
                    "no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)}",
                )
            if not meta.get("finalizers"):
                self._commit(rt, ns, name, new)
                return self._commit(rt, ns, name, None)
        return self._commit(rt, ns, name, new)

    def _delete(
        self, rt: ResourceType, ns: str, name: str, body: Obj, query: Mapping[str, str]
    ) -> web.Response:
        ns = ns if rt.namespaced else ""
        current = self.objects.get((self._rkey(rt), ns, name))
        if current is None:
            raise not_found(rt, name)
        preconditions = body.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
            raise conflict(rt, name)
        if (
            preconditions.get("resourceVersion")
            and preconditions["resourceVersion"] != current["metadata"]["resourceVersion"]
        ):
            raise conflict(rt, name)
        policy = (
            body.get("propagationPolicy")
            or query.get("propagationPolicy")
            or ("Orphan" if body.get("orphanDependents") else None)
        )
        if policy is None:
            policy = "Orphan" if rt is JOBS else "Background"  # batch/v1 Jobs default to orphan
        grace_raw = body.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
        grace = int(grace_raw) if grace_raw is not None else None
        result = self._delete_object(rt, ns, name, policy, grace)
        if result is None:
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {**_details(rt, name), "uid": current["metadata"]["uid"]},
                }
            )
        return web.json_response(result)

    def _delete_object(
        self, rt: ResourceType, ns: str, name: str, policy: str, grace: int | None
    ) -> Obj | None:
        """Delete as the API server does; returns the object if it still exists (finalizers, grace)."""
        current = self.objects[(self._rkey(rt), ns, name)]
        meta = current["metadata"]
        if (
            rt is PODS
            and grace != 0
            and (current.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ):
            if meta.get("deletionTimestamp"):
                return copy.deepcopy(current)
            seconds = (
                grace
                if grace is not None
                else int((current.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            )

            def mark(o: Obj) -> None:
                o["metadata"]["deletionTimestamp"] = now_iso()
                o["metadata"]["deletionGracePeriodSeconds"] = seconds

            updated = self._update(rt, ns, name, mark)
            self._spawn(self._terminate_pod(ns, name), f"terminate:{name}")
            return updated
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and self._dependents(meta["uid"]):
            finalizers = (
                [*finalizers, "foregroundDeletion"] if "foregroundDeletion" not in finalizers else finalizers
            )
        elif policy == "Orphan" and self._dependents(meta["uid"]):
            finalizers = [*finalizers, "orphan"] if "orphan" not in finalizers else finalizers
        if finalizers:
            if meta.get("deletionTimestamp") and finalizers == list(meta.get("finalizers") or []):
                return copy.deepcopy(current)

            def mark_deleting(o: Obj) -> None:
                o["metadata"].setdefault("deletionTimestamp", now_iso())
                o["metadata"]["deletionGracePeriodSeconds"] = 0
                o["metadata"]["finalizers"] = finalizers

            updated = self._update(rt, ns, name, mark_deleting)
            if "foregroundDeletion" in finalizers:
                self._spawn(self._foreground(rt, ns, name, meta["uid"]), f"foreground:{name}")
            if "orphan" in finalizers:
                self._orphan(ns, meta["uid"])
                self._remove_finalizer(rt, ns, name, "orphan")
                return self._get_or_none(rt, ns, name)
            return updated
        self._commit(rt, ns, name, None)
        return None

    def _get_or_none(self, rt: ResourceType, ns: str, name: str) -> Obj | None:
        obj = self.objects.get((self._rkey(rt), ns, name))
        return copy.deepcopy(obj) if obj is not None else None

    def _dependents(self, owner_uid: str) -> list[tuple[ResourceType, str, str]]:
        out = []
        for (rkey, ns, name), obj in self.objects.items():
            refs = (obj.get("metadata") or {}).get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs):
                rt = next(r for r in RESOURCE_TYPES if self._rkey(r) == rkey)
                out.append((rt, ns, name))
        return out

    def _orphan(self, ns: str, owner_uid: str) -> None:
        for rt, dns, dname in self._dependents(owner_uid):

            def drop(o: Obj) -> None:
                o["metadata"]["ownerReferences"] = [
                    r for r in o["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid
                ]

            self._update(rt, dns, dname, drop)

    def _remove_finalizer(self, rt: ResourceType, ns: str, name: str, finalizer: str) -> None:
        current = self.objects.get((self._rkey(rt), ns, name))
        if current is None:
            return
        remaining = [f for f in current["metadata"].get("finalizers") or [] if f != finalizer]

        def drop(o: Obj) -> None:
            o["metadata"]["finalizers"] = remaining

        self._update(rt, ns, name, drop)
        if not remaining and current["metadata"].get("deletionTimestamp"):
            self._commit(rt, ns, name, None)

    async def _foreground(self, rt: ResourceType, ns: str, name: str, uid: str) -> None:
        """The garbage collector's foreground deletion: dependents first, then the owner's finalizer."""
        for drt, dns, dname in self._dependents(uid):
            if (self._rkey(drt), dns, dname) in self.objects:
                self._delete_object(drt, dns, dname, "Background", None)
        while self._dependents(uid):  # noqa: ASYNC110 - the GC polls the store, as the real one resyncs
            await asyncio.sleep(0.01)
        self._remove_finalizer(rt, ns, name, "foregroundDeletion")

    def _collect_orphans(self, owner_uid: str) -> None:
        """Background deletion: the owner is gone, so its dependents go too."""
        for rt, ns, name in self._dependents(owner_uid):
            if (self._rkey(rt), ns, name) in self.objects:
                self._delete_object(rt, ns, name, "Background", None)

    # ---- watch -----------------------------------------------------------------------------

    async def _watch(self, request: web.Request, rt: ResourceType, ns: str | None) -> web.StreamResponse:
        flt = self._filter(request, ns)
        rv_text = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        bookmarks = _flag(request.query, "allowWatchBookmarks")
        queue: asyncio.Queue[Obj | None] = asyncio.Queue()
        initial: list[Obj] = []
        error: ApiError | None = None
        if rv_text in ("", "0"):
            for (k, _, _), obj in sorted(self.objects.items()):
                if k == self._rkey(rt) and flt.matches(obj):
                    initial.append({"type": "ADDED", "object": copy.deepcopy(obj)})
        else:
            try:
                since = int(rv_text)
            except ValueError:
                raise bad_request(f"invalid resourceVersion {rv_text!r}") from None
            if since < self.compacted_rv:
                error = gone(since, self.compacted_rv)
            else:
                for entry in self.history:
                    if entry.rv > since and entry.rt is rt:
                        event = self._event_for(flt, entry)
                        if event is not None:
                            initial.append(event)
        watcher = _Watcher(rt, flt, queue, request)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if error is not None:
            await response.write(json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n")
            await response.write_eof()
            return response
        self._watchers.add(watcher)
        deadline = time.monotonic() + timeout
        try:
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), min(remaining, self.bookmark_interval))
                except TimeoutError:
                    if bookmarks:
                        bookmark = {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": rt.kind,
                                "apiVersion": rt.api_version,
                                "metadata": {"resourceVersion": str(self.resource_version)},
                            },
                        }
                        await response.write(json.dumps(bookmark).encode() + b"\n")
                    continue
                if event is None:
                    return response
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(watcher)
        return response

    # ---- controllers -----------------------------------------------------------------------

    def _react(self, rt: ResourceType, kind: str, obj: Obj, old: Obj | None) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # set-up before the server runs
        meta = obj["metadata"]
        if rt is JOBS and kind == "ADDED" and not (obj.get("spec") or {}).get("suspend"):
            self._spawn(self._job_started(meta["namespace"], meta["name"]), f"job:{meta['name']}")
        if rt is JOBS and kind == "DELETED":
            task = self._deadline_tasks.pop(meta["uid"], None)
            if task is not None:
                task.cancel()
        if kind == "DELETED":
            self._collect_orphans(meta["uid"])
        if rt is VOLUME_SNAPSHOTS and kind == "ADDED":
            self._spawn(self._snapshot_controller(meta["namespace"], meta["name"]), f"snap:{meta['name']}")
        if rt is PODS:
            if kind == "ADDED":
                self._pod_tasks[meta["uid"]] = self._spawn(
                    self._kubelet(meta["namespace"], meta["name"]), f"kubelet:{meta['name']}"
                )
            self._job_sees_pod(kind, obj)

    # ---- the CSI snapshot controller ------------------------------------------------------

    def _snapshot_problem(self, snapshot: Obj) -> str | None:
        """What the external snapshotter reports for a snapshot it cannot take, if anything."""
        ns = snapshot["metadata"]["namespace"]
        spec = snapshot.get("spec") or {}
        pvc_name = (spec.get("source") or {}).get("persistentVolumeClaimName")
        if not pvc_name:
            return None  # pre-provisioned from a VolumeSnapshotContent: nothing to take
        pvc = self.objects.get((self._rkey(PVCS), ns, pvc_name))
        if pvc is None:
            return f'error getting PVC {ns}/{pvc_name}: persistentvolumeclaims "{pvc_name}" not found'
        class_name = spec.get("volumeSnapshotClassName")
        snapshot_class = self.objects.get((self._rkey(VOLUME_SNAPSHOT_CLASSES), "", class_name or ""))
        if snapshot_class is None:
            return (
                "failed to get snapshot class with error: volumesnapshotclass.snapshot.storage.k8s.io "
                f'"{class_name}" not found'
            )
        storage_class_name = (pvc.get("spec") or {}).get("storageClassName") or ""
        storage_class = self.objects.get((self._rkey(STORAGE_CLASSES), "", storage_class_name))
        provisioner = (storage_class or {}).get("provisioner")
        if provisioner != snapshot_class.get("driver"):
            return (
                f"failed to take snapshot of the volume {pvc_name}: the driver "
                f"{snapshot_class.get('driver')} of class {class_name} is not the volume's ({provisioner})"
            )
        return self.fail_snapshots.get(pvc_name)

    async def _snapshot_controller(self, ns: str, name: str) -> None:
        await asyncio.sleep(0.01)
        snapshot = self.objects.get((self._rkey(VOLUME_SNAPSHOTS), ns, name))
        if snapshot is None:
            return
        problem = self._snapshot_problem(snapshot)
        if problem is not None:

            def failed(o: Obj) -> None:
                o["status"] = {"readyToUse": False, "error": {"message": problem, "time": now_iso()}}

            self._update(VOLUME_SNAPSHOTS, ns, name, failed)
            return
        if self.snapshot_ready_seconds is None:
            return
        await asyncio.sleep(self.snapshot_ready_seconds)
        self._snapshot_ready(ns, name)

    def _snapshot_ready(self, ns: str, name: str) -> Obj | None:
        snapshot = self.objects.get((self._rkey(VOLUME_SNAPSHOTS), ns, name))
        if snapshot is None:
            return None
        pvc_name = ((snapshot.get("spec") or {}).get("source") or {}).get("persistentVolumeClaimName", "")
        pvc = self.objects.get((self._rkey(PVCS), ns, pvc_name)) or {}
        size = ((pvc.get("status") or {}).get("capacity") or {}).get("storage", "0")
        uid = snapshot["metadata"]["uid"]

        def ready(o: Obj) -> None:
            o["status"] = {
                "boundVolumeSnapshotContentName": f"snapcontent-{uid}",
                "creationTime": now_iso(),
                "readyToUse": True,
                "restoreSize": size,
            }

        return self._update(VOLUME_SNAPSHOTS, ns, name, ready)

    async def _job_started(self, ns: str, name: str) -> None:
        await asyncio.sleep(0.01)
        job = self.objects.get((self._rkey(JOBS), ns, name))
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        template = copy.deepcopy((job.get("spec") or {}).get("template") or {})
        pod_meta = template.get("metadata") or {}
        labels = dict(pod_meta.get("labels") or {})
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                "batch.kubernetes.io/job-name": name,
                "controller-uid": job["metadata"]["uid"],
                "job-name": name,
            }
        )
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{secrets.token_hex(3)[:5]}",
                "namespace": ns,
                "labels": labels,
                "annotations": dict(pod_meta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "finalizers": ["batch.kubernetes.io/job-tracking"],
            },
            "spec": template.get("spec") or {},
            "status": {"phase": "Pending", "qosClass": "Burstable"},
        }
        self._prepare_new(PODS, pod, ns)
        self._commit(PODS, ns, pod["metadata"]["name"], pod, new=True)

        def started(o: Obj) -> None:
            o["status"]["startTime"] = now_iso()
            o["status"]["active"] = 1
            o["status"]["ready"] = 0

        self._update(JOBS, ns, name, started)
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        if deadline:
            self._deadline_tasks[job["metadata"]["uid"]] = self._spawn(
                self._job_deadline(ns, name, job["metadata"]["uid"], float(deadline)), f"deadline:{name}"
            )

    def _job_terminal(self, job: Obj) -> bool:
        return any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )

    async def _job_deadline(self, ns: str, name: str, uid: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        job = self.objects.get((self._rkey(JOBS), ns, name))
        if job is None or job["metadata"]["uid"] != uid or self._job_terminal(job):
            return
        for pod in self.pods_of_job(ns, name):
            if (pod["metadata"]["namespace"], pod["metadata"]["name"]) and (
                self.objects.get((self._rkey(PODS), ns, pod["metadata"]["name"])) is not None
            ):
                self._delete_object(PODS, ns, pod["metadata"]["name"], "Background", None)
        self._fail_job(ns, name, "DeadlineExceeded", "Job was active longer than specified deadline")

    def _fail_job(self, ns: str, name: str, reason: str, message: str) -> None:
        def fail(o: Obj) -> None:
            if self._job_terminal(o):
                return
            status = o.setdefault("status", {})
            now = now_iso()
            conditions = status.setdefault("conditions", [])
            conditions.append(
                {
                    "type": "FailureTarget",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                }
            )
            conditions.append(
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                }
            )
            status["failed"] = int(status.get("failed", 0)) + (1 if reason != "DeadlineExceeded" else 0)
            status["active"] = 0
            status["ready"] = 0

        self._update(JOBS, ns, name, fail)

    def _job_sees_pod(self, kind: str, pod: Obj) -> None:
        """The Job controller: a pod that ended (or vanished without ending) ends its Job."""
        meta = pod["metadata"]
        job_name = (meta.get("labels") or {}).get("batch.kubernetes.io/job-name")
        if not job_name:
            return
        ns = meta["namespace"]
        phase = (pod.get("status") or {}).get("phase")
        tracked = "batch.kubernetes.io/job-tracking" in (meta.get("finalizers") or [])
        if phase in ("Succeeded", "Failed") and tracked and kind != "DELETED":
            # The Job controller has counted the pod: it lets go of it.
            self._remove_finalizer(PODS, ns, meta["name"], "batch.kubernetes.io/job-tracking")
        job = self.objects.get((self._rkey(JOBS), ns, job_name))
        if job is None or self._job_terminal(job) or job["metadata"].get("deletionTimestamp"):
            return
        if phase == "Succeeded":

            def complete(o: Obj) -> None:
                status = o.setdefault("status", {})
                now = now_iso()
                status.setdefault("conditions", []).extend(
                    [
                        {
                            "type": "SuccessCriteriaMet",
                            "status": "True",
                            "lastProbeTime": now,
                            "lastTransitionTime": now,
                            "reason": "CompletionsReached",
                            "message": "Reached expected number of succeeded pods",
                        },
                        {
                            "type": "Complete",
                            "status": "True",
                            "lastProbeTime": now,
                            "lastTransitionTime": now,
                            "reason": "CompletionsReached",
                            "message": "Reached expected number of succeeded pods",
                        },
                    ]
                )
                status["succeeded"] = 1
                status["active"] = 0
                status["ready"] = 0
                status["completionTime"] = now

            self._update(JOBS, ns, job_name, complete)
        elif phase == "Failed" or kind == "DELETED":
            backoff = int((job.get("spec") or {}).get("backoffLimit", 6))
            if backoff == 0:
                self._fail_job(
                    ns, job_name, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )

    # ---- kubelet ---------------------------------------------------------------------------

    def _script_for(self, pod: Obj) -> Script:
        labels = pod["metadata"].get("labels") or {}
        for selector, script in reversed(self.scripts):
            if all(labels.get(k) == v for k, v in selector.items()):
                return script
        return DEFAULT_SCRIPT

    def _event(self, pod: Obj, reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        now = now_iso()
        event: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": "v1",
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": "kubelet", "host": self.node_name},
        }
        self._prepare_new(EVENTS, event, meta["namespace"])
        self._commit(EVENTS, meta["namespace"], event["metadata"]["name"], event, new=True)

    def _container_names(self, pod: Obj, init: bool) -> list[str]:
        key = "initContainers" if init else "containers"
        return [c["name"] for c in (pod.get("spec") or {}).get(key) or []]

    def _image(self, pod: Obj, container: str) -> str:
        for key in ("initContainers", "containers"):
            for c in (pod.get("spec") or {}).get(key) or []:
                if c["name"] == container:
                    return str(c.get("image", ""))
        return ""

    def _set_status(self, ns: str, name: str, mutate: Callable[[Obj], None]) -> Obj | None:
        return self._update(PODS, ns, name, mutate)

    @staticmethod
    def _cstatus(pod: Obj, name: str, init: bool) -> Obj:
        key = "initContainerStatuses" if init else "containerStatuses"
        statuses = pod["status"].setdefault(key, [])
        for status in statuses:
            if status["name"] == name:
                return status  # type: ignore[no-any-return]
        status = {
            "name": name,
            "ready": False,
            "restartCount": 0,
            "image": "",
            "imageID": "",
            "started": False,
            "state": {"waiting": {"reason": "PodInitializing" if not init else "ContainerCreating"}},
        }
        statuses.append(status)
        return status

    def _log(self, ns: str, pod: str, container: str) -> ContainerLog:
        key = (ns, pod, container)
        if key not in self.logs:
            self.logs[key] = ContainerLog()
        return self.logs[key]

    async def _append_log(self, ns: str, pod: str, container: str, lines: Iterable[str]) -> None:
        log = self._log(ns, pod, container)
        ts = time.time_ns()
        async with log.changed:
            for line in lines:
                log.lines.append((ts, line))
            log.changed.notify_all()

    async def _close_log(self, ns: str, pod: str, container: str) -> None:
        log = self._log(ns, pod, container)
        async with log.changed:
            log.closed = True
            log.changed.notify_all()

    async def _kubelet(self, ns: str, name: str) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        script = self._script_for(pod)
        await asyncio.sleep(0.005)
        inits = self._container_names(pod, True)
        mains = self._container_names(pod, False)

        def scheduled(o: Obj) -> None:
            now = now_iso()
            o["spec"]["nodeName"] = self.node_name
            o["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "False" if inits else "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "False", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
            ]
            o["status"]["hostIP"] = "10.0.0.1"
            o["status"]["startTime"] = now
            for c in inits:
                self._cstatus(o, c, True)["image"] = self._image(o, c)
                self._cstatus(o, c, True)["state"] = {"waiting": {"reason": "PodInitializing"}}
            for c in mains:
                self._cstatus(o, c, False)["image"] = self._image(o, c)
                self._cstatus(o, c, False)["state"] = {
                    "waiting": {"reason": "PodInitializing" if inits else "ContainerCreating"}
                }

        if self._set_status(ns, name, scheduled) is None:
            return
        self._event(pod, "Scheduled", f"Successfully assigned {ns}/{name} to {self.node_name}")
        init_done = not inits
        try:
            for step in script.steps:
                if step.kind == "wait":
                    await asyncio.sleep(step.seconds)
                elif step.kind == "init":
                    init_done = await self._run_init(ns, name, inits, step)
                    if not init_done:
                        return
                elif step.kind == "pull_backoff":
                    await self._pull_backoff(ns, name, mains[0], step.message)
                    return
                elif step.kind == "start":
                    if not init_done:
                        init_done = await self._run_init(ns, name, inits, Script.init(0))
                        if not init_done:
                            return
                    await self._start(ns, name, mains)
                elif step.kind == "log":
                    await self._append_log(ns, name, mains[0], step.lines)
                elif step.kind == "exit":
                    await self._terminate(
                        ns, name, mains, step.code, "Completed" if step.code == 0 else "Error", step.message
                    )
                    return
                elif step.kind == "oom":
                    await self._terminate(ns, name, mains, 137, "OOMKilled", "")
                    self._event(pod, "OOMKilling", "Memory cgroup out of memory: Killed process", "Warning")
                    return
                elif step.kind == "evict":
                    await self._evict_by_kubelet(ns, name, step.message)
                    return
                elif step.kind == "lose_node":
                    await self._lose_node(ns, name)
                    return
                elif step.kind == "hang":
                    await asyncio.Event().wait()
        except asyncio.CancelledError:
            return

    async def _run_init(self, ns: str, name: str, inits: list[str], step: Step) -> bool:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return False
        for container in inits:
            started = now_iso()

            def running(o: Obj, c: str = container, s: str = started) -> None:
                st = self._cstatus(o, c, True)
                st["state"] = {"running": {"startedAt": s}}
                st["started"] = True
                st["imageID"] = "docker.io/double@sha256:" + "0" * 64

            self._set_status(ns, name, running)
            self._event(pod, "Started", f"Started container {container}")
            await self._append_log(ns, name, container, step.lines)
            await asyncio.sleep(0.005)
            code = step.code

            def ended(o: Obj, c: str = container, s: str = started, code: int = code) -> None:
                st = self._cstatus(o, c, True)
                st["state"] = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                        "startedAt": s,
                        "finishedAt": now_iso(),
                        **({"message": "\n".join(step.lines)} if code and step.lines else {}),
                    }
                }
                st["ready"] = code == 0
                st["started"] = False
                if code != 0:
                    o["status"]["phase"] = "Failed"
                    for m in self._container_names(o, False):
                        self._cstatus(o, m, False)["state"] = {"waiting": {"reason": "PodInitializing"}}

            await self._close_log(ns, name, container)
            self._set_status(ns, name, ended)
            if code != 0:
                return False

        def initialized(o: Obj) -> None:
            for cond in o["status"].get("conditions") or []:
                if cond["type"] == "Initialized":
                    cond["status"] = "True"

        self._set_status(ns, name, initialized)
        return True

    async def _pull_backoff(self, ns: str, name: str, container: str, message: str) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        image = self._image(pod, container)
        text = (
            message
            or f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": not found'
        )
        self._event(pod, "Pulling", f'Pulling image "{image}"')

        def err(o: Obj) -> None:
            self._cstatus(o, container, False)["state"] = {
                "waiting": {"reason": "ErrImagePull", "message": text}
            }

        self._set_status(ns, name, err)
        self._event(pod, "Failed", f'Failed to pull image "{image}": {text}', "Warning")
        await asyncio.sleep(0.05)

        def backoff(o: Obj) -> None:
            self._cstatus(o, container, False)["state"] = {
                "waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}
            }

        self._set_status(ns, name, backoff)
        self._event(pod, "BackOff", f'Back-off pulling image "{image}"', "Warning")
        await asyncio.Event().wait()

    async def _start(self, ns: str, name: str, mains: list[str]) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        started = now_iso()

        def running(o: Obj) -> None:
            o["status"]["phase"] = "Running"
            o["status"]["podIP"] = "10.42.0.10"
            for c in mains:
                st = self._cstatus(o, c, False)
                st["state"] = {"running": {"startedAt": started}}
                st["ready"] = True
                st["started"] = True
                st["imageID"] = self._image(o, c) if "@" in self._image(o, c) else ""
            for cond in o["status"].get("conditions") or []:
                if cond["type"] in ("Ready", "ContainersReady", "Initialized"):
                    cond["status"] = "True"

        for c in mains:
            self._log(ns, name, c)
        self._set_status(ns, name, running)
        for c in mains:
            self._event(pod, "Started", f"Started container {c}")
        job_name = (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name")
        if job_name:

            def ready(o: Obj) -> None:
                o.setdefault("status", {})["ready"] = 1

            self._update(JOBS, ns, job_name, ready)

    async def _terminate(
        self, ns: str, name: str, mains: list[str], code: int, reason: str, message: str
    ) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        for c in mains:
            await self._close_log(ns, name, c)
        tail = "\n".join(text for _, text in self._log(ns, name, mains[0]).lines[-80:]) if mains else ""

        def ended(o: Obj) -> None:
            now = now_iso()
            for c in mains:
                st = self._cstatus(o, c, False)
                began = (st.get("state") or {}).get("running", {}).get("startedAt")
                term: Obj = {
                    "exitCode": code,
                    "reason": reason,
                    "finishedAt": now,
                    "containerID": f"containerd://{uuid.uuid4().hex}",
                }
                if began:
                    term["startedAt"] = began
                if message or (code != 0 and tail):
                    term["message"] = message or tail
                st["state"] = {"terminated": term}
                st["ready"] = False
                st["started"] = False
            o["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            for cond in o["status"].get("conditions") or []:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond["status"] = "False"
                    cond["reason"] = "PodCompleted" if code == 0 else "PodFailed"

        self._set_status(ns, name, ended)

    async def _terminate_pod(self, ns: str, name: str) -> None:
        """A graceful pod deletion: the containers get SIGTERM (exit 143), then the pod is removed."""
        task = None
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is not None:
            task = self._pod_tasks.pop(pod["metadata"]["uid"], None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        self._event(pod, "Killing", "Stopping container workload")
        await asyncio.sleep(self.pod_termination_seconds)
        mains = self._container_names(pod, False)
        running = any(
            "running" in (s.get("state") or {}) for s in pod["status"].get("containerStatuses") or []
        )
        if running:
            await self._terminate(ns, name, mains, 143, "Error", "")
        elif (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            for c in mains:
                await self._close_log(ns, name, c)

            def failed(o: Obj) -> None:
                o["status"]["phase"] = "Failed"

            self._set_status(ns, name, failed)
        await asyncio.sleep(self.pod_termination_seconds)
        self._remove_pod(ns, name)

    def _remove_pod(self, ns: str, name: str) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        if pod["metadata"].get("finalizers"):

            def clear(o: Obj) -> None:
                o["metadata"]["finalizers"] = []

            self._update(PODS, ns, name, clear)
        if (self._rkey(PODS), ns, name) in self.objects:
            self._commit(PODS, ns, name, None)
        for key in [k for k in self.logs if k[0] == ns and k[1] == name]:
            # The pod is gone: whoever follows one of its logs gets the end of it.
            self._spawn(self._close_log(*key), f"close-log:{name}")

    async def _evict_by_kubelet(self, ns: str, name: str, message: str) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        mains = self._container_names(pod, False)
        self._event(pod, "Evicted", message, "Warning")
        await self._terminate(ns, name, mains, 137, "Error", "")

        def evicted(o: Obj) -> None:
            now = now_iso()
            o["status"]["phase"] = "Failed"
            o["status"]["reason"] = "Evicted"
            o["status"]["message"] = message
            o["status"].setdefault("conditions", []).append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "message": message,
                    "lastTransitionTime": now,
                }
            )

        self._set_status(ns, name, evicted)

    async def _evict_pod(self, ns: str, name: str, message: str) -> None:
        """Eviction through the API (as `kubectl drain` does): disrupted, then deleted gracefully."""
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return

        def disrupted(o: Obj) -> None:
            o["status"].setdefault("conditions", []).append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": message,
                    "lastTransitionTime": now_iso(),
                }
            )

        self._set_status(ns, name, disrupted)
        self._delete_object(PODS, ns, name, "Background", None)

    async def _eviction(self, ns: str, name: str) -> web.Response:
        if (self._rkey(PODS), ns, name) not in self.objects:
            raise not_found(PODS, name)
        await self._evict_pod(ns, name, "Eviction API: evicting")
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201},
            status=201,
        )

    async def _lose_node(self, ns: str, name: str) -> None:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            return
        task = self._pod_tasks.pop(pod["metadata"]["uid"], None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

        def unknown(o: Obj) -> None:
            now = now_iso()
            for cond in o["status"].get("conditions") or []:
                if cond["type"] == "Ready":
                    cond["status"] = "Unknown"
                    cond["reason"] = "NodeStatusUnknown"
            o["status"].setdefault("conditions", []).append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "DeletionByTaintManager",
                    "message": "Taint manager: deleting due to NoExecute taint",
                    "lastTransitionTime": now,
                }
            )
            o["metadata"]["deletionTimestamp"] = now
            o["metadata"]["deletionGracePeriodSeconds"] = 0

        self._set_status(ns, name, unknown)
        for c in self._container_names(pod, False):
            await self._close_log(ns, name, c)
        await asyncio.sleep(0.01)
        self._remove_pod(ns, name)

    # ---- logs ------------------------------------------------------------------------------

    async def _pod_log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        pod = self.objects.get((self._rkey(PODS), ns, name))
        if pod is None:
            raise not_found(PODS, name)
        mains = self._container_names(pod, False)
        inits = self._container_names(pod, True)
        container = request.query.get("container") or ""
        if not container:
            if len(mains) != 1:
                raise bad_request(
                    f"a container name must be specified for pod {name}, choose one of: {mains}"
                )
            container = mains[0]
        if container not in mains and container not in inits:
            raise bad_request(f"container {container} is not valid for pod {name}")
        status = self._cstatus(copy.deepcopy(pod), container, container in inits)
        state = status.get("state") or {}
        if "waiting" in state:
            reason = state["waiting"].get("reason", "ContainerCreating")
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        follow = _flag(request.query, "follow")
        timestamps = _flag(request.query, "timestamps")
        since = request.query.get("sinceSeconds")
        since_ns = time.time_ns() - int(since) * 1_000_000_000 if since else 0
        tail = request.query.get("tailLines")
        log = self._log(ns, name, container)
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self._log_requests[id(request)] = request

        def fmt(ts: int, text: str) -> bytes:
            return ((format_ts_ns(ts) + " " + text) if timestamps else text).encode() + b"\n"

        try:
            lines = [entry for entry in log.lines if entry[0] >= since_ns]
            if tail is not None:
                lines = lines[-int(tail) :] if int(tail) > 0 else []
            sent = len(log.lines)
            if lines:
                await response.write(b"".join(fmt(ts, text) for ts, text in lines))
            while follow and not log.closed:
                async with log.changed:
                    while len(log.lines) == sent and not log.closed:
                        await log.changed.wait()
                new, sent = log.lines[sent:], len(log.lines)
                new = [entry for entry in new if entry[0] >= since_ns]
                if new:
                    await response.write(b"".join(fmt(ts, text) for ts, text in new))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._log_requests.pop(id(request), None)
        return response


@contextlib.asynccontextmanager
async def kube_double(**kwargs: Any) -> Any:
    """`async with kube_double() as api:` a started double, stopped at the end."""
    double = KubeDouble(**kwargs)
    await double.start()
    try:
        yield double
    finally:
        await double.stop()


def timestamp_after(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
