"""The local stack behind `fabrik up` / `fabrik down` / `fabrik status`.

Plain classes, no click: an embedded NATS JetStream server plus the six services as child
processes, supervised in the foreground. Everything lives under one data directory:

    <data>/nats/          JetStream store
    <data>/logs/<c>.log   one log per component (nats, gateway, llm-proxy, ...)
    <data>/stack.json     state of the running stack (supervisor pid, ports, service pids)
    <data>/stack.lock     held (flock) by the supervisor for as long as it runs

The lock, not the pid in the state file, decides whether a stack is running: it is released by
the kernel when the supervisor exits for any reason, so a crashed `fabrik up` never blocks the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

from fabrik_backup.settings import BackupSettings
from fabrik_common.envs import KEY_FILE_VARIABLE, EnvKeyError, ensure_key_file, key_configured, local_key_file
from fabrik_common.natsserver import NatsServer, NatsServerError, free_port, port_is_free
from fabrik_common.runkeys import generate_run_key_secret
from fabrik_common.settings import CommonSettings
from fabrik_executor.settings import ExecutorSettings
from fabrik_gateway.settings import GatewaySettings
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_scheduler.settings import SchedulerSettings

STATE_VERSION = 1
LOCAL_HOST = "127.0.0.1"
NATS_DEFAULT_PORT = 4222
DEFAULT_READY_TIMEOUT = 60.0
DEFAULT_STOP_GRACE = 20.0
LOG_ROTATE_BYTES = 20 * 1024 * 1024
LOG_TAIL_LINES = 25


class StackError(RuntimeError):
    """A problem an operator has to act on; the message says what and how."""


# --------------------------------------------------------------------------------------------
# What runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the stack: its name, its module (`python -m <module>`) and its settings."""

    name: str
    module: str
    settings: type[CommonSettings]
    role: str

    @property
    def default_port(self) -> int:
        """The service's own default `http_port` (from its settings struct, the single source)."""
        return self.settings().http_port


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("gateway", "fabrik_gateway", GatewaySettings, "API and dashboard"),
    ServiceSpec("llm-proxy", "fabrik_llm_proxy", LlmProxySettings, "LLM endpoints for runs"),
    ServiceSpec("scheduler", "fabrik_scheduler", SchedulerSettings, "run state machine, queues"),
    ServiceSpec("executor", "fabrik_executor", ExecutorSettings, "workloads (local backend)"),
    ServiceSpec("optimizer", "fabrik_optimizer", OptimizerSettings, "analytics, cost, experiments"),
    ServiceSpec("backup", "fabrik_backup", BackupSettings, "snapshots and restore"),
)
SERVICE_NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)


def run_key_secret_file(data_dir: Path) -> Path:
    return data_dir / "secrets" / "run-key"


def service_spec(name: str) -> ServiceSpec:
    """A service by name; `llm_proxy` and `fabrik_llm_proxy` are accepted for `llm-proxy`."""
    wanted = name.strip().lower().removeprefix("fabrik_").replace("_", "-")
    for spec in SERVICES:
        if spec.name == wanted:
            return spec
    raise StackError(f"unknown service {name!r}; the services are: {', '.join(SERVICE_NAMES)}")


