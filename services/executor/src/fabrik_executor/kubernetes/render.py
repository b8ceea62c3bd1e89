"""Pure rendering of everything the Kubernetes backend creates: no I/O, no clock (the caller passes
`now`), so every manifest is golden-file tested and validated against the Kubernetes schemas.

Per run:     PersistentVolumeClaim `data-fabrik-<run-id>` (the workspace, outlives attempts).
Per attempt: Job `fabrik-<run-id>-<attempt>`; Secret `fabrik-<run-id>-<attempt>-llm` (run-scoped
             LLM key); Secret `fabrik-<run-id>-<attempt>-spec` (inline spec and todo, if any).
Mirrored:    Secret `fabrik-env-<project>-<env>` and credential bundles, copied from
             `fabrik-system` into the runs namespace (see `mirror_secret`).

Run ids are ULIDs (upper case); names use them lower-cased, labels as they are.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fabrik_common.events import RunDispatched
from fabrik_common.experiments import harness_file_for, is_configuration_variable

PREFIX = "fabrik.sh/"
LABEL_RUN_ID = PREFIX + "run-id"
LABEL_PROJECT = PREFIX + "project"
LABEL_SPEC = PREFIX + "spec"
LABEL_ENV = PREFIX + "env"
LABEL_ATTEMPT = PREFIX + "attempt"
LABEL_MANAGED_BY = PREFIX + "managed-by"
LABEL_COMPONENT = PREFIX + "component"
LABEL_MIRROR_OF = PREFIX + "mirror-of"
MANAGED_BY = "fabrik"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

ANN_STATUS = PREFIX + "status"
ANN_STARTED_AT = PREFIX + "started-at"
ANN_FINISHED_AT = PREFIX + "finished-at"
ANN_OUTCOME = PREFIX + "outcome"
ANN_IMAGE_DIGEST = PREFIX + "image-digest"
ANN_IMAGE = PREFIX + "image"
ANN_DEADLINE = PREFIX + "deadline"
ANN_DISPATCHED_AT = PREFIX + "dispatched-at"
ANN_RETENTION_DAYS = PREFIX + "retention-days"
ANN_STOP = PREFIX + "stop"

# Keeps a Job object around until its RunFinished is published, whoever deletes it (a cancel,
# `kubectl delete`, the TTL controller): the executor removes it once the end is reported.
FINALIZER = PREFIX + "report"

WORKLOAD_CONTAINER = "workload"
CLONE_CONTAINER = "clone"
WORKSPACE_MOUNT = "/workspace"
ENV_DIR = "/etc/fabrik/env"
LLM_DIR = "/etc/fabrik/llm"
RUN_DIR = "/etc/fabrik/run"
CREDENTIALS_DIR = "/etc/fabrik/credentials"
TMP_DIR = "/tmp"  # noqa: S108 - an emptyDir of the pod, not the host's /tmp
UID = 1000
GID = 1000

# Run parameters' labels (user labels; the `fabrik.sh/` prefix is reserved for Fabrik itself).
CREDENTIAL_OVERRIDE_PREFIX = "credentials.fabrik.sh/"
"""`credentials.fabrik.sh/<target>: <secret>` makes a run use another bundle for `<target>`."""
RETENTION_LABEL = "retention.fabrik.sh/days"
"""`retention.fabrik.sh/days: "3"` overrides the workspace retention of one run."""

RESERVED_ENV_PREFIXES = ("FABRIK_", "SMITHERS_")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class RenderError(ValueError):
    """The run cannot be turned into manifests (e.g. an image not pinned by digest)."""


@dataclass(frozen=True)
class RenderConfig:
    """What rendering needs from the executor's settings."""

    namespace: str = "fabrik-runs"
    storage_class: str = ""
    """Empty: the cluster's default storage class (the field is left out)."""
    pvc_size: str = "10Gi"
    clone_image: str = "docker.io/alpine/git:2.47.2"
    default_image: str = ""
    default_command: tuple[str, ...] = ()
    llm_proxy_url: str = "http://llm-proxy.fabrik-system.svc:8081"
    ttl_seconds_after_finished: int = 604800
    termination_grace_seconds: int = 30
    credential_bundles: Mapping[str, str] = field(default_factory=dict)
    """target name → Secret name in the system namespace (mounted at /etc/fabrik/credentials/<target>/)."""
    image_pull_secrets: tuple[str, ...] = ()
    retention_days: float = 7.0


