"""`fabrik-infra.yaml`: the declarative description of one Hetzner Cloud k3s cluster.

Decoded with msgspec (unknown fields refused), then checked rule by rule; every problem is
reported as `field: rule (got ...)`, all at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Any, Final

import msgspec
import yaml

LOCATIONS: Final = ("nbg1", "fsn1", "hel1", "ash")
NETWORK_ZONES: Final = {"nbg1": "eu-central", "fsn1": "eu-central", "hel1": "eu-central", "ash": "us-east"}
DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A k3s release as published: v<major>.<minor>.<patch>+k3s<n> (release candidates allowed).
K3S_VERSION: Final = re.compile(r"^v1\.\d+\.\d+(-rc\d+)?\+k3s\d+$")
FLOATING_VERSIONS: Final = ("latest", "stable", "testing")
LB_TYPES: Final = ("lb11", "lb21", "lb31")
MAX_NAME: Final = 40  # leaves room for "-<pool>-<n>" within a 63-character host name
# The umbrella chart as `helm package` (after `helm dependency build`) and `helm push` publish it
# at each release, under the Fabrik version (docs/infra.md#the-platform).
DEFAULT_CHART: Final = "oci://ghcr.io/fabrik-sh/charts/fabrik"
CHART_VERSION: Final = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")
DEFAULT_VALUES_FILES: Final = ("charts/fabrik/values-production.yaml",)


def fabrik_version() -> str:
    """This CLI's Fabrik version: the chart version a cluster gets unless the file pins another."""
    try:
        return version("fabrik-cli")
    except PackageNotFoundError:  # a source tree without installed metadata
        return "0.1.0"


class InfraFileError(Exception):
    """The file is missing, not YAML, or breaks a rule; `problems` are `field: rule` lines."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


class NetworkSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    ip_range: str = "10.0.0.0/16"
    subnet: str = "10.0.1.0/24"


class FirewallSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    ssh_allowed_cidrs: list[str] = []
    api_allowed_cidrs: list[str] = []


class ControlPlaneSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    server_type: str = "cx22"
    count: int = 1


class WorkerPool(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    server_type: str
    count: int


class SshKeySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    public_key: str | None = None
    public_key_file: str | None = None


class LoadBalancerSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    type: str = "lb11"


class PlatformSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The Fabrik platform the first control plane installs once k3s is up."""

    image_registry: str
    chart: str = DEFAULT_CHART
    version: str = ""  # empty: this CLI's Fabrik version
    values_files: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_VALUES_FILES))
    values: dict[str, Any] = msgspec.field(default_factory=dict)


class InfraSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    location: str
    k3s_version: str
    ssh_keys: list[SshKeySpec]
    firewall: FirewallSpec
    network: NetworkSpec = NetworkSpec()
    control_plane: ControlPlaneSpec = ControlPlaneSpec()
    workers: list[WorkerPool] = []
    load_balancer: LoadBalancerSpec = LoadBalancerSpec()
    image: str = "ubuntu-24.04"
    ssh_private_key_file: str | None = None
    platform: PlatformSpec | None = None