# --------------------------------------------------------------------------------------------
# Where it lives
# --------------------------------------------------------------------------------------------


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$FABRIK_HOME, else $XDG_DATA_HOME/fabrik, else ~/.local/share/fabrik."""
    env = os.environ if environ is None else environ
    if env.get("FABRIK_HOME"):
        return Path(env["FABRIK_HOME"]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "fabrik"
    home = Path(env["HOME"]).expanduser() if env.get("HOME") else Path.home()
    return home / ".local" / "share" / "fabrik"


@dataclass(frozen=True)
class StackPaths:
    data_dir: Path

    @property
    def nats_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "stack.lock"

    def log_for(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortClaim:
    """A port one component wants, and the option that changes it (for error messages)."""

    component: str
    port: int
    how_to_change: str


@dataclass(frozen=True)
class PortPlan:
    nats: int
    nats_monitor: int
    services: Mapping[str, int]

    def claims(self) -> list[PortClaim]:
        shift = "or shift every port with --port-base N"
        claims = [
            PortClaim("NATS", self.nats, f"change it with --nats-port PORT, {shift}"),
            PortClaim("NATS monitoring", self.nats_monitor, "change it with --nats-monitor-port PORT"),
        ]
        for spec in SERVICES:
            option = "--port PORT" if spec.name == "gateway" else f"--service-port {spec.name}=PORT"
            claims.append(PortClaim(spec.name, self.services[spec.name], f"change it with {option}, {shift}"))
        return claims


def _check_range(port: int, what: str) -> int:
    if not 1 <= port <= 65535:
        raise StackError(f"port {port} for {what} is outside 1-65535")
    return port


def plan_ports(
    *,
    gateway_port: int | None = None,
    nats_port: int | None = None,
    nats_monitor_port: int | None = None,
    port_base: int = 0,
    service_ports: Mapping[str, int] | None = None,
    host: str = LOCAL_HOST,
) -> PortPlan:
    """Every port of the stack: defaults shifted by `port_base`, then explicit choices.

    The NATS monitoring port is a free one unless given. Two components never share a port.
    """
    explicit: dict[str, int] = {}
    for name, port in (service_ports or {}).items():
        explicit[service_spec(name).name] = port
    if gateway_port is not None:
        if "gateway" in explicit and explicit["gateway"] != gateway_port:
            raise StackError("the gateway port is given twice (--port and --service-port gateway=)")
        explicit["gateway"] = gateway_port
    services = {
        spec.name: _check_range(explicit.get(spec.name, spec.default_port + port_base), spec.name)
        for spec in SERVICES
    }
    nats = _check_range(NATS_DEFAULT_PORT + port_base if nats_port is None else nats_port, "NATS")
    taken = {nats, *services.values()}
    if nats_monitor_port:
        monitor = _check_range(nats_monitor_port, "NATS monitoring")
    else:
        monitor = free_port(host)
        while monitor in taken:
            monitor = free_port(host)
    plan = PortPlan(nats=nats, nats_monitor=monitor, services=services)
    seen: dict[int, str] = {}
    for claim in plan.claims():
        if claim.port in seen:
            raise StackError(
                f"port {claim.port} is wanted by both {seen[claim.port]} and {claim.component}; "
                f"{claim.how_to_change}"
            )
        seen[claim.port] = claim.component
    return plan


def check_ports_free(plan: PortPlan, host: str = LOCAL_HOST) -> None:
    """Fail, naming every busy port, its component and how to change it."""
    busy = [claim for claim in plan.claims() if not port_is_free(claim.port, host)]
    if not busy:
        return
    lines = [
        f"port {c.port} on {host} is already in use (wanted by {c.component}); {c.how_to_change}"
        for c in busy
    ]
    raise StackError("cannot start the local stack:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------------------------
# State file
# --------------------------------------------------------------------------------------------


StackStatus = Literal["starting", "running", "stopping"]


@dataclass
class ComponentState:
    name: str
    port: int
    pid: int | None
    url: str
    health_url: str
    log: str
    restarts: int = 0


@dataclass
class StackState:
    """What `<data>/stack.json` holds: written by `fabrik up`, read by `down` and `status`."""

    pid: int
    data_dir: str
    started_at: str
    status: StackStatus
    nats: ComponentState
    services: dict[str, ComponentState]
    nats_monitor_port: int
    log_dir: str
    version: int = STATE_VERSION

    def components(self) -> list[ComponentState]:
        return [self.nats, *self.services.values()]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackState:
        raw: dict[str, Any] = json.loads(text)
        raw["nats"] = ComponentState(**raw["nats"])
        raw["services"] = {k: ComponentState(**v) for k, v in raw["services"].items()}
        return cls(**raw)


def write_state(path: Path, state: StackState) -> None:
    """Atomically: a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    tmp.replace(path)


def read_state(path: Path) -> StackState | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return StackState.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise StackError(
            f"the state file {path} is unreadable ({exc}); if no stack is running, remove it"
        ) from exc


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError, IndexError):
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return True
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip().startswith("Z")


