"""`fabrik doctor`: is this Fabrik installation healthy, and if not, what to do about it.

Each check yields a `CheckResult`: `ok`, `warn` (works, but not as it should), `fail` or `skip`
(a check it depends on failed, or it was not asked for), a detail line and, unless ok, a fix.
A failed *critical* check makes `fabrik doctor` exit 1. docs/doctor.md lists every check.

Platform checks (always): NATS reachable, JetStream enabled, the topology present (streams, KV
buckets, object stores), the gateway and the llm-proxy ready (`/readyz`). Where they are comes
from the options, then the environment (`$FABRIK_NATS_URL`, `$FABRIK_API_URL`,
`$FABRIK_LLM_PROXY_URL`), then the local stack's state file, then the defaults.

Cluster checks (only with a kubeconfig: `--kubeconfig`, `$KUBECONFIG`, or inside a pod): API
reachable, namespaces `fabrik-system` and `fabrik-runs` (the latter with the `restricted` Pod
Security level), a default storage class (or the configured one), ResourceQuota and LimitRange in
`fabrik-runs`, the RBAC of the executor's service account there (SubjectAccessReview; a
SelfSubjectAccessReview inside a pod), and the credentials Secrets in `fabrik-system`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import nats
import nats.errors
import nats.js.errors

from fabrik_cli.client import _describe_transport_error as describe_transport_error
from fabrik_cli.client import resolve_api_target
from fabrik_cli.local import StackError, StackPaths, StackState, default_data_dir, read_state
from fabrik_common.envs import key_configured, local_key_file
from fabrik_common.topology import KV_BUCKETS, OBJECT_STORES, STREAMS

Status = Literal["ok", "warn", "fail", "skip"]

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_LLM_PROXY_URL: Final = "http://127.0.0.1:8081"
ENV_NATS_URL: Final = "FABRIK_NATS_URL"
ENV_LLM_PROXY_URL: Final = "FABRIK_LLM_PROXY_URL"
SYSTEM_NAMESPACE: Final = "fabrik-system"
RUNS_NAMESPACE: Final = "fabrik-runs"
EXECUTOR_SERVICE_ACCOUNT: Final = "fabrik-executor"
RUN_KEY_SECRET: Final = "fabrik-run-key"  # noqa: S105 - a Secret's name
LLM_KEYS_SECRET: Final = "fabrik-llm-keys"  # noqa: S105
ENV_KEY_SECRET: Final = "fabrik-env-key"  # noqa: S105
DEFAULT_CLASS_ANNOTATIONS: Final = (
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
)
POD_SECURITY_LABEL: Final = "pod-security.kubernetes.io/enforce"

# (API group, resource, subresource, verbs): what the executor does in fabrik-runs.
EXECUTOR_PERMISSIONS: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    ("batch", "jobs", "", ("create", "delete", "get", "list", "watch")),
    ("", "pods", "", ("get", "list", "watch")),
    ("", "pods", "log", ("get",)),
    ("", "persistentvolumeclaims", "", ("create", "delete", "get", "list")),
    ("", "secrets", "", ("create", "get", "update", "delete")),
    ("", "events", "", ("list",)),
)


@dataclass
class CheckResult:
    id: str
    title: str
    status: Status
    critical: bool
    detail: str = ""
    fix: str = ""
    seconds: float = 0.0

    @property
    def failed_critically(self) -> bool:
        return self.status == "fail" and self.critical

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorOptions:
    api: str | None = None
    llm_proxy: str | None = None
    nats_url: str | None = None
    data_dir: Path | None = None
    kubeconfig: str | None = None
    context: str | None = None
    no_cluster: bool = False
    system_namespace: str = SYSTEM_NAMESPACE
    runs_namespace: str = RUNS_NAMESPACE
    executor_service_account: str = EXECUTOR_SERVICE_ACCOUNT
    storage_class: str | None = None
    run_key_secret: str = RUN_KEY_SECRET
    llm_keys_secret: str = LLM_KEYS_SECRET
    env_key_secret: str = ENV_KEY_SECRET
    timeout: float = 5.0
    skip: tuple[str, ...] = ()
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class Report:
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return not any(c.failed_critically for c in self.checks)

    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "warn": 0, "fail": 0, "skip": 0}
        for check in self.checks:
            counts[check.status] += 1
        counts["critical"] = sum(1 for c in self.checks if c.failed_critically)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.counts(), "checks": [c.to_dict() for c in self.checks]}


class CheckFailedError(Exception):
    """A check's failure: `status` (fail or warn), what was found and how to fix it."""

    def __init__(self, detail: str, fix: str = "", *, status: Status = "fail") -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix
        self.status: Status = status


