"""Manifest rendering: golden files, Kubernetes schema validation (--strict), and the rules."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from fabrik_common.events import RepoRef, Resources, RunDispatched, RunParameters, Workload
from fabrik_executor.kubernetes import render
from fabrik_executor.kubernetes.render import AttemptInputs, RenderConfig, RenderError

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.30"
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
RUN_ID = "01JX2Y3Z4A5B6C7D8E9F0G1H2J"
DIGEST = "sha256:" + "ab" * 32
CONFIG = RenderConfig(
    namespace="fabrik-runs",
    storage_class="fast-ssd",
    clone_image="docker.io/alpine/git@sha256:" + "cd" * 32,
    llm_proxy_url="http://llm-proxy.fabrik-system.svc:8081/",
    credential_bundles={"github": "github-app", "npm": "npm-token"},
    termination_grace_seconds=10,
)


def dispatch(**overrides: Any) -> RunDispatched:
    params: dict[str, Any] = {
        "spec": {"id": "add-login", "goal": "add a login page"},
        "todo": {"tasks": []},
        "repo": RepoRef(url="https://github.com/acme/shop.git", ref="main"),
        "workload": Workload(
            image="ghcr.io/acme/agent:1.4@" + DIGEST,
            command=("agent", "run"),
            args=("--fast",),
            env={"MODE": "ci", "FABRIK_RUN_ID": "spoofed", "bad-name": "x"},
        ),
        "resources": Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi"),
        "labels": {
            "team": "web",
            "credentials.fabrik.sh/npm": "npm-token-web",
            "retention.fabrik.sh/days": "3",
        },
    }
    params.update(overrides.pop("params", {}))
    values: dict[str, Any] = {
        "run_id": RUN_ID,
        "project": "shop",
        "env": "dev",
        "attempt": 1,
        "params": RunParameters(**params),
        "deadline": NOW + timedelta(hours=2),
        "occurred_at": NOW,
    }
    values.update(overrides)
    return RunDispatched(**values)


INPUTS = AttemptInputs(now=NOW, started_event_id="01JX2Y3Z4A5B6C7D8E9F0STARTD", llm_key=True)


def check_golden(name: str, manifest: Any) -> None:
    path = GOLDEN / name
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if os.environ.get("FABRIK_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {name}: run with FABRIK_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), (
        f"{name} differs from the golden file (FABRIK_UPDATE_GOLDEN=1 rewrites it)"
    )


def validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_every_manifest_matches_its_golden_file_and_the_kubernetes_schema() -> None:
    d = dispatch()
    manifests = render.all_manifests(d, CONFIG, INPUTS, llm_key="fk-run-test.key")
    assert [m["kind"] for m in manifests] == ["PersistentVolumeClaim", "Secret", "Secret", "Job"]
    for manifest in manifests:
        validate(manifest)
        check_golden(f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.json", manifest)
    mirror = render.mirror_secret(
        {
            "metadata": {"name": "fabrik-env-shop-dev"},
            "type": "Opaque",
            "data": {"API_URL": "aHR0cDovL3g=", "FABRIK_TOKEN": "eA==", "not valid": "eA=="},
        },
        name="fabrik-env-shop-dev",
        namespace="fabrik-runs",
        labels={**render.run_labels(d), render.LABEL_COMPONENT: "env"},
        env_keys_only=True,
    )
    validate(mirror.manifest)
    check_golden("secret-mirror-env.json", mirror.manifest)
    assert set(mirror.manifest["data"]) == {"API_URL"}
    assert len(mirror.skipped) == 2


def test_minimal_run_without_repo_spec_key_or_bundles_is_valid_too() -> None:
    d = dispatch(
        params={
            "spec": None,
            "todo": None,
            "repo": None,
            "labels": {},
            "workload": Workload(image="busybox@" + DIGEST),
        }
    )
    config = RenderConfig()
    job, warnings = render.render_job(d, config, AttemptInputs(now=NOW, started_event_id="x"))
    validate(job)
    validate(render.render_pvc(d, config))
    pod = job["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "command" not in pod["containers"][0]  # the image's entrypoint
    assert render.render_spec_secret(d, config) is None
    assert "storageClassName" not in render.render_pvc(d, config)["spec"]
    assert warnings == []


def test_names_labels_and_annotations() -> None:
    d = dispatch(attempt=3)
    job, _ = render.render_job(d, CONFIG, INPUTS)
    assert job["metadata"]["name"] == f"fabrik-{RUN_ID.lower()}-3"
    assert render.pvc_name(RUN_ID) == f"data-fabrik-{RUN_ID.lower()}"
    assert render.llm_secret_name(RUN_ID, 3) == f"fabrik-{RUN_ID.lower()}-3-llm"
    labels = job["metadata"]["labels"]
    assert labels == {
        "fabrik.sh/run-id": RUN_ID,
        "fabrik.sh/project": "shop",
        "fabrik.sh/spec": "add-login",
        "fabrik.sh/env": "dev",
        "fabrik.sh/attempt": "3",
        "fabrik.sh/managed-by": "fabrik",
    }
    assert job["spec"]["template"]["metadata"]["labels"] == labels  # the pod watch sees the same
    annotations = job["metadata"]["annotations"]
    assert annotations["fabrik.sh/image-digest"] == DIGEST
    assert json.loads(annotations["fabrik.sh/status"])["phase"] == "created"
    assert job["metadata"]["finalizers"] == ["fabrik.sh/report"]
    assert render.validate_names([job["metadata"]["name"], render.pvc_name(RUN_ID)]) == []


def test_job_spec_deadline_ttl_and_backoff() -> None:
    job, _ = render.render_job(dispatch(deadline=NOW + timedelta(seconds=90.2)), CONFIG, INPUTS)
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 91
    assert spec["ttlSecondsAfterFinished"] == 604800
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # A deadline already (nearly) past still renders a valid Job: at least one second.
    job, _ = render.render_job(dispatch(deadline=NOW - timedelta(seconds=5)), CONFIG, INPUTS)
    assert job["spec"]["activeDeadlineSeconds"] == 1


def test_restricted_security_on_every_container() -> None:
    job, _ = render.render_job(dispatch(), CONFIG, INPUTS)
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = pod["containers"] + pod["initContainers"]
    assert len(containers) == 2
    for container in containers:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["runAsGroup"] == 1000
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/tmp" in mounts and "/workspace" in mounts  # the only writable places
    workload = pod["containers"][0]
    assert workload["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }


def test_secrets_as_files_and_variables() -> None:
    job, warnings = render.render_job(dispatch(), CONFIG, INPUTS)
    pod = job["spec"]["template"]["spec"]
    workload = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in workload["volumeMounts"]}
    # project env: a read-only directory and envFrom, both optional (an env that was never set)
    assert volumes["env"]["secret"] == {
        "secretName": "fabrik-env-shop-dev",
        "optional": True,
        "defaultMode": 0o440,
    }
    assert mounts["/etc/fabrik/env"]["readOnly"] is True
    assert workload["envFrom"] == [{"secretRef": {"name": "fabrik-env-shop-dev", "optional": True}}]
    # the run-scoped LLM key: a file and three variables from the per-attempt Secret
    env = {e["name"]: e for e in workload["env"]}
    key_ref = {"secretKeyRef": {"name": f"fabrik-{RUN_ID.lower()}-1-llm", "key": "key"}}
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FABRIK_LLM_KEY"):
        assert env[name]["valueFrom"] == key_ref
    assert env["FABRIK_LLM_KEY_FILE"]["value"] == "/etc/fabrik/llm/key"
    assert mounts["/etc/fabrik/llm"]["readOnly"] is True
    assert env["OPENAI_BASE_URL"]["value"] == "http://llm-proxy.fabrik-system.svc:8081/v1"
    assert env["ANTHROPIC_BASE_URL"]["value"] == "http://llm-proxy.fabrik-system.svc:8081"
    # reserved and invalid workload.env keys are left out, with a warning each
    assert env["FABRIK_RUN_ID"]["value"] == RUN_ID
    assert env["MODE"]["value"] == "ci"
    assert "bad-name" not in env
    assert len(warnings) == 2
    # credential bundles: directories, never subPath; the run's override replaces the default
    cred_mounts = [
        m for m in workload["volumeMounts"] if m["mountPath"].startswith("/etc/fabrik/credentials/")
    ]
    assert {m["mountPath"]: volumes[m["name"]]["secret"]["secretName"] for m in cred_mounts} == {
        "/etc/fabrik/credentials/github": "fabrik-cred-github-app",
        "/etc/fabrik/credentials/npm": "fabrik-cred-npm-token-web",
    }
    for container in pod["containers"] + pod["initContainers"]:
        assert all("subPath" not in m for m in container["volumeMounts"])


def test_llm_secret_and_spec_secret() -> None:
    d = dispatch()
    secret = render.render_llm_secret(d, "fk-run-abc.def", CONFIG)
    assert base64.b64decode(secret["data"]["key"]).decode() == "fk-run-abc.def"
    assert secret["metadata"]["labels"]["fabrik.sh/run-id"] == RUN_ID
    assert secret["metadata"]["labels"]["fabrik.sh/attempt"] == "1"
    spec = render.render_spec_secret(d, CONFIG)
    assert spec is not None
    assert json.loads(base64.b64decode(spec["data"]["spec.json"]))["id"] == "add-login"


def test_pvc_size_class_and_retention_override() -> None:
    pvc = render.render_pvc(dispatch(), CONFIG)
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "10Gi"}},
        "storageClassName": "fast-ssd",
    }
    assert pvc["metadata"]["annotations"] == {"fabrik.sh/retention-days": "3"}
    assert "fabrik.sh/attempt" not in pvc["metadata"]["labels"]


@pytest.mark.parametrize(
    ("image", "digest", "expected"),
    [
        ("reg/app@" + DIGEST, None, "reg/app@" + DIGEST),
        ("reg/app:1.2", DIGEST, "reg/app:1.2@" + DIGEST),
        ("reg/app:1.2@sha256:" + "0" * 64, DIGEST, "reg/app:1.2@" + DIGEST),  # resume: the recorded one
        ("reg/app:1.2", "other/app@" + DIGEST, "other/app@" + DIGEST),
        (None, DIGEST, "default/img:latest@" + DIGEST),
    ],
)
def test_image_pinning(image: str | None, digest: str | None, expected: str) -> None:
    assert render.pin_image(image, digest, "default/img:latest") == expected


@pytest.mark.parametrize(
    ("image", "digest", "message"),
    [
        ("reg/app:1.2", None, "not pinned by digest"),
        ("reg/app", None, "not pinned by digest"),
        ("reg/app@sha256:short", None, "not pinned by a sha256 digest"),
        ("reg/app", "md5:abc", "not of the form"),
        (None, None, "names no image"),
    ],
)
def test_tag_only_images_are_rejected_with_a_clear_error(
    image: str | None, digest: str | None, message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        render.pin_image(image, digest)
    d = dispatch(image_digest=digest, params={"workload": Workload(image=image)})
    with pytest.raises(RenderError):
        render.render_job(d, RenderConfig(), INPUTS)


def test_clone_script_runs_on_every_attempt_but_skips_a_prepared_workspace() -> None:
    job, _ = render.render_job(dispatch(attempt=2), CONFIG, INPUTS)
    init = job["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == CONFIG.clone_image
    script = init["command"][-1]
    assert ".fabrik/clone-done" in script and "exit 0" in script
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["FABRIK_REPO_URL"] == "https://github.com/acme/shop.git"
    assert env["FABRIK_REPO_REF"] == "main"


def test_run_configuration_variables_reach_the_workload() -> None:
    # The scheduler puts the model and harness settings of the defaults and experiment arms into
    # workload.env (the gateway refuses FABRIK_* there); every other FABRIK_* stays the executor's.
    workload = Workload(
        image="ghcr.io/acme/agent:1.4@" + DIGEST,
        env={"FABRIK_MODEL": "gpt-big", "FABRIK_HARNESS_DEPTH": "3", "FABRIK_RUN_ID": "spoofed"},
    )
    env, warnings = render.workload_env(
        dispatch(params={"workload": workload, "spec": None, "spec_path": "specs/add-login.json"}),
        CONFIG,
        llm_key=False,
        has_spec=False,
        has_todo=False,
    )
    values = {e["name"]: e.get("value") for e in env}
    assert values["FABRIK_MODEL"] == "gpt-big" and values["FABRIK_HARNESS_DEPTH"] == "3"
    assert values["FABRIK_RUN_ID"] == RUN_ID
    assert values["FABRIK_SPEC_HARNESS_FILE"] == "/workspace/specs/add-login.harness.json"
    assert warnings == ["workload.env: FABRIK_RUN_ID is reserved (FABRIK_*, SMITHERS_*), skipped"]