def command_line(pid: int) -> str | None:
    """The command line of a live process (None if gone or unreadable)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.exists():
        try:
            return cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return None
    out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _looks_like(component: ComponentState, state: StackState) -> bool:
    """Whether the recorded pid still runs that component of that stack (not a reused pid)."""
    if component.pid is None or not pid_alive(component.pid):
        return False
    cmd = command_line(component.pid) or ""
    if component is state.nats:
        return "nats-server" in cmd and str(Path(state.data_dir) / "nats") in cmd
    return f"-m {service_spec(component.name).module}" in cmd


def leftover_components(state: StackState) -> list[ComponentState]:
    """Components of a stack whose supervisor is gone but which still run."""
    return [c for c in state.components() if _looks_like(c, state)]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError:
        return "(no log)"
    text = data.decode(errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(log is empty)"


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def readiness(url: str, timeout: float = 1.0) -> tuple[bool, str]:
    """(ready, description) of a /readyz or NATS /healthz endpoint."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            return int(response.status) == 200, "ready"
    except urllib.error.HTTPError as exc:
        detail = ""
        with contextlib.suppress(Exception):
            body = json.loads(exc.read())
            failing = [k for k, ok in body.get("checks", {}).items() if not ok]
            if failing:
                detail = f" (failing: {', '.join(failing)})"
        return False, f"not ready: HTTP {exc.code}{detail}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason: Any = getattr(exc, "reason", exc)
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        return False, f"down ({text})"


