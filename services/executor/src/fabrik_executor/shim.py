"""The supervisor of one local workload: `python -m fabrik_executor.shim <state-dir>`.

The executor starts it detached (double fork, own session), so a workload outlives an executor
crash or restart. Standard library only, so it starts fast and does not depend on the service.

It reads `launch.json` (argv, cwd, env, memory limit) from the attempt's state directory, then:

- starts the workload in its **own process group** (pgid = workload pid), with `RLIMIT_AS` set to
  the memory limit and default signal dispositions; the executor signals that group for cancel
  and timeout, so the shim itself is never hit by them and still records the exit status;
- writes `shim.json` (its pid, the workload pid and their start times) once the workload runs;
- appends each line the workload writes to stdout or stderr to `output.jsonl` as
  `{"ts", "stream", "text"}`, flushed per line;
- when the workload exits, kills what is left of its process group, reaps it (the shim is a child
  subreaper on Linux, so orphaned grandchildren come back to it), and writes `exit.json`
  (`exit_code`, `signal`, `peak_memory_bytes`, `finished_at`, `stderr_tail`, or `error` when the
  workload could not be started) atomically (temporary file, fsync, rename).

The shim ignores SIGTERM, SIGINT and SIGHUP; only SIGKILL ends it, and then the executor finds the
attempt without `exit.json` and reports it lost.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fabrik_executor.procfs import maxrss_bytes, start_time

LAUNCH = "launch.json"
SHIM = "shim.json"
EXIT = "exit.json"
OUTPUT = "output.jsonl"
SHIM_LOG = "shim.log"

MAX_LINE_BYTES = 64 * 1024
STDERR_TAIL = 20
_PR_SET_CHILD_SUBREAPER = 36
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as out:
        json.dump(data, out)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


class OutputWriter:
    """Appends JSON lines to output.jsonl from both reader threads, one whole line at a time."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("ab", buffering=0)
        self._lock = threading.Lock()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)

    def write(self, stream: str, text: str) -> None:
        record = json.dumps({"ts": now_iso(), "stream": stream, "text": text}, ensure_ascii=False)
        with self._lock:
            self._file.write(record.encode() + b"\n")
            if stream == "stderr":
                self.stderr_tail.append(text)

    def close(self) -> None:
        self._file.close()


def _pump(pipe: IO[bytes], stream: str, writer: OutputWriter) -> None:
    """Copy one pipe to output.jsonl until EOF. It never stops reading early: a workload whose pipe
    is not drained would block on its next write. A line that cannot be stored (disk full) is
    dropped."""
    while True:
        try:
            chunk = pipe.readline(MAX_LINE_BYTES)
        except (OSError, ValueError):
            return
        if not chunk:
            return
        text = chunk.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
        try:
            writer.write(stream, text)
        except (OSError, ValueError):
            continue


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _workload_preexec(memory_limit: int | None) -> Any:
    def preexec() -> None:
        for sig in _IGNORED:
            signal.signal(sig, signal.SIG_DFL)
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return preexec


def _reap_stragglers(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


def supervise(state_dir: Path, notify_fd: int | None) -> int:
    """Run the workload described by launch.json to its end; always leave exit.json behind."""

    def notify() -> None:
        nonlocal notify_fd
        if notify_fd is not None:
            with contextlib.suppress(OSError):
                os.close(notify_fd)
            notify_fd = None

    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    _become_subreaper()
    launch = json.loads((state_dir / LAUNCH).read_text())
    argv: list[str] = launch["argv"]
    memory_limit: int | None = launch.get("memory_limit_bytes")
    writer = OutputWriter(state_dir / OUTPUT)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=launch["cwd"],
            env=launch["env"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            preexec_fn=_workload_preexec(memory_limit),  # the shim has no threads yet
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        write_json_atomic(
            state_dir / EXIT,
            {
                "exit_code": None,
                "signal": None,
                "peak_memory_bytes": None,
                "finished_at": now_iso(),
                "error": f"cannot start {argv[0]!r}: {reason}",
                "stderr_tail": [],
            },
        )
        writer.close()
        notify()
        return 0

    write_json_atomic(
        state_dir / SHIM,
        {
            "shim_pid": os.getpid(),
            "shim_start_time": start_time(os.getpid()),
            "workload_pid": proc.pid,
            "workload_start_time": start_time(proc.pid),
            "started_at": now_iso(),
        },
    )
    notify()
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, "stdout", writer), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "stderr", writer), daemon=True),
    ]
    for reader in readers:
        reader.start()

    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # The workload's end is the end of its group: stragglers would hold the pipes open forever.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for reader in readers:
        reader.join(timeout=10)
    _reap_stragglers(1.0)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = maxrss_bytes(max(usage.ru_maxrss, children.ru_maxrss))
    exit_code: int | None
    term_signal: int | None
    if os.WIFSIGNALED(status):
        term_signal = os.WTERMSIG(status)
        exit_code = 128 + term_signal
    else:
        term_signal = None
        exit_code = os.WEXITSTATUS(status)
    writer.close()
    write_json_atomic(
        state_dir / EXIT,
        {
            "exit_code": exit_code,
            "signal": term_signal,
            "peak_memory_bytes": peak,
            "finished_at": now_iso(),
            "error": None,
            "stderr_tail": list(writer.stderr_tail),
        },
    )
    return 0


def _redirect_stdio(log_path: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def main(argv: list[str]) -> int:
    """Double fork: the child (the shim) leaves the executor's session; the parent returns once the
    workload runs (shim.json written) or could not start (exit.json written)."""
    if len(argv) != 1:
        print("usage: python -m fabrik_executor.shim <state-dir>", file=sys.stderr)
        return 2
    state_dir = Path(argv[0]).resolve()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            _redirect_stdio(state_dir / SHIM_LOG)
            code = supervise(state_dir, write_fd)
        except BaseException:  # noqa: BLE001 - whatever happens, leave exit.json behind
            traceback.print_exc()
            with contextlib.suppress(Exception):
                if not (state_dir / EXIT).exists():
                    write_json_atomic(
                        state_dir / EXIT,
                        {
                            "exit_code": None,
                            "signal": None,
                            "peak_memory_bytes": None,
                            "finished_at": now_iso(),
                            "error": "the workload supervisor failed: " + traceback.format_exc(limit=3),
                            "stderr_tail": [],
                        },
                    )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], 60.0)
    if ready:
        os.read(read_fd, 1)
    os.close(read_fd)
    print(json.dumps({"shim_pid": pid}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
