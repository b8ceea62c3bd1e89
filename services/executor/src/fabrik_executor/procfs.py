"""Process facts the local backend needs: is this pid still *our* process, and who is in a group.

Standard library only: the shim imports it too. A pid alone is not an identity (pids are reused),
so every process the executor records is recorded with its start time, read from
`/proc/<pid>/stat` (field 22, clock ticks since boot) on Linux, or from `ps -o lstart=` elsewhere.
A zombie counts as gone: it has exited, only its parent has not collected its status yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state, field 3)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    _, _, rest = text.rpartition(")")
    return rest.split()


def start_time(pid: int) -> str | None:
    """An opaque token that identifies the process `pid` (None when there is no such process)."""
    if PROC.is_dir():
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        return fields[19]
    try:
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text or None


def is_alive(pid: int | None, expected_start_time: str | None) -> bool:
    """True while `pid` runs and is the process that was recorded (same start time)."""
    if not pid or pid <= 0:
        return False
    current = start_time(pid)
    if current is None:
        if PROC.is_dir():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return expected_start_time is None
    return expected_start_time is None or current == expected_start_time


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group `pgid` (Linux; elsewhere via `ps`)."""
    members: list[int] = []
    if PROC.is_dir():
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(int(entry.name))
            if fields is None or len(fields) < 3 or fields[0] in ("Z", "X"):
                continue
            if fields[2] == str(pgid):
                members.append(int(entry.name))
        return members
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,pgid=,stat="], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return members
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == str(pgid) and not parts[2].startswith("Z"):
            members.append(int(parts[0]))
    return members


def maxrss_bytes(ru_maxrss: int) -> int:
    """`ru_maxrss` is KiB on Linux and bytes on macOS."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024