class _Lock:
    """An exclusive, non-blocking flock on the stack's lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def stack_running(paths: StackPaths) -> bool:
    """True while a `fabrik up` supervisor holds this data directory."""
    if not paths.lock_file.exists():
        return False
    lock = _Lock(paths.lock_file)
    if lock.acquire():
        lock.release()
        return False
    return True


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


class Console(Protocol):
    def info(self, message: str) -> None: ...

    def error(self, message: str) -> None: ...


class StdConsole:
    """stdout for progress and the summary, stderr for problems; a closed terminal is no crash."""

    def info(self, message: str) -> None:
        with contextlib.suppress(OSError):
            print(message, flush=True)

    def error(self, message: str) -> None:
        with contextlib.suppress(OSError):
            print(message, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


# --------------------------------------------------------------------------------------------
# The supervisor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path
    ports: PortPlan
    host: str = LOCAL_HOST
    python: str = sys.executable
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    stop_grace: float = DEFAULT_STOP_GRACE
    restart_backoff_initial: float = 1.0
    restart_backoff_max: float = 30.0
    # A service that stayed up this long is healthy again: its next crash restarts after 1 s again.
    restart_backoff_reset_after: float = 60.0
    poll_interval: float = 0.2
    extra_env: Mapping[str, str] = field(default_factory=dict)


class ManagedService:
    """One service child process, restarted by the supervisor when it dies."""

    def __init__(self, spec: ServiceSpec, config: StackConfig, paths: StackPaths) -> None:
        self.spec = spec
        self.config = config
        self.port = config.ports.services[spec.name]
        self.log_path = paths.log_for(spec.name)
        self.data_dir = paths.data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.restarts = 0
        self.started_at = 0.0
        self.backoff = config.restart_backoff_initial
        self.restart_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/readyz"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def env(self, nats_url: str) -> dict[str, str]:
        env = {**os.environ, **self.config.extra_env}
        if not env.get("FABRIK_RUN_KEY_SECRET"):
            env.setdefault("FABRIK_RUN_KEY_SECRET_FILE", str(run_key_secret_file(self.data_dir)))
        # Runs reach the llm-proxy of this stack, wherever its port is.
        proxy_port = self.config.ports.services.get("llm-proxy")
        if proxy_port is not None:
            env.setdefault("FABRIK_LLM_PROXY_URL", f"http://{self.config.host}:{proxy_port}")
        env.update(
            FABRIK_NATS_URL=nats_url,
            FABRIK_HTTP_HOST=self.config.host,
            FABRIK_HTTP_PORT=str(self.port),
            FABRIK_INSTANCE_ID=f"local-{self.spec.name}",
            # The stack's data directory is the services' too (the executor keeps workspaces
            # under <data>/executor): two stacks on two data directories never share state.
            FABRIK_DATA_DIR=str(self.config.data_dir),
            PYTHONUNBUFFERED="1",
        )
        # A service drains in-flight work for its shutdown grace, then closes its connections:
        # keep that inside the supervisor's grace so a clean stop is not cut short by SIGKILL.
        env.setdefault("FABRIK_SHUTDOWN_GRACE_SECONDS", f"{max(0.5, self.config.stop_grace * 0.75):g}")
        # ... and ends (dumping its stacks) before the supervisor kills it, should the shutdown hang
        env.setdefault("FABRIK_SHUTDOWN_DEADLINE_SECONDS", f"{max(1.0, self.config.stop_grace * 0.95):g}")
        # Project environments are encrypted with the stack's own key unless one is configured
        # (docs/environments.md); anonymous callers are admin on a stack bound to 127.0.0.1 (the
        # gateway logs a warning saying so).
        if not key_configured(env):
            env[KEY_FILE_VARIABLE] = str(local_key_file(self.config.data_dir))
        env.setdefault("FABRIK_ANONYMOUS_ROLE", "admin")
        return env

    def start(self, nats_url: str) -> None:
        with self.log_path.open("ab") as log:
            # Own session: a Ctrl-C in the terminal reaches the supervisor only, which then stops
            # the services in order instead of racing them.
            self.proc = subprocess.Popen(
                [self.config.python, "-m", self.spec.module],
                env=self.env(nats_url),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ready = False
        self.started_at = time.monotonic()
        self.restart_at = None

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def probe(self) -> bool:
        return http_ok(self.ready_url, timeout=1.0)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def state(self) -> ComponentState:
        return ComponentState(
            name=self.spec.name,
            port=self.port,
            pid=self.pid if self.alive else None,
            url=self.url,
            health_url=self.ready_url,
            log=str(self.log_path),
            restarts=self.restarts,
        )


class LocalStack:
    """`fabrik up`: start NATS and the services, wait until ready, supervise, stop cleanly."""

    def __init__(self, config: StackConfig, console: Console | None = None) -> None:
        self.config = config
        self.paths = StackPaths(config.data_dir)
        self.console: Console = console or StdConsole()
        self.nats = NatsServer(
            self.paths.nats_dir,
            host=config.host,
            port=config.ports.nats,
            monitor_port=config.ports.nats_monitor,
            server_name="fabrik-local",
            log_file=self.paths.log_for("nats"),
        )
        self.services = [ManagedService(spec, config, self.paths) for spec in SERVICES]
        self.started_at = _now()
        self.status: StackStatus = "starting"
        self._lock = _Lock(self.paths.lock_file)
        self._stop_requested = False
        self._stop_requested_at = 0.0
        self._force = False
        self._stop_signal: str | None = None
        self._nats_restarts = 0
        self._nats_backoff = config.restart_backoff_initial
        self._nats_restart_at: float | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}

    # -- signals ---------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """First call: stop cleanly. A later one (not the same keypress relayed twice): force."""
        now = time.monotonic()
        if self._stop_requested:
            if now - self._stop_requested_at > 0.5:
                self._force = True
            return
        self._stop_requested = True
        self._stop_requested_at = now
        self._stop_signal = reason

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(signal.Signals(signum).name)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)

    # -- the whole lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped. Returns the exit code; raises StackError when it cannot start."""
        try:
            self.paths.data_dir.mkdir(parents=True, exist_ok=True)
            self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StackError(
                f"cannot use the data directory {self.paths.data_dir}: {exc}; choose another with "
                "--data-dir or $FABRIK_HOME"
            ) from exc
        # A concurrent `fabrik status` probes the same lock for an instant: retry briefly.
        for attempt in range(10):
            if self._lock.acquire():
                break
            if attempt == 9:
                raise StackError(already_running_message(self.paths))
            time.sleep(0.05)
        try:
            self._check_stale_state()
            check_ports_free(self.config.ports, self.config.host)
            with self._signals():
                return self._run_locked()
        finally:
            self._lock.release()

    def _check_stale_state(self) -> None:
        state = read_state(self.paths.state_file)
        if state is None:
            return
        leftovers = leftover_components(state)
        if leftovers:
            listed = ", ".join(f"{c.name} (pid {c.pid})" for c in leftovers)
            raise StackError(
                f"a previous stack on {self.paths.data_dir} (supervisor pid {state.pid}) did not "
                f"shut down cleanly and some of its processes still run: {listed}. Stop them with "
                f"`fabrik down --data-dir {self.paths.data_dir}`"
            )
        self.console.error(
            f"note: removing the stale state file of a stack that did not shut down cleanly "
            f"(supervisor pid {state.pid}, started {state.started_at})"
        )
        self.paths.state_file.unlink(missing_ok=True)

    def _run_locked(self) -> int:
        rotate_logs(self.paths)
        self._ensure_env_key()
        self._ensure_run_key_secret()
        self._write_state()
        try:
            self.console.info(f"starting NATS JetStream on {self.nats.url} ...")
            try:
                self.nats.start()
            except NatsServerError as exc:
                raise StackError(
                    f"NATS did not start: {exc}\n--- {self.nats.log_file} (tail) ---\n"
                    f"{log_tail(self.nats.log_file)}"
                ) from exc
            self.console.info(f"starting {len(self.services)} services ...")
            for svc in self.services:
                svc.start(self.nats.url)
            self._write_state()
            if not self._wait_ready():
                return self._shutdown()
            self.status = "running"
            self._write_state()
            self.console.info(self.summary())
            self._supervise()
            return self._shutdown()
        except BaseException:
            self._kill_all()
            raise
        finally:
            self.paths.state_file.unlink(missing_ok=True)

    def _ensure_env_key(self) -> None:
        """The encryption key of project environments, made once per data directory."""
        if key_configured({**os.environ, **self.config.extra_env}):
            return
        path = local_key_file(self.paths.data_dir)
        try:
            if ensure_key_file(path):
                self.console.info(
                    f"created the encryption key of project environments: {path} "
                    "(keep it: the environments stored in NATS cannot be read without it)"
                )
        except (OSError, EnvKeyError) as exc:
            raise StackError(f"cannot create the environments' encryption key {path}: {exc}") from exc

    def _ensure_run_key_secret(self) -> None:
        """The secret that signs run-scoped LLM keys, shared by the executor (which issues them)
        and the llm-proxy (which verifies them); made once per data directory."""
        env = {**os.environ, **self.config.extra_env}
        if env.get("FABRIK_RUN_KEY_SECRET") or env.get("FABRIK_RUN_KEY_SECRET_FILE"):
            return
        path = run_key_secret_file(self.paths.data_dir)
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(generate_run_key_secret() + "\n")
                self.console.info(f"created the secret that signs run-scoped LLM keys: {path}")
        except OSError as exc:
            raise StackError(f"cannot create the run-key secret {path}: {exc}") from exc

    def _wait_ready(self) -> bool:
        """True when every service is ready; False when a stop was asked for meanwhile."""
        t0 = time.monotonic()
        deadline = t0 + self.config.ready_timeout
        pending = list(self.services)
        while pending:
            if self._stop_requested:
                self.console.info(f"{self._stop_signal}: stopping before the stack was ready")
                return False
            for svc in list(pending):
                code = svc.poll()
                if code is not None:
                    self._fail_start(f"{svc.spec.name} {describe_exit(code)} while starting", [svc])
                if svc.probe():
                    pending.remove(svc)
                    svc.ready = True
                    self.console.info(f"  {svc.spec.name} ready ({time.monotonic() - t0:.1f}s)")
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.spec.name for s in pending)
                self._fail_start(
                    f"not ready within {self.config.ready_timeout:g}s: {names} "
                    "(raise the limit with --ready-timeout SECONDS)",
                    pending,
                )
            if pending:
                time.sleep(0.1)
        return True

    def _fail_start(self, reason: str, culprits: Sequence[ManagedService]) -> None:
        parts = [f"the local stack could not start: {reason}"]
        for svc in culprits:
            parts.append(f"--- {svc.log_path} (last {LOG_TAIL_LINES} lines) ---")
            parts.append(log_tail(svc.log_path))
        self.console.error("\n".join(parts))
        self.console.error("stopping everything ...")
        self._stop_all()
        raise StackError(f"the local stack could not start: {reason}")

    # -- supervision -----------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop_requested:
            changed = self._supervise_nats()
            for svc in self.services:
                changed |= self._supervise_service(svc)
            if changed:
                self._write_state()
            time.sleep(self.config.poll_interval)
        self.console.info(f"{self._stop_signal}: stopping the local stack ...")

    def _supervise_nats(self) -> bool:
        if self.nats.running:
            return False
        now = time.monotonic()
        if self._nats_restart_at is None:
            self.console.error(
                f"{_clock()} NATS stopped unexpectedly; restarting in {self._nats_backoff:g}s "
                f"(log: {self.nats.log_file})"
            )
            self._nats_restart_at = now + self._nats_backoff
            self._nats_backoff = min(self._nats_backoff * 2, self.config.restart_backoff_max)
            return True
        if now < self._nats_restart_at:
            return False
        self._nats_restarts += 1
        try:
            self.nats.start()
        except NatsServerError as exc:
            self.console.error(f"{_clock()} NATS restart failed: {exc}")
            self._nats_restart_at = None
            return True
        self._nats_restart_at = None
        self.console.info(f"{_clock()} NATS is back (restart {self._nats_restarts})")
        return True

    def _supervise_service(self, svc: ManagedService) -> bool:
        now = time.monotonic()
        if svc.proc is not None:
            code = svc.poll()
            if code is None:
                if not svc.ready and svc.probe():
                    svc.ready = True
                    self.console.info(f"{_clock()} {svc.spec.name} is ready again")
                if (
                    svc.ready
                    and svc.backoff != self.config.restart_backoff_initial
                    and now - svc.started_at > self.config.restart_backoff_reset_after
                ):
                    svc.backoff = self.config.restart_backoff_initial
                return False
            svc.proc = None
            svc.ready = False
            svc.restart_at = now + svc.backoff
            self.console.error(
                f"{_clock()} {svc.spec.name} {describe_exit(code)}; restarting in {svc.backoff:g}s "
                f"(restart {svc.restarts + 1}; log: {svc.log_path})"
            )
            svc.backoff = min(svc.backoff * 2, self.config.restart_backoff_max)
            return True
        if svc.restart_at is not None and now >= svc.restart_at:
            svc.restarts += 1
            svc.start(self.nats.url)
            self.console.info(f"{_clock()} {svc.spec.name} restarted (pid {svc.pid}, restart {svc.restarts})")
            return True
        return False

    # -- stopping --------------------------------------------------------------------------

    def _stop_all(self) -> list[str]:
        """SIGTERM every service, wait up to the grace period, SIGKILL the rest, stop NATS."""
        self.status = "stopping"
        with contextlib.suppress(OSError):
            self._write_state()
        for svc in self.services:
            svc.restart_at = None
            svc.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_grace
        while any(s.alive for s in self.services):
            if self._force:
                self.console.error("second interrupt: killing the services now")
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        killed = []
        for svc in self.services:
            if svc.alive:
                killed.append(svc.spec.name)
                svc.signal(signal.SIGKILL)
            if svc.proc is not None:
                svc.proc.wait()
        if killed and not self._force:
            self.console.error(
                f"did not stop within {self.config.stop_grace:g}s and were killed: {', '.join(killed)}"
            )
        self.nats.stop()
        return killed

    def _shutdown(self) -> int:
        self._stop_all()
        self.paths.state_file.unlink(missing_ok=True)
        self.console.info("local stack stopped")
        return 0

    def _kill_all(self) -> None:
        """The emergency path (an unexpected error): nothing may be left running."""
        for svc in self.services:
            svc.signal(signal.SIGKILL)
            if svc.proc is not None:
                with contextlib.suppress(Exception):
                    svc.proc.wait(5)
        with contextlib.suppress(Exception):
            self.nats.kill()

    # -- reporting -------------------------------------------------------------------------

    def state(self) -> StackState:
        nats_pid = self.nats.pid if self.nats.running else None
        return StackState(
            pid=os.getpid(),
            data_dir=str(self.paths.data_dir),
            started_at=self.started_at,
            status=self.status,
            nats=ComponentState(
                name="nats",
                port=self.config.ports.nats,
                pid=nats_pid,
                url=self.nats.url,
                health_url=(
                    f"http://{self.config.host}:{self.config.ports.nats_monitor}/healthz?js-enabled-only=true"
                ),
                log=str(self.nats.log_file),
                restarts=self._nats_restarts,
            ),
            services={svc.spec.name: svc.state() for svc in self.services},
            nats_monitor_port=self.config.ports.nats_monitor,
            log_dir=str(self.paths.log_dir),
        )

    def _write_state(self) -> None:
        write_state(self.paths.state_file, self.state())

    def summary(self) -> str:
        gateway = next(s for s in self.services if s.spec.name == "gateway")
        width = max(len(s.spec.name) for s in self.services)
        lines = [
            "",
            "Fabrik local stack is up.",
            "",
            f"  API and dashboard  {gateway.url}",
            f"  NATS               {self.nats.url}  "
            f"(monitoring http://{self.config.host}:{self.config.ports.nats_monitor})",
            "",
            "  services (readiness URL; metrics at /metrics on the same port):",
        ]
        for svc in self.services:
            lines.append(f"    {svc.spec.name:<{width}}  {svc.ready_url:<34}  pid {svc.pid}")
        lines += [
            "",
            f"  data directory     {self.paths.data_dir}",
            f"  logs               {self.paths.log_dir}/<component>.log",
            f"  state file         {self.paths.state_file}",
            "",
        ]
        anonymous_role = gateway.env(self.nats.url).get("FABRIK_ANONYMOUS_ROLE", "none")
        if anonymous_role != "none":
            lines += [
                f"  WARNING: anonymous access has the {anonymous_role} role (FABRIK_ANONYMOUS_ROLE): anyone",
                f"  who reaches {gateway.url} needs no credentials. Fine on 127.0.0.1; never expose it.",
                "",
            ]
        lines += [
            "Services that die are restarted. Press Ctrl-C to stop everything "
            "(or run `fabrik down` elsewhere).",
        ]
        return "\n".join(lines)