# ---------------------------------------------------------------------------------------------
# names and metadata


def k8s_run_id(run_id: str) -> str:
    return run_id.lower()


def pvc_name(run_id: str) -> str:
    return f"data-fabrik-{k8s_run_id(run_id)}"


def job_name(run_id: str, attempt: int) -> str:
    return f"fabrik-{k8s_run_id(run_id)}-{attempt}"


def llm_secret_name(run_id: str, attempt: int) -> str:
    return f"{job_name(run_id, attempt)}-llm"


def spec_secret_name(run_id: str, attempt: int) -> str:
    return f"{job_name(run_id, attempt)}-spec"


def env_secret_name(project: str, env: str) -> str:
    return f"fabrik-env-{project}-{env}"


def credential_volume_name(target: str) -> str:
    return "cred-" + re.sub(r"[^a-z0-9-]", "-", target.lower()).strip("-")[:50]


def label_value(text: str) -> str:
    """`text` made a valid label value (≤ 63 of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    value = _LABEL_VALUE_BAD.sub("-", text)[:63].strip("-_.")
    return value


def spec_label(dispatch: RunDispatched) -> str:
    spec = dispatch.params.spec or {}
    spec_id = spec.get("id") if isinstance(spec, dict) else None
    if isinstance(spec_id, str) and label_value(spec_id):
        return label_value(spec_id)
    if dispatch.params.spec_path:
        stem = dispatch.params.spec_path.rsplit("/", 1)[-1].removesuffix(".json")
        if label_value(stem):
            return label_value(stem)
    return "none"


def run_labels(dispatch: RunDispatched) -> dict[str, str]:
    return {
        LABEL_RUN_ID: dispatch.run_id,
        LABEL_PROJECT: dispatch.project,
        LABEL_SPEC: spec_label(dispatch),
        LABEL_ENV: dispatch.env,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def attempt_labels(dispatch: RunDispatched) -> dict[str, str]:
    return {**run_labels(dispatch), LABEL_ATTEMPT: str(dispatch.attempt)}


def iso(moment: datetime) -> str:
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retention_days(dispatch: RunDispatched) -> float | None:
    """The run's own retention (label `retention.fabrik.sh/days`), if it sets a valid one."""
    raw = dispatch.params.labels.get(RETENTION_LABEL)
    if raw is None:
        return None
    try:
        days = float(raw)
    except ValueError:
        return None
    return days if days >= 0 and math.isfinite(days) else None


# ---------------------------------------------------------------------------------------------
# images


def pin_image(image: str | None, digest: str | None, default_image: str = "") -> str:
    """The workload image as `name[:tag]@sha256:<hex>`.

    The digest comes from `RunDispatched.image_digest` (`sha256:<hex>`, or a full pinned
    reference; a resume carries the digest recorded by the first attempt) or from the image
    itself. A tag alone is rejected here: a tag can move, so what runs would not be what was
    recorded (the backend resolves a tag to its digest through the registry before rendering)."""
    ref = (image or default_image or "").strip()
    if digest:
        digest = digest.strip()
        if "@" in digest:
            _check_pinned(digest)
            return digest
        if not _DIGEST.match(digest):
            raise RenderError(f"image digest {digest!r} is not of the form sha256:<64 hex digits>")
        if not ref:
            raise RenderError(
                "the run has an image digest but no image name (workload.image or FABRIK_K8S_DEFAULT_IMAGE)"
            )
        return f"{ref.split('@', 1)[0]}@{digest}"
    if not ref:
        raise RenderError(
            "the run names no image: set workload.image (pinned by digest, image@sha256:...) "
            "or the executor's FABRIK_K8S_DEFAULT_IMAGE"
        )
    if "@" not in ref:
        raise RenderError(
            f"image {ref!r} is not pinned by digest: use {ref}@sha256:<digest> (or send the digest "
            "as image_digest); a tag can move, and Fabrik records and resumes exactly the digest that ran"
        )
    _check_pinned(ref)
    return ref