@dataclass(frozen=True)
class InfraConfig:
    """A validated file: the spec plus where it lives (secrets and kubeconfig sit beside it)."""

    spec: InfraSpec
    path: Path
    public_keys: dict[str, str]  # key name -> OpenSSH public key
    platform_values: dict[str, Any] | None = None  # platform.values_files merged in order

    @property
    def chart_version(self) -> str:
        return (self.spec.platform.version if self.spec.platform else "") or fabrik_version()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def network_zone(self) -> str:
        return NETWORK_ZONES[self.spec.location]

    @property
    def state_dir(self) -> Path:
        """`.fabrik/<cluster>/` beside the file: the k3s token and the kubeconfig (both 0600)."""
        return self.path.parent / ".fabrik" / self.spec.name

    def private_key_file(self) -> Path | None:
        if self.spec.ssh_private_key_file:
            return self._resolve(self.spec.ssh_private_key_file)
        for key in self.spec.ssh_keys:
            if key.public_key_file and key.public_key_file.endswith(".pub"):
                return self._resolve(key.public_key_file[: -len(".pub")])
        return None

    def _resolve(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        return path if path.is_absolute() else self.path.parent / path


def _cidr_problems(field: str, values: list[str]) -> list[str]:
    problems: list[str] = []
    for i, value in enumerate(values):
        try:
            ip_network(value, strict=True)
        except ValueError:
            problems.append(f"{field}[{i}]: must be a CIDR such as 203.0.113.0/24 (got {value!r})")
    return problems


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def platform_problems(spec: PlatformSpec, base: Path) -> tuple[list[str], dict[str, Any]]:
    """The rules `platform` breaks, and its values files merged (read now: `apply` sends them)."""
    problems: list[str] = []
    if not spec.image_registry.strip() or "://" in spec.image_registry:
        problems.append(
            "platform.image_registry: required, the registry prefix of the fabrik-* images such as "
            f"ghcr.io/acme/fabrik, without a scheme (got {spec.image_registry!r})"
        )
    if not spec.chart.startswith(("oci://", "https://")):
        problems.append(
            "platform.chart: must be an oci:// chart reference or an https:// URL of the packaged chart "
            f"(got {spec.chart!r})"
        )
    if spec.version and (spec.version in FLOATING_VERSIONS or not CHART_VERSION.match(spec.version)):
        problems.append(
            f"platform.version: must be a released chart version such as 0.1.0 (got {spec.version!r})"
        )
    merged: dict[str, Any] = {}
    for i, raw in enumerate(spec.values_files):
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            problems.append(f"platform.values_files[{i}]: cannot read {path}: {exc.strerror}")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"platform.values_files[{i}]: {path} is not valid YAML: {exc}")
            continue
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append(f"platform.values_files[{i}]: {path} must be a mapping of values")
            continue
        merged = merge_values(merged, data)
    return problems, merged


def validate(spec: InfraSpec, base: Path) -> tuple[list[str], dict[str, str]]:
    """Every rule the file breaks, and the public keys it names (read from their files)."""
    problems: list[str] = []
    if not DNS_LABEL.match(spec.name) or len(spec.name) > MAX_NAME:
        problems.append(
            f"name: must be lower-case letters, digits and '-', start and end with a letter or digit, "
            f"at most {MAX_NAME} characters (got {spec.name!r})"
        )
    if spec.location not in LOCATIONS:
        problems.append(f"location: must be one of {', '.join(LOCATIONS)} (got {spec.location!r})")
    version = spec.k3s_version.strip()
    if not version:
        problems.append("k3s_version: required; pin a release such as v1.31.4+k3s1")
    elif version.lower() in FLOATING_VERSIONS:
        problems.append(
            f"k3s_version: must be a pinned release such as v1.31.4+k3s1, not the channel {version!r} "
            "(a channel moves, and nodes added later would run another version)"
        )
    elif not K3S_VERSION.match(version):
        problems.append(f"k3s_version: must look like v1.31.4+k3s1 (got {version!r})")
    # network
    outer: IPv4Network | None = None
    try:
        parsed = ip_network(spec.network.ip_range, strict=True)
        if not isinstance(parsed, IPv4Network) or not parsed.is_private:
            problems.append(f"network.ip_range: must be a private IPv4 range (got {spec.network.ip_range!r})")
        else:
            outer = parsed
    except ValueError:
        problems.append(
            f"network.ip_range: must be a CIDR such as 10.0.0.0/16 (got {spec.network.ip_range!r})"
        )
    try:
        subnet = ip_network(spec.network.subnet, strict=True)
        if outer is not None and not subnet.subnet_of(outer):  # type: ignore[arg-type]
            problems.append(
                f"network.subnet: must lie within network.ip_range {spec.network.ip_range} "
                f"(got {spec.network.subnet!r})"
            )
    except ValueError:
        problems.append(f"network.subnet: must be a CIDR such as 10.0.1.0/24 (got {spec.network.subnet!r})")
    # firewall
    for field_name, values in (
        ("firewall.ssh_allowed_cidrs", spec.firewall.ssh_allowed_cidrs),
        ("firewall.api_allowed_cidrs", spec.firewall.api_allowed_cidrs),
    ):
        if not values:
            problems.append(
                f"{field_name}: list at least one CIDR allowed in (e.g. your office's 203.0.113.0/24); "
                "nothing is open to the world by default"
            )
        problems += _cidr_problems(field_name, values)
    # nodes
    if spec.control_plane.count not in (1, 3):
        problems.append(
            "control_plane.count: must be 1 or 3 (embedded etcd needs an odd quorum; "
            f"got {spec.control_plane.count})"
        )
    if not spec.control_plane.server_type:
        problems.append("control_plane.server_type: required (e.g. cx22)")
    seen: set[str] = set()
    for i, pool in enumerate(spec.workers):
        where = f"workers[{i}]"
        if not DNS_LABEL.match(pool.name) or len(pool.name) > 15:
            problems.append(
                f"{where}.name: must be lower-case letters, digits and '-', at most 15 characters "
                f"(got {pool.name!r})"
            )
        if pool.name in seen or pool.name == "cp":
            problems.append(f"{where}.name: must be unique and not 'cp' (got {pool.name!r})")
        seen.add(pool.name)
        if not 0 <= pool.count <= 50:
            problems.append(f"{where}.count: must be between 0 and 50 (got {pool.count})")
        if not pool.server_type:
            problems.append(f"{where}.server_type: required (e.g. cx32)")
    if spec.load_balancer.type not in LB_TYPES:
        problems.append(
            f"load_balancer.type: must be one of {', '.join(LB_TYPES)} (got {spec.load_balancer.type!r})"
        )
    # ssh keys
    keys: dict[str, str] = {}
    if not spec.ssh_keys:
        problems.append("ssh_keys: list at least one key (servers get no root password)")
    for i, key in enumerate(spec.ssh_keys):
        where = f"ssh_keys[{i}]"
        if (key.public_key is None) == (key.public_key_file is None):
            problems.append(f"{where}: give exactly one of public_key and public_key_file")
            continue
        text = key.public_key
        if key.public_key_file is not None:
            path = Path(key.public_key_file).expanduser()
            path = path if path.is_absolute() else base / path
            try:
                text = path.read_text().strip()
            except OSError as exc:
                problems.append(f"{where}.public_key_file: cannot read {path}: {exc.strerror}")
                continue
        assert text is not None
        parts = text.split()
        if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
            problems.append(f"{where}: not an OpenSSH public key (expected 'ssh-ed25519 AAAA...')")
            continue
        keys[key.name] = text.strip()
    return problems, keys


