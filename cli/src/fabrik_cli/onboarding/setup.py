"""`fabrik init`: the answers, the pre-flight checks, the files written, the command to start.

No click here (the wizard's prompts are in `fabrik_cli.commands.init`). Everything is written to
the CLI's configuration directory — `$FABRIK_HOME`, else `$XDG_CONFIG_HOME/fabrik`, else
`~/.config/fabrik`, the directory of `fabrik login`'s credentials — created with mode 0700:

| file | mode | what |
|---|---|---|
| `config.yaml` | 0600 | where Fabrik runs, the first project, addresses, the other commands' defaults |
| `token` | 0600 | the API token given with `--token` (named by `token_file`) |
| `llm.env` | 0600 | `FABRIK_LLM_OPENAI_API_KEY=...` / `FABRIK_LLM_ANTHROPIC_API_KEY=...` (when given) |
| `hcloud-token` | 0600 | the Hetzner Cloud API token, read by `fabrik infra` when `$HCLOUD_TOKEN` is unset |

The other commands' defaults in `config.yaml` (`api_url`, `token_file`, `project`, `output`) are
read by `fabrik_cli.userconfig`. For a new Hetzner cluster it also writes the cluster's
`fabrik-infra.yaml` (never over an existing one).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

import yaml

from fabrik_cli.credentials import credentials_file
from fabrik_cli.doctor import DoctorOptions, run_doctor
from fabrik_cli.infra import hetzner
from fabrik_cli.infra.config import LOCATIONS, InfraFileError, parse
from fabrik_cli.local import StackError, check_ports_free, plan_ports
from fabrik_cli.userconfig import CONFIG_FILE, OUTPUT_FORMATS, TOKEN_FILE

Target = Literal["local", "cluster", "hetzner"]
TARGETS: Final[tuple[Target, ...]] = ("local", "cluster", "hetzner")
TARGET_HELP: Final = {
    "local": "this machine (fabrik up: NATS and the six services as local processes)",
    "cluster": "an existing Kubernetes cluster, from a kubeconfig (Helm chart charts/fabrik)",
    "hetzner": "a new k3s cluster on Hetzner Cloud (fabrik infra)",
}
DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LLM_ENV_FILE: Final = "llm.env"
K3S_DEFAULT: Final = "v1.31.4+k3s1"


@dataclass
class Answers:
    target: Target = "local"
    project: str = "demo"
    openai_api_key: str = ""
    anthropic_api_key: str = ""
    openai_base_url: str = ""
    # local
    port_base: int = 0
    nats_url: str = ""  # an existing NATS to use instead of the embedded one
    # cluster
    kubeconfig: str = ""
    context: str = ""
    # hetzner
    hcloud_token: str = ""
    cluster_name: str = "fabrik"
    location: str = "nbg1"
    ssh_public_key: str = "~/.ssh/id_ed25519.pub"
    allowed_cidrs: list[str] = field(default_factory=list)
    infra_file: str = "fabrik-infra.yaml"
    k3s_version: str = K3S_DEFAULT
    image_registry: str = ""  # set: the cluster installs the platform (the file's `platform`)
    # what the other commands take as defaults (fabrik_cli.userconfig)
    api_url: str = ""  # empty: the local stack's gateway, found by its state file
    token: str = ""  # stored in <config dir>/token (0600), named by token_file
    token_file: str = ""
    output: str = ""


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    ok: bool
    detail: str = ""
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        text = f"{mark} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if not self.ok and self.fix:
            text += f"\n       fix: {self.fix}"
        return text


@dataclass(frozen=True)
class Written:
    directory: Path
    files: list[Path]
    start: str  # the one command to start
    before: list[str]  # what to do before it, if anything


def config_dir(environ: Mapping[str, str]) -> Path:
    return credentials_file(environ).parent


def problems(answers: Answers) -> list[str]:
    """`option: rule` for every answer that cannot be used."""
    out: list[str] = []
    if answers.target not in TARGETS:
        out.append(f"--target: must be one of {', '.join(TARGETS)} (got {answers.target!r})")
    if not DNS_LABEL.match(answers.project) or len(answers.project) > 63:
        out.append(
            "--project: must be a DNS-1123 label: lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most 63 characters (got {answers.project!r})"
        )
    if answers.target == "cluster" and not answers.kubeconfig:
        out.append("--kubeconfig: required for --target cluster (the cluster's kubeconfig file)")
    if answers.target == "hetzner":
        if not answers.hcloud_token:
            out.append("--hcloud-token: required for --target hetzner (or set $HCLOUD_TOKEN)")
        if answers.location not in LOCATIONS:
            out.append(f"--location: must be one of {', '.join(LOCATIONS)} (got {answers.location!r})")
        if not answers.allowed_cidrs:
            out.append("--allow-cidr: give at least one address range allowed to reach SSH and the API")
        if not DNS_LABEL.match(answers.cluster_name) or len(answers.cluster_name) > 40:
            out.append(
                "--cluster-name: must be a DNS-1123 label of at most 40 characters "
                f"(got {answers.cluster_name!r})"
            )
    if not 0 <= answers.port_base <= 50000:
        out.append(f"--port-base: must be between 0 and 50000 (got {answers.port_base})")
    if answers.api_url:
        parts = urlsplit(answers.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(f"--api: must be an http:// or https:// URL of the gateway (got {answers.api_url!r})")
    if answers.token and answers.token_file:
        out.append("--token, --token-file: give one of them")
    if answers.token_file and not Path(answers.token_file).expanduser().is_file():
        out.append(f"--token-file: no such file (got {answers.token_file!r})")
    if answers.output and answers.output not in OUTPUT_FORMATS:
        out.append(f"--output: must be one of {', '.join(OUTPUT_FORMATS)} (got {answers.output!r})")
    return out


# --------------------------------------------------------------------------------------------
# Pre-flight checks


def check_ports(answers: Answers) -> Check:
    title = "local ports free"
    try:
        plan = plan_ports(port_base=answers.port_base)
        check_ports_free(plan)
    except StackError as exc:
        lines = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:]) or lines[0]
        return Check(
            "ports", title, False, detail, "stop what listens there, or choose other ports with --port-base N"
        )
    ports = sorted({plan.nats, *plan.services.values()})
    return Check("ports", title, True, ", ".join(str(p) for p in ports))


def _doctor_result(options: DoctorOptions, check_id: str) -> tuple[bool, str, str]:
    report = asyncio.run(run_doctor(options))
    for result in report.checks:
        if result.id == check_id:
            return result.status == "ok", result.detail, result.fix
    return False, f"{check_id} was not checked", ""


def check_kubeconfig(answers: Answers, environ: Mapping[str, str]) -> Check:
    title = "Kubernetes API reachable"
    path = Path(answers.kubeconfig).expanduser()
    if not path.is_file():
        return Check(
            "kubeconfig",
            title,
            False,
            f"no kubeconfig at {path}",
            "give the file your cluster's admin gave you with --kubeconfig PATH "
            "(for a Hetzner cluster made by fabrik: `fabrik infra kubeconfig`)",
        )
    skip: tuple[str, ...] = ("nats", "gateway", "llm-proxy", "local", "k8s.namespace", "k8s.storage-class")
    skip += ("k8s.quota", "k8s.limit-range", "k8s.rbac", "k8s.secret")
    options = DoctorOptions(
        kubeconfig=str(path), context=answers.context or None, skip=skip, timeout=5.0, environ=dict(environ)
    )
    ok, detail, fix = _doctor_result(options, "k8s.api")
    return Check("kubeconfig", title, ok, detail, fix)


def check_nats(answers: Answers, environ: Mapping[str, str]) -> Check:
    options = DoctorOptions(
        nats_url=answers.nats_url,
        no_cluster=True,
        skip=("nats.jetstream", "nats.topology", "gateway", "llm-proxy", "local"),
        timeout=3.0,
        environ=dict(environ),
    )
    ok, detail, fix = _doctor_result(options, "nats")
    return Check("nats", "NATS reachable", ok, detail, fix or "start NATS or correct --nats-url")


def check_hcloud_token(answers: Answers, environ: Mapping[str, str]) -> Check:
    title = "Hetzner Cloud token valid"
    client = hetzner.connect(
        environ, token=answers.hcloud_token, policy=hetzner.RetryPolicy(base=0.5, max_retries=1)
    )
    reason = hetzner.check_token(client)
    if reason:
        return Check(
            "hcloud-token",
            title,
            False,
            reason,
            "create a token with read & write access: Hetzner Console > your project > Security > API tokens",
        )
    return Check("hcloud-token", title, True, "the API accepted it")


def check_ssh_key(answers: Answers) -> Check:
    title = "SSH public key present"
    path = Path(answers.ssh_public_key).expanduser()
    private_path = str(path).removesuffix(".pub")
    fix = f"create one with `ssh-keygen -t ed25519 -f {private_path}`, or give --ssh-key PATH.pub"
    try:
        text = path.read_text().strip()
    except OSError:
        return Check("ssh-key", title, False, f"no file {path}", fix)
    if not text.startswith(("ssh-", "ecdsa-", "sk-")) or len(text.split()) < 2:
        return Check("ssh-key", title, False, f"{path} is not an OpenSSH public key", fix)
    private = path.with_suffix("") if path.suffix == ".pub" else None
    if private is not None and not private.exists():
        return Check("ssh-key", title, False, f"{path} has no private key beside it ({private})", fix)
    return Check("ssh-key", title, True, str(path))


def preflight(answers: Answers, environ: Mapping[str, str]) -> list[Check]:
    checks: list[Check] = []
    if answers.target == "local":
        checks.append(check_ports(answers))
        if answers.nats_url:
            checks.append(check_nats(answers, environ))
    elif answers.target == "cluster":
        checks.append(check_kubeconfig(answers, environ))
        if answers.nats_url:
            checks.append(check_nats(answers, environ))
    else:
        checks.append(check_hcloud_token(answers, environ))
        checks.append(check_ssh_key(answers))
    return checks


# --------------------------------------------------------------------------------------------
# Writing


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def infra_document(answers: Answers) -> str:
    doc = {
        "name": answers.cluster_name,
        "location": answers.location,
        "k3s_version": answers.k3s_version,
        "network": {"ip_range": "10.0.0.0/16", "subnet": "10.0.1.0/24"},
        "firewall": {
            "ssh_allowed_cidrs": list(answers.allowed_cidrs),
            "api_allowed_cidrs": list(answers.allowed_cidrs),
        },
        "control_plane": {"server_type": "cx22", "count": 1},
        "workers": [{"name": "general", "server_type": "cx32", "count": 2}],
        "ssh_keys": [{"name": f"{answers.cluster_name}-ops", "public_key_file": answers.ssh_public_key}],
        "load_balancer": {"type": "lb11"},
    }
    if answers.image_registry:
        doc["platform"] = {"image_registry": answers.image_registry}
    return "# written by `fabrik init`; see docs/infra.md\n" + yaml.safe_dump(doc, sort_keys=False)


def write(answers: Answers, environ: Mapping[str, str], *, cwd: Path | None = None) -> Written:
    directory = config_dir(environ)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    files: list[Path] = []
    config: dict[str, object] = {
        "version": 1,
        "target": answers.target,
        "project": answers.project,
        "llm_providers": [
            name
            for name, key in (("openai", answers.openai_api_key), ("anthropic", answers.anthropic_api_key))
            if key
        ]
        or ["echo"],
    }
    if answers.openai_base_url:
        config["openai_base_url"] = answers.openai_base_url
    if answers.nats_url:
        config["nats_url"] = answers.nats_url
    if answers.api_url:
        config["api_url"] = answers.api_url
    if answers.output:
        config["output"] = answers.output
    if answers.token:
        token_path = directory / TOKEN_FILE
        write_private(token_path, answers.token.strip() + "\n")
        files.append(token_path)
        config["token_file"] = str(token_path)
    elif answers.token_file:
        config["token_file"] = str(Path(answers.token_file).expanduser().resolve())
    env_lines = []
    if answers.openai_api_key:
        env_lines.append(f"FABRIK_LLM_OPENAI_API_KEY={shlex.quote(answers.openai_api_key)}")
    if answers.anthropic_api_key:
        env_lines.append(f"FABRIK_LLM_ANTHROPIC_API_KEY={shlex.quote(answers.anthropic_api_key)}")
    if answers.openai_base_url:
        env_lines.append(f"FABRIK_LLM_OPENAI_BASE_URL={shlex.quote(answers.openai_base_url)}")
    llm_env = directory / LLM_ENV_FILE
    if env_lines:
        write_private(llm_env, "\n".join(env_lines) + "\n")
        files.append(llm_env)
    before: list[str] = []
    if answers.target == "local":
        config["port_base"] = answers.port_base
        up = "fabrik up" + (f" --port-base {answers.port_base}" if answers.port_base else "")
        start = f"set -a && . {shlex.quote(str(llm_env))} && set +a && {up}" if env_lines else up
    elif answers.target == "cluster":
        config["kubeconfig"] = str(Path(answers.kubeconfig).expanduser())
        if answers.context:
            config["context"] = answers.context
        kube = f"--kubeconfig {shlex.quote(config['kubeconfig'])}"  # type: ignore[arg-type]
        if answers.context:
            kube += f" --kube-context {shlex.quote(answers.context)}"
        if env_lines:
            literals = []
            if answers.openai_api_key:
                literals.append('--from-literal=openai="$FABRIK_LLM_OPENAI_API_KEY"')
            if answers.anthropic_api_key:
                literals.append('--from-literal=anthropic="$FABRIK_LLM_ANTHROPIC_API_KEY"')
            before.append(
                f"set -a && . {shlex.quote(str(llm_env))} && set +a && kubectl "
                f"{kube.replace('--kube-context', '--context')} -n fabrik-system create secret generic "
                f"fabrik-llm-keys {' '.join(literals)}"
            )
        before.append("helm dependency build charts/fabrik")
        start = (
            f"helm upgrade --install fabrik charts/fabrik {kube} -n default "
            "-f charts/fabrik/values-production.yaml --set secrets.runKey.create=true "
            "--set secrets.envKey.create=true --set global.imageRegistry=<your registry>"
        )
    else:
        token_file = directory / hetzner.TOKEN_FILE_NAME
        write_private(token_file, answers.hcloud_token + "\n")
        files.append(token_file)
        infra = Path(answers.infra_file).expanduser()
        if not infra.is_absolute():
            infra = (cwd or Path.cwd()) / infra
        config["infra_file"] = str(infra)
        if not infra.exists():
            text = infra_document(answers)
            try:
                parse(text, infra)
            except InfraFileError as exc:
                raise ValueError("; ".join(exc.problems)) from None
            infra.write_text(text)
            files.append(infra)
        start = f"fabrik infra apply -f {shlex.quote(str(infra))}"
    config_path = directory / CONFIG_FILE
    write_private(config_path, yaml.safe_dump(config, sort_keys=False))
    files.insert(0, config_path)
    return Written(directory, files, start, before)