def _check_pinned(ref: str) -> None:
    name, _, digest = ref.partition("@")
    if not name or not _DIGEST.match(digest):
        raise RenderError(f"image {ref!r} is not pinned by a sha256 digest (name@sha256:<64 hex digits>)")


def digest_of(pinned: str) -> str:
    return pinned.partition("@")[2]


# ---------------------------------------------------------------------------------------------
# PVC


def render_pvc(dispatch: RunDispatched, config: RenderConfig) -> dict[str, Any]:
    annotations: dict[str, str] = {}
    days = retention_days(dispatch)
    if days is not None:
        annotations[ANN_RETENTION_DAYS] = _number(days)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": config.pvc_size}},
    }
    if config.storage_class:
        spec["storageClassName"] = config.storage_class
    metadata: dict[str, Any] = {
        "name": pvc_name(dispatch.run_id),
        "namespace": config.namespace,
        "labels": {**run_labels(dispatch), LABEL_COMPONENT: "workspace"},
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


# ---------------------------------------------------------------------------------------------
# Secrets


def _b64(value: str | bytes) -> str:
    data = value.encode() if isinstance(value, str) else value
    return base64.b64encode(data).decode("ascii")


def render_llm_secret(dispatch: RunDispatched, key: str, config: RenderConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": llm_secret_name(dispatch.run_id, dispatch.attempt),
            "namespace": config.namespace,
            "labels": {**attempt_labels(dispatch), LABEL_COMPONENT: "llm-key"},
        },
        "data": {"key": _b64(key)},
    }


def render_spec_secret(dispatch: RunDispatched, config: RenderConfig) -> dict[str, Any] | None:
    data: dict[str, str] = {}
    if dispatch.params.spec is not None:
        data["spec.json"] = _b64(json.dumps(dispatch.params.spec, indent=2, sort_keys=True))
    if dispatch.params.todo is not None:
        data["todo.json"] = _b64(json.dumps(dispatch.params.todo, indent=2, sort_keys=True))
    if not data:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": spec_secret_name(dispatch.run_id, dispatch.attempt),
            "namespace": config.namespace,
            "labels": {**attempt_labels(dispatch), LABEL_COMPONENT: "spec"},
        },
        "data": data,
    }


@dataclass(frozen=True)
class MirroredSecret:
    manifest: dict[str, Any]
    skipped: tuple[str, ...]
    """Keys left out, with why (reserved prefix, not a valid key)."""


def mirror_secret(
    source: Mapping[str, Any],
    *,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    env_keys_only: bool = False,
) -> MirroredSecret:
    """A copy of `source` (a Secret read from the system namespace) for the runs namespace.

    Only the data is copied (no owner, no annotations of the source). For the project env
    (`env_keys_only`), keys that are reserved (`FABRIK_*`, `SMITHERS_*`) or not valid variable
    names are left out, since the Secret is also projected as environment variables."""
    data: dict[str, str] = {}
    skipped: list[str] = []
    raw: Mapping[str, Any] = source.get("data") or {}
    for key in sorted(raw):
        value = raw[key]
        if env_keys_only and key.upper().startswith(RESERVED_ENV_PREFIXES):
            skipped.append(f"{key}: reserved (FABRIK_*, SMITHERS_*)")
            continue
        if env_keys_only and not _ENV_KEY.match(key):
            skipped.append(f"{key}: not a valid environment variable name")
            continue
        if not _SECRET_KEY.match(key):
            skipped.append(f"{key}: not a valid Secret key")
            continue
        data[key] = value if isinstance(value, str) else ""
    source_name = str((source.get("metadata") or {}).get("name", ""))
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": source.get("type") or "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, LABEL_MIRROR_OF: label_value(source_name) or "unknown"},
        },
        "data": data,
    }
    return MirroredSecret(manifest, tuple(skipped))


