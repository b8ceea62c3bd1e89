"""Disaster-recovery rehearsal on the local stack (docs/disaster-recovery.md), timed step by step.

1. start the stack (`fabrik up`, a FABRIK_HOME in a temporary directory, a free port base), with
   a project `held` whose quota is 0 runs (its runs stay queued) and backups to a `dir://` target
   outside FABRIK_HOME;
2. populate: runs that finish, a run that stays queued, a budget, a paused cron schedule;
3. back up (`fabrik backup create --wait`) and verify (`fabrik backup verify --wait`);
4. the disaster: stop everything (`fabrik down`) and delete the NATS data;
5. recovery NATS: an empty nats-server on the same store directory, with only the backup service
   and the gateway (no other service writes while the restore runs);
6. restore the latest verified backup (`fabrik backup restore ID --replace OPS --wait`);
7. start the whole stack again (`fabrik up`);
8. check: finished runs still finished, the queued run still queued, the budget and the schedule
   are there, and a new run goes through.

Each step's wall time is printed as a table (and written as JSON with `--report FILE`). Exits 1
when a check fails. `--quick` submits one finished run instead of three (what the test runs).

    uv run python scripts/dr_rehearsal.py [--quick] [--keep] [--report FILE] [--port-base N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from fabrik_cli.local import SERVICES, PortPlan, plan_ports
from fabrik_common.envs import KEY_FILE_VARIABLE, local_key_file
from fabrik_common.natsserver import NatsServer

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello"
READY_TIMEOUT = 120.0


class RehearsalError(Exception):
    pass


@dataclass
class Step:
    name: str
    seconds: float
    note: str = ""


@dataclass
class Rehearsal:
    home: Path
    backups: Path
    port_base: int
    quick: bool = False
    steps: list[Step] = field(default_factory=list)
    stack: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    # -- plumbing ------------------------------------------------------------------------------

    @functools.cached_property
    def ports(self) -> PortPlan:
        return plan_ports(port_base=self.port_base)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports.services['gateway']}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports.nats}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIK_")}
        env.update(
            FABRIK_HOME=str(self.home),
            FABRIK_API_URL=self.api,
            FABRIK_BACKUP_TARGET=f"dir://{self.backups}",
            FABRIK_PROJECT_LIMITS=json.dumps({"held": {"runs": 0}}),
            FABRIK_LOG_FORMAT="text",
        )
        return env

    def fabrik(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "fabrik_cli", *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RehearsalError(f"fabrik {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def fabrik_json(self, *args: str) -> Any:
        return json.loads(self.fabrik(*args, "-o", "json").stdout)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        record = Step(name, 0.0)
        print(f"--- {name}", flush=True)
        started = time.monotonic()
        yield record
        record.seconds = time.monotonic() - started
        self.steps.append(record)
        print(f"    {record.seconds:.1f} s {record.note}", flush=True)

    def wait_ready(self, urls: list[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(urls)
        with httpx.Client(timeout=2) as http:
            while pending:
                url = pending[0]
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(url).status_code == 200:
                        pending.pop(0)
                        continue
                if time.monotonic() > deadline:
                    raise RehearsalError(f"{url} not ready within {READY_TIMEOUT:g} s")
                time.sleep(0.2)

    def service_ready_urls(self, names: list[str] | None = None) -> list[str]:
        return [
            f"http://127.0.0.1:{port}/readyz"
            for name, port in self.ports.services.items()
            if names is None or name in names
        ]

    def up(self) -> None:
        log = (self.home.parent / "stack.log").open("ab")
        self.stack = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fabrik_cli",
                "up",
                "--data-dir",
                str(self.home),
                "--port-base",
                str(self.port_base),
            ],
            env=self.env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(self.service_ready_urls())

    def down(self) -> None:
        if self.stack is None:
            return
        self.fabrik("down", "--data-dir", str(self.home))
        try:
            self.stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.stack.pid, signal.SIGKILL)
            self.stack.wait(10)
        self.stack = None

    def start_service(self, module: str, name: str) -> None:
        env = self.env()
        env.update(
            FABRIK_NATS_URL=self.nats_url,
            FABRIK_HTTP_HOST="127.0.0.1",
            FABRIK_HTTP_PORT=str(self.ports.services[name]),
            FABRIK_INSTANCE_ID=f"recovery-{name}",
            FABRIK_DATA_DIR=str(self.home),
            FABRIK_ANONYMOUS_ROLE="admin",
        )
        env[KEY_FILE_VARIABLE] = str(local_key_file(self.home))
        log = (self.home.parent / f"recovery-{name}.log").open("ab")
        self.extra.append(
            subprocess.Popen(
                [sys.executable, "-m", module],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    def stop_extra(self) -> None:
        for proc in reversed(self.extra):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.extra):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.extra.clear()

    def runs(self) -> dict[str, dict[str, Any]]:
        with httpx.Client(base_url=self.api, timeout=10) as http:
            response = http.get("/api/v1/runs", params={"limit": 100})
            response.raise_for_status()
            return {r["run_id"]: r for r in response.json()["items"]}

    @staticmethod
    def took(op: dict[str, Any]) -> str:
        """The operation's own duration (started to finished, as the backup service recorded it)."""
        started, ended = op.get("started_at"), op.get("finished_at")
        if not started or not ended:
            return "operation ?"
        seconds = (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()
        return f"operation {seconds:.1f} s"

    def check(self, ok: bool, what: str) -> None:
        print(f"    {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            raise RehearsalError(f"check failed: {what}")

    # -- the rehearsal -------------------------------------------------------------------------

    def submit(self, project: str, *, wait: bool) -> str:
        args = ["run", "-p", project, "--spec", str(HELLO / "spec.json"), "--repo", str(HELLO)]
        if wait:
            args.append("--wait")
        result = self.fabrik(*args, "--", "python", "workload.py", timeout=180)
        return result.stdout.strip().splitlines()[0].split()[0]

    def run(self) -> None:
        with self.step("start the stack (fabrik up)"):
            self.up()
        with self.step("populate: runs, a queued run, a budget, a schedule") as s:
            finished = [self.submit("demo", wait=True) for _ in range(1 if self.quick else 3)]
            queued = self.submit("held", wait=False)
            self.fabrik("budget", "set", "--project", "demo", "--llm", "25")
            spec = ["--spec", str(HELLO / "spec.json"), "--repo", str(HELLO), "--", "python", "workload.py"]
            self.fabrik(
                "schedule", "create", "--name", "nightly", "-p", "demo", "--cron", "0 4 * * *", "--paused",
                *spec,
            )  # fmt: skip
            runs = self.runs()
            self.check(
                all(runs[r]["state"] == "succeeded" for r in finished), f"{len(finished)} run(s) succeeded"
            )
            self.check(runs[queued]["state"] == "queued", f"run {queued} of project held is queued")
            self.facts.update(finished=finished, queued=queued)
            s.note = f"{len(finished)} finished run(s), 1 queued"
        with self.step("back up (fabrik backup create --wait)") as s:
            op = self.fabrik_json("backup", "create", "--wait")
            self.facts["backup_id"] = op["backup_id"]
            result = op["result"]
            s.note = f"{self.took(op)}; {result['messages']} messages, {result['stored_bytes']} bytes stored"
        with self.step("verify (fabrik backup verify --wait)") as s:
            s.note = self.took(self.fabrik_json("backup", "verify", self.facts["backup_id"], "--wait"))
        with self.step("disaster: stop everything, delete the NATS data"):
            self.down()
            shutil.rmtree(self.home / "nats")
        with self.step("recovery: empty NATS, backup service and gateway only"):
            nats = NatsServer(
                self.home / "nats",
                port=self.ports.nats,
                monitor_port=self.ports.nats_monitor,
                server_name="fabrik-local",
                log_file=self.home.parent / "recovery-nats.log",
            )
            nats.start()
            self.start_service("fabrik_backup", "backup")
            self.start_service("fabrik_gateway", "gateway")
            self.wait_ready(self.service_ready_urls(["backup", "gateway"]))
        try:
            with self.step("verify the latest backup again (fabrik backup verify --wait)") as s:
                # Verification records lived in the lost server's `backups` bucket: verify again.
                listing = self.fabrik_json("backup", "list")
                complete = [b for b in listing["backups"] if b["complete"]]
                self.check(bool(complete), "the backup is listed from the target")
                latest = complete[-1]["backup_id"]
                self.check(latest == self.facts["backup_id"], f"the latest backup is {latest}")
                s.note = f"{self.took(self.fabrik_json('backup', 'verify', latest, '--wait'))}; {latest}"
            with self.step("restore it (fabrik backup restore --replace OPS --wait)") as s:
                op = self.fabrik_json("backup", "restore", latest, "--replace", "OPS", "--wait")
                streams = op["result"]["streams"]
                messages = sum(x["messages"] for x in streams)
                s.note = f"{self.took(op)}; {len(streams)} streams, {messages} messages"
        finally:
            self.stop_extra()
            nats.stop()
        with self.step("start the stack again (fabrik up)"):
            self.up()
        with self.step("check: runs, queue, budget, schedule; a new run goes through"):
            runs = self.runs()
            finished, queued = self.facts["finished"], self.facts["queued"]
            self.check(
                all(runs[r]["state"] == "succeeded" for r in finished), "finished runs still succeeded"
            )
            self.check(runs[queued]["state"] == "queued", f"run {queued} still queued")
            budgets = self.fabrik_json("budget", "status", "--project", "demo")["budgets"]
            limits = [b["llm"]["limit_usd"] for b in budgets if b.get("project") == "demo"]
            self.check(limits == [25], "the budget of demo (LLM $25) is there")
            schedules = self.fabrik_json("schedule", "list")
            items = schedules["items"] if isinstance(schedules, dict) else schedules
            self.check([x["name"] for x in items] == ["nightly"], "the schedule nightly is there")
            new = self.submit("demo", wait=True)
            self.check(self.runs()[new]["state"] == "succeeded", f"a new run {new} succeeded")

    def report(self) -> str:
        lines = ["| step | seconds | |", "|---|---:|---|"]
        lines += [f"| {s.name} | {s.seconds:.1f} | {s.note} |" for s in self.steps]
        lines.append(f"| **total** | **{sum(s.seconds for s in self.steps):.1f}** | |")
        return "\n".join(lines)


def free_port_base() -> int:
    for base in range(20000, 40000, 100):
        ports = plan_ports(port_base=base)
        wanted = [ports.nats, *ports.services.values()]
        if all(_free(p) for p in wanted):
            return base
    raise RehearsalError("no free port base found")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one finished run instead of three")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--report", type=Path, default=None, help="write the step times as JSON")
    parser.add_argument("--port-base", type=int, default=None, help="default: the first free one from 20000")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fabrik-dr-"))
    rehearsal = Rehearsal(
        home=workdir / "home",
        backups=workdir / "backups",
        port_base=args.port_base if args.port_base is not None else free_port_base(),
        quick=args.quick,
    )
    rehearsal.home.mkdir()
    print(f"rehearsal in {workdir}, port base {rehearsal.port_base}, {len(SERVICES)} services", flush=True)
    code = 0
    try:
        rehearsal.run()
    except RehearsalError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        code = 1
    finally:
        rehearsal.stop_extra()
        with contextlib.suppress(RehearsalError, subprocess.TimeoutExpired):
            rehearsal.down()
        print(rehearsal.report())
        if args.report is not None:
            args.report.write_text(
                json.dumps(
                    {
                        "ok": code == 0,
                        "steps": [
                            {"name": s.name, "seconds": round(s.seconds, 2), "note": s.note}
                            for s in rehearsal.steps
                        ],
                    },
                    indent=2,
                )
            )
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