def rotate_logs(paths: StackPaths, limit: int = LOG_ROTATE_BYTES) -> None:
    """At start: a log over `limit` bytes becomes `<name>.log.1` (one generation kept)."""
    for log in paths.log_dir.glob("*.log"):
        with contextlib.suppress(OSError):
            if log.stat().st_size > limit:
                log.replace(log.with_name(log.name + ".1"))


def already_running_message(paths: StackPaths) -> str:
    state = None
    with contextlib.suppress(StackError):
        state = read_state(paths.state_file)
    who = f" (supervisor pid {state.pid}, started {state.started_at})" if state else ""
    return (
        f"a local stack is already running on {paths.data_dir}{who}. "
        f"Stop it with `fabrik down --data-dir {paths.data_dir}`, or use another --data-dir"
    )


# --------------------------------------------------------------------------------------------
# down and status
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownResult:
    stopped: bool
    message: str


def _terminate_pids(pids: Sequence[int], grace: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_stack(
    data_dir: Path,
    timeout: float = DEFAULT_STOP_GRACE + 25.0,
    sleep: Callable[[float], None] = time.sleep,
) -> DownResult:
    """`fabrik down`: SIGTERM the supervisor and wait until it has released the data directory.

    A stack whose supervisor is gone (killed) but whose processes still run is cleaned up here.
    Raises StackError when the supervisor does not stop within `timeout`.
    """
    paths = StackPaths(data_dir)
    if not paths.data_dir.exists():
        return DownResult(False, f"no local stack running (data directory {data_dir})")
    running = stack_running(paths)
    state = read_state(paths.state_file)
    if not running:
        if state is None:
            return DownResult(False, f"no local stack running (data directory {data_dir})")
        leftovers = leftover_components(state)
        # Services first, NATS last: the same order as a clean stop.
        for group in ([c for c in leftovers if c is not state.nats], [state.nats]):
            _terminate_pids([c.pid for c in group if c in leftovers and c.pid], DEFAULT_STOP_GRACE)
        paths.state_file.unlink(missing_ok=True)
        if not leftovers:
            return DownResult(
                False,
                f"no local stack running (removed the stale state file of supervisor pid {state.pid})",
            )
        names = ", ".join(f"{c.name} (pid {c.pid})" for c in leftovers)
        return DownResult(
            True,
            f"the stack's supervisor (pid {state.pid}) was gone; stopped its leftover processes: {names}",
        )
    deadline = time.monotonic() + timeout
    while state is None:  # the supervisor has the lock but has not written its state yet
        if time.monotonic() > deadline:
            raise StackError(f"a stack holds {paths.lock_file} but wrote no state file")
        sleep(0.1)
        state = read_state(paths.state_file)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGTERM)
    while stack_running(paths):
        if time.monotonic() > deadline:
            raise StackError(
                f"the local stack (supervisor pid {state.pid}) did not stop within {timeout:g}s; "
                f"see the logs in {paths.log_dir}. To force it: kill -9 {state.pid}, then "
                f"`fabrik down --data-dir {data_dir}` again to stop what is left"
            )
        sleep(0.1)
    names = ", ".join(c.name for c in state.components())
    return DownResult(True, f"stopped the local stack on {data_dir} (pid {state.pid}): {names}")