def credential_bundles(dispatch: RunDispatched, defaults: Mapping[str, str]) -> dict[str, str]:
    """target → Secret name for this run: the configured defaults, where the run's labels
    (`credentials.fabrik.sh/<target>: <secret>`) override a target, its bundle replaces the
    default one (never both)."""
    bundles = dict(defaults)
    for key, value in dispatch.params.labels.items():
        if key.startswith(CREDENTIAL_OVERRIDE_PREFIX) and value:
            target = key[len(CREDENTIAL_OVERRIDE_PREFIX) :]
            if target and _DNS_SUBDOMAIN.match(value):
                bundles[target] = value
    return dict(sorted(bundles.items()))


def mirrored_bundle_name(secret: str) -> str:
    """The name of a credential bundle's copy in the runs namespace."""
    return f"fabrik-cred-{secret}"[:253]


# ---------------------------------------------------------------------------------------------
# Job


@dataclass(frozen=True)
class AttemptInputs:
    """Everything about the attempt that is not in RunDispatched or the config."""

    now: datetime
    started_event_id: str
    llm_key: bool = False
    """Whether the attempt has a run-scoped LLM key Secret."""


def active_deadline_seconds(dispatch: RunDispatched, now: datetime) -> int:
    """Seconds left until the dispatch deadline (at least 1)."""
    deadline = dispatch.deadline if dispatch.deadline.tzinfo else dispatch.deadline.replace(tzinfo=UTC)
    return max(1, math.ceil((deadline - now).total_seconds()))


def _restricted_container_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