def parse(text: bytes | str, path: Path) -> InfraConfig:
    try:
        spec = msgspec.yaml.decode(text, type=InfraSpec)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = ""
        if " - at `$." in message:
            message, where = message.rsplit(" - at `$.", 1)
            where = where.rstrip("`")
        elif " - at `$`" in message:
            message = message.rsplit(" - at `$`", 1)[0]
        raise InfraFileError(path, [f"{where or '(top level)'}: {message}"]) from None
    except msgspec.DecodeError as exc:
        raise InfraFileError(path, [f"(file): not valid YAML: {exc}"]) from None
    problems, keys = validate(spec, path.parent)
    values: dict[str, Any] | None = None
    if spec.platform is not None:
        more, values = platform_problems(spec.platform, path.parent)
        problems += more
    if problems:
        raise InfraFileError(path, problems)
    return InfraConfig(spec=spec, path=path, public_keys=keys, platform_values=values)


def load(path: Path) -> InfraConfig:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InfraFileError(path, [f"(file): cannot read: {exc.strerror}"]) from None
    return parse(text, path)


EXAMPLE: Final = """\
# fabrik-infra.yaml: one k3s cluster on Hetzner Cloud (docs/infra.md)
name: fabrik
location: nbg1                    # nbg1 | fsn1 | hel1 | ash
k3s_version: v1.31.4+k3s1         # pinned; never latest/stable
network:
  ip_range: 10.0.0.0/16
  subnet: 10.0.1.0/24
firewall:                         # nothing else is open to the world
  ssh_allowed_cidrs: [203.0.113.0/24]
  api_allowed_cidrs: [203.0.113.0/24]
control_plane:
  server_type: cx22
  count: 1                        # 1 or 3
workers:
  - name: general
    server_type: cx32
    count: 2
ssh_keys:
  - name: ops
    public_key_file: ~/.ssh/id_ed25519.pub
load_balancer:
  type: lb11
platform:                         # installed by the first control plane once k3s is up (omit: do it yourself)
  image_registry: registry.example.com/fabrik   # where the fabrik-* images are
  # chart: oci://ghcr.io/fabrik-sh/charts/fabrik  # the packaged umbrella chart (the default)
  # version: 0.1.0                # default: this CLI's Fabrik version
  values_files: [charts/fabrik/values-production.yaml]   # relative to this file, merged in order
  values: {}                      # merged last, e.g. {gateway: {replicaCount: 2}}
"""