@dataclass(frozen=True)
class ComponentHealth:
    name: str
    healthy: bool
    detail: str
    url: str
    health_url: str
    pid: int | None
    restarts: int
    log: str


@dataclass(frozen=True)
class StackHealth:
    running: bool
    data_dir: str
    message: str
    state: StackState | None = None
    components: tuple[ComponentHealth, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.running and all(c.healthy for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "healthy": self.healthy,
            "data_dir": self.data_dir,
            "message": self.message,
            "pid": self.state.pid if self.state else None,
            "started_at": self.state.started_at if self.state else None,
            "status": self.state.status if self.state else None,
            "components": [dataclasses.asdict(c) for c in self.components],
        }


def stack_health(data_dir: Path) -> StackHealth:
    """`fabrik status`: the stack from its state file, each component asked for its health."""
    paths = StackPaths(data_dir)
    running = paths.data_dir.exists() and stack_running(paths)
    state = read_state(paths.state_file) if paths.data_dir.exists() else None
    if state is None:
        msg = f"no local stack running (data directory {data_dir})"
        if running:
            msg = f"a local stack is starting on {data_dir} (no state yet)"
        return StackHealth(running, str(data_dir), msg)
    if not running:
        return StackHealth(
            False,
            str(data_dir),
            f"the stack on {data_dir} is not running: its supervisor (pid {state.pid}) is gone and "
            f"the state file is stale; run `fabrik down --data-dir {data_dir}` to clean up",
            state,
        )
    components = []
    for comp in state.components():
        ok, detail = readiness(comp.health_url)
        if comp.pid is None:
            detail = f"restarting; {detail}" if not ok else detail
        components.append(
            ComponentHealth(
                comp.name, ok, detail, comp.url, comp.health_url, comp.pid, comp.restarts, comp.log
            )
        )
    return StackHealth(
        True,
        str(data_dir),
        f"local stack on {data_dir}: {state.status}, supervisor pid {state.pid}, started {state.started_at}",
        state,
        tuple(components),
    )


def format_health(health: StackHealth) -> str:
    if not health.components:
        return health.message
    width = max(len(c.name) for c in health.components)
    lines = [health.message, ""]
    for c in health.components:
        mark = "ok  " if c.healthy else "FAIL"
        restarts = f", {c.restarts} restart(s)" if c.restarts else ""
        pid = c.pid if c.pid is not None else "-"
        lines.append(f"  {mark} {c.name:<{width}}  {c.url:<26}  pid {pid}{restarts}  {c.detail}")
    return "\n".join(lines)