CLONE_SCRIPT = """\
set -eu
cd /workspace
mkdir -p .fabrik
if [ -e .fabrik/clone-done ]; then
  echo "fabrik: the workspace already has the repository; nothing to clone"
  exit 0
fi
git init -q .
git config --local advice.detachedHead false
git remote remove origin 2>/dev/null || true
git remote add origin "$FABRIK_REPO_URL"
echo "fabrik: fetching $FABRIK_REPO_URL"
git fetch -q origin '+refs/heads/*:refs/remotes/origin/*' '+refs/tags/*:refs/tags/*'
if [ "$FABRIK_REPO_REF" = "HEAD" ]; then
  git remote set-head origin --auto >/dev/null
  ref=origin/HEAD
elif git rev-parse -q --verify "origin/$FABRIK_REPO_REF^{commit}" >/dev/null; then
  ref="origin/$FABRIK_REPO_REF"
else
  git fetch -q origin "$FABRIK_REPO_REF" 2>/dev/null || true
  ref="$FABRIK_REPO_REF"
fi
git checkout -q --detach "$ref"
printf '.fabrik/\\nlost+found/\\n' >> .git/info/exclude
git rev-parse HEAD > .fabrik/clone-done
echo "fabrik: workspace prepared at $(cat .fabrik/clone-done)"
"""


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def workload_env(
    dispatch: RunDispatched, config: RenderConfig, *, llm_key: bool, has_spec: bool, has_todo: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """The workload's explicit variables (they win over the project env projected with envFrom)
    and warnings about `workload.env` entries left out."""
    warnings: list[str] = []
    env: list[dict[str, Any]] = [
        _env("HOME", WORKSPACE_MOUNT),
        _env("LANG", "C.UTF-8"),
        _env("PYTHONUNBUFFERED", "1"),
        _env("TMPDIR", TMP_DIR),
    ]
    seen = {e["name"] for e in env}
    for key, value in sorted(dispatch.params.workload.env.items()):
        if key.upper().startswith(RESERVED_ENV_PREFIXES) and not is_configuration_variable(key):
            warnings.append(f"workload.env: {key} is reserved (FABRIK_*, SMITHERS_*), skipped")
            continue
        if not _ENV_KEY.match(key):
            warnings.append(f"workload.env: {key!r} is not a valid variable name, skipped")
            continue
        if key in seen:
            env = [e for e in env if e["name"] != key]
        env.append(_env(key, value))
        seen.add(key)
    base = config.llm_proxy_url.rstrip("/")
    fixed: list[dict[str, Any]] = [_env("OPENAI_BASE_URL", f"{base}/v1"), _env("ANTHROPIC_BASE_URL", base)]
    if llm_key:
        ref = {"secretKeyRef": {"name": llm_secret_name(dispatch.run_id, dispatch.attempt), "key": "key"}}
        fixed += [
            {"name": name, "valueFrom": ref}
            for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FABRIK_LLM_KEY")
        ]
        fixed.append(_env("FABRIK_LLM_KEY_FILE", f"{LLM_DIR}/key"))
    fixed += [
        _env("FABRIK_RUN_ID", dispatch.run_id),
        _env("FABRIK_PROJECT", dispatch.project),
        _env("FABRIK_ENV", dispatch.env),
        _env("FABRIK_ATTEMPT", str(dispatch.attempt)),
        _env("FABRIK_WORKSPACE", WORKSPACE_MOUNT),
        _env("FABRIK_ENV_DIR", ENV_DIR),
        _env("FABRIK_CREDENTIALS_DIR", CREDENTIALS_DIR),
    ]
    if has_spec:
        fixed.append(_env("FABRIK_SPEC_FILE", f"{RUN_DIR}/spec.json"))
    if dispatch.params.spec_path:
        fixed.append(
            _env(
                "FABRIK_SPEC_HARNESS_FILE", f"{WORKSPACE_MOUNT}/{harness_file_for(dispatch.params.spec_path)}"
            )
        )
    if has_todo:
        fixed.append(_env("FABRIK_TODO_FILE", f"{RUN_DIR}/todo.json"))
    fixed_names = {e["name"] for e in fixed}
    env = [e for e in env if e["name"] not in fixed_names] + fixed
    return env, warnings


def workload_argv(dispatch: RunDispatched, config: RenderConfig) -> tuple[list[str], list[str]]:
    """(command, args): the run's command, else the executor's default; neither → the image's entrypoint."""
    workload = dispatch.params.workload
    command = list(workload.command) or list(config.default_command)
    return command, list(workload.args)


def render_job(
    dispatch: RunDispatched, config: RenderConfig, inputs: AttemptInputs
) -> tuple[dict[str, Any], list[str]]:
    """The attempt's Job and the warnings about what was left out of it (for the run's log)."""
    image = pin_image(dispatch.params.workload.image, dispatch.image_digest, config.default_image)
    labels = attempt_labels(dispatch)
    name = job_name(dispatch.run_id, dispatch.attempt)
    resources = dispatch.params.resources
    has_spec = dispatch.params.spec is not None
    has_todo = dispatch.params.todo is not None
    env, warnings = workload_env(
        dispatch, config, llm_key=inputs.llm_key, has_spec=has_spec, has_todo=has_todo
    )
    command, args = workload_argv(dispatch, config)
    bundles = credential_bundles(dispatch, config.credential_bundles)

    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc_name(dispatch.run_id)}},
        {"name": "tmp", "emptyDir": {}},
        {
            "name": "env",
            "secret": {
                "secretName": env_secret_name(dispatch.project, dispatch.env),
                "optional": True,
                "defaultMode": 0o440,
            },
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": WORKSPACE_MOUNT},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "env", "mountPath": ENV_DIR, "readOnly": True},
    ]
    if inputs.llm_key:
        volumes.append(
            {
                "name": "llm",
                "secret": {
                    "secretName": llm_secret_name(dispatch.run_id, dispatch.attempt),
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "llm", "mountPath": LLM_DIR, "readOnly": True})
    if has_spec or has_todo:
        volumes.append(
            {
                "name": "run",
                "secret": {
                    "secretName": spec_secret_name(dispatch.run_id, dispatch.attempt),
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "run", "mountPath": RUN_DIR, "readOnly": True})
    for target, secret in bundles.items():
        volume = credential_volume_name(target)
        volumes.append(
            {"name": volume, "secret": {"secretName": mirrored_bundle_name(secret), "defaultMode": 0o440}}
        )
        # A directory mount, never subPath: the kubelet refreshes it when the Secret rotates.
        mounts.append({"name": volume, "mountPath": f"{CREDENTIALS_DIR}/{target}", "readOnly": True})

    workload: dict[str, Any] = {
        "name": WORKLOAD_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKSPACE_MOUNT,
        "env": env,
        "envFrom": [
            {"secretRef": {"name": env_secret_name(dispatch.project, dispatch.env), "optional": True}}
        ],
        "resources": {
            "requests": {"cpu": resources.cpu_request, "memory": resources.memory_request},
            "limits": {"cpu": resources.cpu_limit, "memory": resources.memory_limit},
        },
        "securityContext": _restricted_container_context(),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if command:
        workload["command"] = command
    if args:
        workload["args"] = args

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": GID,
            "fsGroup": GID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [workload],
        "volumes": volumes,
    }
    repo = dispatch.params.repo
    if repo is not None:
        pod_spec["initContainers"] = [
            {
                "name": CLONE_CONTAINER,
                "image": config.clone_image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/sh", "-c", CLONE_SCRIPT],
                "env": [
                    _env("FABRIK_REPO_URL", repo.url),
                    _env("FABRIK_REPO_REF", repo.ref),
                    _env("HOME", TMP_DIR),
                    _env("GIT_TERMINAL_PROMPT", "0"),
                ],
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"cpu": "1", "memory": "512Mi"},
                },
                "securityContext": _restricted_container_context(),
                "volumeMounts": [
                    {"name": "workspace", "mountPath": WORKSPACE_MOUNT},
                    {"name": "tmp", "mountPath": TMP_DIR},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ]
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]

    status = {"phase": "created", "started_event_id": inputs.started_event_id}
    annotations = {
        ANN_STATUS: json.dumps(status, sort_keys=True, separators=(",", ":")),
        ANN_IMAGE: image,
        ANN_IMAGE_DIGEST: digest_of(image),
        ANN_DEADLINE: iso(dispatch.deadline),
        ANN_DISPATCHED_AT: iso(dispatch.occurred_at),
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": config.namespace,
            "labels": labels,
            "annotations": annotations,
            "finalizers": [FINALIZER],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": active_deadline_seconds(dispatch, inputs.now),
            "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels, "annotations": {ANN_IMAGE_DIGEST: digest_of(image)}},
                "spec": pod_spec,
            },
        },
    }
    return job, warnings


def all_manifests(
    dispatch: RunDispatched, config: RenderConfig, inputs: AttemptInputs, llm_key: str | None
) -> list[dict[str, Any]]:
    """Every object one attempt creates (mirrors excluded), in creation order."""
    out: list[dict[str, Any]] = [render_pvc(dispatch, config)]
    if llm_key is not None:
        out.append(render_llm_secret(dispatch, llm_key, config))
    spec = render_spec_secret(dispatch, config)
    if spec is not None:
        out.append(spec)
    out.append(render_job(dispatch, config, inputs)[0])
    return out


def validate_names(names: Sequence[str]) -> list[str]:
    """Names that are not DNS-1123 subdomains (≤ 253) — for tests and a defensive check."""
    return [n for n in names if len(n) > 253 or not _DNS_SUBDOMAIN.match(n)]


def is_dns_label(text: str) -> bool:
    return len(text) <= 63 and bool(_DNS_LABEL.match(text))