class SkippedError(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Where things are


@dataclass(frozen=True)
class Located:
    value: str
    source: str


def _local_state(options: DoctorOptions) -> tuple[StackState | None, Path]:
    data_dir = (options.data_dir or default_data_dir(options.environ)).expanduser().absolute()
    try:
        return read_state(StackPaths(data_dir).state_file), data_dir
    except (StackError, OSError):
        return None, data_dir


def locate_nats(options: DoctorOptions, state: StackState | None) -> Located:
    if options.nats_url:
        return Located(options.nats_url, "--nats-url")
    if options.environ.get(ENV_NATS_URL):
        return Located(options.environ[ENV_NATS_URL], f"${ENV_NATS_URL}")
    if state is not None and state.nats.url:
        return Located(state.nats.url, "the local stack's state file")
    return Located(DEFAULT_NATS_URL, "the default")


def locate_llm_proxy(options: DoctorOptions, state: StackState | None) -> Located:
    if options.llm_proxy:
        return Located(options.llm_proxy.rstrip("/"), "--llm-proxy")
    if options.environ.get(ENV_LLM_PROXY_URL):
        return Located(options.environ[ENV_LLM_PROXY_URL].rstrip("/"), f"${ENV_LLM_PROXY_URL}")
    proxy = state.services.get("llm-proxy") if state is not None else None
    if proxy is not None and proxy.url:
        return Located(proxy.url, "the local stack's state file")
    return Located(DEFAULT_LLM_PROXY_URL, "the default")


def locate_gateway(options: DoctorOptions) -> Located:
    target = resolve_api_target(options.api, options.environ)
    return Located(target.url, target.source)


def cluster_config(options: DoctorOptions) -> tuple[str, str] | None:
    """("kubeconfig", path) or ("in-cluster", "") when the cluster is to be checked, else None."""
    if options.no_cluster:
        return None
    if options.kubeconfig:
        return "kubeconfig", options.kubeconfig
    if options.environ.get("KUBECONFIG"):
        return "kubeconfig", options.environ["KUBECONFIG"]
    if options.environ.get("KUBERNETES_SERVICE_HOST"):
        return "in-cluster", ""
    return None


# --------------------------------------------------------------------------------------------
# Running checks


Step = Callable[[], Awaitable[str]]


class Doctor:
    def __init__(self, options: DoctorOptions) -> None:
        self.options = options
        self.results: list[CheckResult] = []

    def skipped(self, check_id: str) -> bool:
        return any(check_id == s or check_id.startswith(s + ".") for s in self.options.skip)

    async def check(
        self, check_id: str, title: str, step: Step, *, critical: bool, needs: Sequence[str] = ()
    ) -> CheckResult:
        started = time.monotonic()
        result = CheckResult(check_id, title, "ok", critical)
        failed_needs = [r for r in self.results if r.id in needs and r.status in ("fail", "skip")]
        if self.skipped(check_id):
            result.status, result.detail = "skip", "skipped (--skip)"
        elif failed_needs:
            result.status = "skip"
            result.detail = "not checked: " + ", ".join(f"{r.title} {r.status}ed" for r in failed_needs)
            result.detail = result.detail.replace("skiped", "skipped")
        else:
            try:
                result.detail = await asyncio.wait_for(step(), self.options.timeout * 3)
            except CheckFailedError as exc:
                result.status, result.detail, result.fix = exc.status, exc.detail, exc.fix
            except SkippedError as exc:
                result.status, result.detail = "skip", exc.detail
            except TimeoutError:
                result.status = "fail"
                result.detail = f"no answer within {self.options.timeout * 3:g}s"
                result.fix = "check the network path; raise --timeout for a slow link"
        result.seconds = round(time.monotonic() - started, 3)
        self.results.append(result)
        return result

    async def run(self) -> Report:
        state, data_dir = _local_state(self.options)
        await self._platform(state, data_dir)
        config = cluster_config(self.options)
        if config is None:
            self.results.append(
                CheckResult(
                    "k8s",
                    "Kubernetes cluster",
                    "skip",
                    False,
                    "no kubeconfig: give --kubeconfig or set $KUBECONFIG to check a cluster",
                )
            )
        else:
            await ClusterChecks(self, *config).run()
        return Report(self.results)

    # -- platform ---------------------------------------------------------------------------

    async def _platform(self, state: StackState | None, data_dir: Path) -> None:
        where = locate_nats(self.options, state)
        holder: dict[str, Any] = {}
        try:
            await self.check(
                "nats", "NATS reachable", lambda: self._nats_connect(where, holder), critical=True
            )
            await self.check(
                "nats.jetstream",
                "JetStream enabled",
                lambda: self._jetstream(holder),
                critical=True,
                needs=["nats"],
            )
            await self.check(
                "nats.topology",
                "streams and buckets present",
                lambda: self._topology(holder),
                critical=True,
                needs=["nats.jetstream"],
            )
        finally:
            nc = holder.get("nc")
            if nc is not None:
                await nc.close()
        gateway = locate_gateway(self.options)
        await self.check(
            "gateway",
            "gateway ready",
            lambda: self._ready("gateway", gateway, "--api URL or $FABRIK_API_URL"),
            critical=True,
        )
        proxy = locate_llm_proxy(self.options, state)
        await self.check(
            "llm-proxy",
            "llm-proxy ready",
            lambda: self._ready("llm-proxy", proxy, f"--llm-proxy URL or ${ENV_LLM_PROXY_URL}"),
            critical=True,
        )
        if state is not None:
            await self.check(
                "local.env-key",
                "environments' encryption key",
                lambda: self._local_key(data_dir),
                critical=False,
            )

    async def _nats_connect(self, where: Located, holder: dict[str, Any]) -> str:
        errors: list[BaseException] = []

        async def remember(exc: BaseException) -> None:
            errors.append(exc)

        async def quiet(*_: Any) -> None:
            return None

        try:
            nc = await nats.connect(
                where.value,
                connect_timeout=self.options.timeout,
                # One attempt per server (nats-py counts "reconnects" from the first attempt).
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.05,
                error_cb=remember,
                disconnected_cb=quiet,
                closed_cb=quiet,
                name="fabrik-doctor",
            )
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding
            cause = errors[-1] if errors else exc
            raise CheckFailedError(
                f"cannot connect to {where.value} (from {where.source}): {_describe(cause)}",
                "start the local stack with `fabrik up` (and check it with `fabrik status`), or point "
                f"to NATS with --nats-url URL or ${ENV_NATS_URL}",
            ) from None
        holder["nc"] = nc
        info = nc._server_info
        version = info.get("version", "?") if isinstance(info, dict) else "?"
        return f"{where.value} (from {where.source}), nats-server {version}"

    async def _jetstream(self, holder: dict[str, Any]) -> str:
        js = holder["nc"].jetstream()
        try:
            info = await js.account_info()
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise CheckFailedError(
                f"JetStream is not enabled on this server: {_describe(exc)}",
                "start nats-server with JetStream (`-js` and a store directory `-sd DIR`); with the NATS "
                "Helm chart set config.jetstream.enabled=true",
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise CheckFailedError(
                f"JetStream did not answer: {_describe(exc)}", "check the NATS server's log"
            ) from None
        holder["js"] = js
        return f"{info.streams} streams, {info.consumers} consumers, {info.storage} bytes stored"

    async def _topology(self, holder: dict[str, Any]) -> str:
        js = holder["js"]
        wanted = (
            [("stream", s.name, s.name) for s in STREAMS]
            + [("bucket", b.name, f"KV_{b.name}") for b in KV_BUCKETS]
            + [("object store", o.name, f"OBJ_{o.name}") for o in OBJECT_STORES]
        )
        missing: list[str] = []
        for kind, name, stream in wanted:
            try:
                await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                missing.append(f"{kind} {name}")
        if missing:
            raise CheckFailedError(
                "missing: " + ", ".join(missing),
                "every Fabrik service creates the topology when it starts: start (or restart) one, e.g. "
                "`fabrik up`; a bucket missing after a start means a service older than this CLI",
            )
        return f"{len(STREAMS)} streams, {len(KV_BUCKETS)} KV buckets, {len(OBJECT_STORES)} object store(s)"

    async def _ready(self, name: str, where: Located, option: str) -> str:
        url = where.value.rstrip("/") + "/readyz"
        try:
            async with httpx.AsyncClient(timeout=self.options.timeout) as http:
                response = await http.get(url)
        except httpx.TransportError as exc:
            raise CheckFailedError(
                f"{url} (from {where.source}): {describe_transport_error(exc)}",
                f"start the local stack with `fabrik up`, or point to the {name} with {option}",
            ) from None
        if response.status_code == 200:
            return f"{where.value} (from {where.source})"
        failing = _failing_checks(response)
        raise CheckFailedError(
            f"{url} answered {response.status_code}" + (f": not ready: {failing}" if failing else ""),
            f"see the {name}'s log (`fabrik status` shows where); a service that is not ready usually "
            "waits for NATS",
        )

    async def _local_key(self, data_dir: Path) -> str:
        if key_configured(self.options.environ):
            return "configured in the environment of this shell"
        path = local_key_file(data_dir)
        if path.is_file():
            return f"{path}"
        raise CheckFailedError(
            f"{path} does not exist: project environments cannot be stored or read",
            "restart the local stack (`fabrik down`, then `fabrik up`): it creates the key",
            status="warn",
        )


def _failing_checks(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    checks = body.get("checks") if isinstance(body, dict) else None
    if isinstance(checks, dict):
        return ", ".join(str(k) for k, v in checks.items() if not v)
    return ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    if not text or text == name:
        return name
    return text if len(text) < 300 else text[:300] + "..."


# --------------------------------------------------------------------------------------------
# Kubernetes


class ClusterChecks:
    def __init__(self, doctor: Doctor, kind: str, path: str) -> None:
        self.doctor = doctor
        self.options = doctor.options
        self.kind = kind
        self.path = path
        self.api: Any = None

    async def run(self) -> None:
        from kubernetes_asyncio import client  # imported only when a cluster is checked

        try:
            configuration = await self._configuration()
        except Exception as exc:  # noqa: BLE001 - any config problem is the finding
            source = f"--kubeconfig {self.path}" if self.kind == "kubeconfig" else "the in-cluster config"
            self.doctor.results.append(
                CheckResult(
                    "k8s.api",
                    "Kubernetes API reachable",
                    "fail",
                    True,
                    f"cannot load {source}: {_describe(exc)}",
                    "check the file and its context (`kubectl config get-contexts`), "
                    "or give --kubeconfig/--context",
                )
            )
            return
        async with client.ApiClient(configuration=configuration) as api:
            self.api = api
            d = self.doctor
            o = self.options
            await d.check("k8s.api", "Kubernetes API reachable", self._version, critical=True)
            api_ok = ["k8s.api"]
            await d.check(
                "k8s.namespace.system",
                f"namespace {o.system_namespace}",
                lambda: self._namespace(o.system_namespace, runs=False),
                critical=True,
                needs=api_ok,
            )
            await d.check(
                "k8s.namespace.runs",
                f"namespace {o.runs_namespace}",
                lambda: self._namespace(o.runs_namespace, runs=True),
                critical=True,
                needs=api_ok,
            )
            await d.check(
                "k8s.storage-class", "storage class", self._storage_class, critical=True, needs=api_ok
            )
            runs_ns = ["k8s.namespace.runs"]
            await d.check(
                "k8s.quota",
                f"ResourceQuota in {o.runs_namespace}",
                self._quota,
                critical=False,
                needs=runs_ns,
            )
            await d.check(
                "k8s.limit-range",
                f"LimitRange in {o.runs_namespace}",
                self._limit_range,
                critical=False,
                needs=runs_ns,
            )
            await d.check(
                "k8s.rbac",
                f"RBAC of {o.system_namespace}/{o.executor_service_account}",
                self._rbac,
                critical=True,
                needs=runs_ns,
            )
            system_ns = ["k8s.namespace.system"]
            await d.check(
                "k8s.secret.run-key",
                "run-key secret",
                lambda: self._secret(
                    o.run_key_secret, "the HMAC secret of run-scoped LLM keys", required=True
                ),
                critical=True,
                needs=system_ns,
            )
            await d.check(
                "k8s.secret.env-key",
                "environments' encryption key",
                lambda: self._secret(
                    o.env_key_secret, "the Fernet key of project environments", required=False
                ),
                critical=False,
                needs=system_ns,
            )
            await d.check(
                "k8s.secret.llm-keys",
                "LLM provider keys",
                lambda: self._secret(o.llm_keys_secret, "the LLM providers' API keys", required=False),
                critical=False,
                needs=system_ns,
            )

    async def _configuration(self) -> Any:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        if self.kind == "in-cluster":
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(
                config_file=self.path,
                context=self.options.context,
                client_configuration=configuration,
                persist_config=False,
            )
        configuration.retries = 0
        return configuration

    def _api_error(self, exc: BaseException, what: str) -> CheckFailedError:
        from kubernetes_asyncio.client.exceptions import ApiException

        if isinstance(exc, ApiException):
            if exc.status == 401:
                return CheckFailedError(
                    f"{what}: 401 Unauthorized",
                    "the kubeconfig's credentials were refused: refresh them (log in again, or get a new "
                    "kubeconfig from the cluster, e.g. /etc/rancher/k3s/k3s.yaml on a k3s server)",
                )
            if exc.status == 403:
                return CheckFailedError(
                    f"{what}: 403 Forbidden ({_reason(exc)})",
                    "use a kubeconfig with cluster-admin rights to run the cluster checks",
                    status="warn",
                )
            return CheckFailedError(f"{what}: {exc.status} {_reason(exc)}", "see the API server's log")
        return CheckFailedError(
            f"{what}: {_describe(exc)}",
            "check that the API server is up and reachable from here (`kubectl cluster-info`)",
        )

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            return await asyncio.wait_for(call(), self.options.timeout)
        except ApiException:
            raise
        except TimeoutError:
            raise CheckFailedError(
                f"{what}: no answer within {self.options.timeout:g}s",
                "check that the API server is up and reachable from here (`kubectl cluster-info`)",
            ) from None
        except Exception as exc:  # noqa: BLE001 - connection errors of every kind
            raise self._api_error(exc, what) from None

    async def _version(self) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        host = self.api.configuration.host
        try:
            info = await self._call(f"GET {host}/version", lambda: client.VersionApi(self.api).get_code())
        except ApiException as exc:
            raise self._api_error(exc, f"GET {host}/version") from None
        return f"{host}: Kubernetes {info.git_version}"

    async def _namespace(self, name: str, *, runs: bool) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            namespace = await self._call(
                f"namespace {name}", lambda: client.CoreV1Api(self.api).read_namespace(name)
            )
        except ApiException as exc:
            if exc.status == 404:
                raise CheckFailedError(
                    f"namespace {name} does not exist",
                    "install Fabrik's umbrella chart (it creates the namespaces), or "
                    f"`kubectl create namespace {name}`"
                    + (
                        f" and `kubectl label namespace {name} {POD_SECURITY_LABEL}=restricted`"
                        if runs
                        else ""
                    ),
                ) from None
            raise self._api_error(exc, f"namespace {name}") from None
        if not runs:
            return "exists"
        labels = namespace.metadata.labels or {}
        level = labels.get(POD_SECURITY_LABEL)
        if level != "restricted":
            raise CheckFailedError(
                f"exists, but its Pod Security level is {level or 'not set'} (workloads should be held to "
                "`restricted`)",
                f"kubectl label --overwrite namespace {name} {POD_SECURITY_LABEL}=restricted",
                status="warn",
            )
        return "exists, Pod Security level restricted"

    async def _storage_class(self) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            classes = await self._call(
                "storage classes", lambda: client.StorageV1Api(self.api).list_storage_class()
            )
        except ApiException as exc:
            raise self._api_error(exc, "storage classes") from None
        names = [c.metadata.name for c in classes.items]
        wanted = self.options.storage_class
        if wanted:
            if wanted in names:
                return f"{wanted} exists"
            raise CheckFailedError(
                f"storage class {wanted} does not exist (there are: {', '.join(names) or 'none'})",
                "give an existing class with --storage-class (and in the executor's settings)",
            )
        defaults = [
            c.metadata.name
            for c in classes.items
            if any((c.metadata.annotations or {}).get(a) == "true" for a in DEFAULT_CLASS_ANNOTATIONS)
        ]
        if len(defaults) == 1:
            return f"default: {defaults[0]}"
        if len(defaults) > 1:
            raise CheckFailedError(
                f"several default storage classes: {', '.join(defaults)} "
                "(which one a volume gets is unclear)",
                "keep one: kubectl annotate storageclass NAME storageclass.kubernetes.io/is-default-class-",
                status="warn",
            )
        first = names[0] if names else "NAME"
        raise CheckFailedError(
            "no default storage class"
            + (f" (there are: {', '.join(names)})" if names else " and no class at all"),
            f"make one the default: kubectl annotate storageclass {first} "
            "storageclass.kubernetes.io/is-default-class=true (k3s ships local-path), or set the executor's "
            "storage class and pass --storage-class",
        )

    async def _quota(self) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        ns = self.options.runs_namespace
        try:
            quotas = await self._call(
                "resource quotas", lambda: client.CoreV1Api(self.api).list_namespaced_resource_quota(ns)
            )
        except ApiException as exc:
            raise self._api_error(exc, f"resource quotas of {ns}") from None
        if not quotas.items:
            raise CheckFailedError(
                f"no ResourceQuota in {ns}: runs can take every CPU and byte of memory of the cluster",
                f"apply the runs quota of Fabrik's chart, or e.g. `kubectl -n {ns} create quota fabrik-runs "
                "--hard=requests.cpu=16,requests.memory=64Gi,limits.cpu=32,limits.memory=128Gi,"
                "persistentvolumeclaims=100`",
                status="warn",
            )
        described = [
            f"{q.metadata.name} ({', '.join(f'{k}={v}' for k, v in sorted((q.spec.hard or {}).items()))})"
            for q in quotas.items
        ]
        return "; ".join(described)

    async def _limit_range(self) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        ns = self.options.runs_namespace
        try:
            ranges = await self._call(
                "limit ranges", lambda: client.CoreV1Api(self.api).list_namespaced_limit_range(ns)
            )
        except ApiException as exc:
            raise self._api_error(exc, f"limit ranges of {ns}") from None
        if not ranges.items:
            raise CheckFailedError(
                f"no LimitRange in {ns}: a pod without requests or limits is not bounded",
                f"apply the runs limit range of Fabrik's chart, or `kubectl -n {ns} apply -f` a LimitRange "
                "with default requests 500m/1Gi and limits 2/4Gi",
                status="warn",
            )
        return ", ".join(r.metadata.name for r in ranges.items)

    async def _rbac(self) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        o = self.options
        user = f"system:serviceaccount:{o.system_namespace}:{o.executor_service_account}"
        auth = client.AuthorizationV1Api(self.api)
        self_review = self.kind == "in-cluster"
        checked_self = False
        missing: list[str] = []
        for group, resource, subresource, verbs in EXECUTOR_PERMISSIONS:
            for verb in verbs:
                attributes = client.V1ResourceAttributes(
                    namespace=o.runs_namespace,
                    group=group,
                    resource=resource,
                    subresource=subresource or None,
                    verb=verb,
                )
                allowed = False
                if not self_review:
                    body = client.V1SubjectAccessReview(
                        spec=client.V1SubjectAccessReviewSpec(user=user, resource_attributes=attributes)
                    )
                    try:
                        review = await self._call(
                            "subject access review",
                            functools.partial(auth.create_subject_access_review, body),
                        )
                        allowed = bool(review.status.allowed)
                    except ApiException as exc:
                        if exc.status != 403:
                            raise self._api_error(exc, "subject access review") from None
                        self_review = checked_self = True
                if self_review:
                    self_body = client.V1SelfSubjectAccessReview(
                        spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
                    )
                    try:
                        review = await self._call(
                            "self subject access review",
                            functools.partial(auth.create_self_subject_access_review, self_body),
                        )
                    except ApiException as exc:
                        raise self._api_error(exc, "self subject access review") from None
                    allowed = bool(review.status.allowed)
                if not allowed:
                    name = f"{resource}/{subresource}" if subresource else resource
                    missing.append(f"{verb} {name}")
        whose = "your own (you may not review other users: run as a cluster admin to check the executor's)"
        subject = whose if checked_self else ("this pod's service account" if self_review else user)
        if missing:
            raise CheckFailedError(
                f"{subject} may not, in {o.runs_namespace}: {', '.join(missing)}",
                f"apply the executor's Role and RoleBinding from Fabrik's chart "
                f"(namespace {o.runs_namespace}, "
                f"subject {o.system_namespace}/{o.executor_service_account})",
                status="warn" if checked_self else "fail",
            )
        total = sum(len(p[3]) for p in EXECUTOR_PERMISSIONS)
        if checked_self:
            raise CheckFailedError(
                f"{whose}: all {total} permissions granted",
                "run `fabrik doctor` with a cluster-admin kubeconfig to check the executor's service account",
                status="warn",
            )
        return (
            f"{subject}: all {total} permissions in {o.runs_namespace} "
            "(jobs, pods, pods/log, PVCs, secrets, events)"
        )

    async def _secret(self, name: str, what: str, *, required: bool) -> str:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        ns = self.options.system_namespace
        try:
            secret = await self._call(
                f"secret {ns}/{name}", lambda: client.CoreV1Api(self.api).read_namespaced_secret(name, ns)
            )
        except ApiException as exc:
            if exc.status == 404:
                raise CheckFailedError(
                    f"secret {ns}/{name} ({what}) does not exist"
                    + ("" if required else "; the platform works without it, with less"),
                    _secret_fix(name, ns),
                    status="fail" if required else "warn",
                ) from None
            raise self._api_error(exc, f"secret {ns}/{name}") from None
        keys = sorted(k for k, v in (secret.data or {}).items() if v)
        if not keys:
            raise CheckFailedError(
                f"secret {ns}/{name} ({what}) is empty",
                _secret_fix(name, ns),
                status="fail" if required else "warn",
            )
        return f"{ns}/{name}: {len(keys)} key(s) ({', '.join(keys)})"


def _secret_fix(name: str, ns: str) -> str:
    if name == RUN_KEY_SECRET:
        return (
            f'kubectl -n {ns} create secret generic {name} --from-literal=secret="$(openssl rand -base64 32)"'
        )
    if name == ENV_KEY_SECRET:
        return (
            f"kubectl -n {ns} create secret generic {name} --from-literal=key=\"$(python -c 'from "
            "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')\""
        )
    if name == LLM_KEYS_SECRET:
        return (
            f"kubectl -n {ns} create secret generic {name} --from-literal=openai=sk-... "
            "(one key per provider)"
        )
    return f"create the secret {ns}/{name}"


def _reason(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, (str, bytes)):
        try:
            import json

            decoded = json.loads(body)
            if isinstance(decoded, dict) and decoded.get("message"):
                return str(decoded["message"])
        except ValueError:
            pass
    return str(getattr(exc, "reason", "") or "")


async def run_doctor(options: DoctorOptions) -> Report:
    return await Doctor(options).run()


# --------------------------------------------------------------------------------------------
# Text output

_MARKS: Final = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def format_report(report: Report) -> str:
    width = max((len(c.title) for c in report.checks), default=0)
    lines = ["fabrik doctor", ""]
    for check in report.checks:
        mark = _MARKS[check.status]
        critical = " (critical)" if check.failed_critically else ""
        lines.append(f"  {mark}  {check.title:<{width}}  {check.detail}{critical}".rstrip())
        if check.fix and check.status in ("fail", "warn"):
            lines.append(f"  {'':4}  {'':<{width}}  fix: {check.fix}")
    counts = report.counts()
    lines.append("")
    summary = f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failed"
    if counts["critical"]:
        summary += f" ({counts['critical']} critical)"
    summary += f", {counts['skip']} skipped"
    lines.append(summary + (" - healthy" if report.ok else " - NOT healthy"))
    return "\n".join(lines)
