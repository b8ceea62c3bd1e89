"""Provider key pools: one file per pool in a directory (a mounted Secret), one key per line.

Files are polled (size, mtime, inode: no inotify needed, and Kubernetes' atomic `..data`
symlink swap is seen as a change of the file the link points to); a changed pool replaces its
keys on the next request, so keys rotate without a restart. Keys are only ever shown as their
fingerprint (the first 12 hex digits of their SHA-256).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class ProviderKey:
    pool: str
    secret: str = field(repr=False)
    fingerprint: str

    @property
    def ident(self) -> str:
        return f"{self.pool}:{self.fingerprint}"


@dataclass
class KeyPool:
    name: str
    keys: tuple[ProviderKey, ...]
    _cursor: int = 0

    def rotation(self) -> list[ProviderKey]:
        """All keys, starting after the one handed out last (round robin)."""
        n = len(self.keys)
        if n == 0:
            return []
        start = self._cursor % n
        self._cursor = start + 1
        return [self.keys[(start + i) % n] for i in range(n)]


def parse_keys(pool: str, text: str) -> tuple[ProviderKey, ...]:
    keys: list[ProviderKey] = []
    seen: set[str] = set()
    for line in text.splitlines():
        secret = line.strip()
        if not secret or secret.startswith("#") or secret in seen:
            continue
        seen.add(secret)
        keys.append(ProviderKey(pool, secret, fingerprint(secret)))
    return tuple(keys)


class KeyPools:
    def __init__(
        self, directory: str | Path | None, static: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.directory = Path(directory) if directory else None
        self._static = {
            name: KeyPool(name, parse_keys(name, "\n".join(keys))) for name, keys in (static or {}).items()
        }
        self._pools: dict[str, KeyPool] = {}
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self.reload()

    def get(self, name: str) -> KeyPool | None:
        return self._static.get(name) or self._pools.get(name)

    def names(self) -> list[str]:
        return sorted({*self._static, *self._pools})

    def reload(self) -> bool:
        """Re-read changed, new and removed pool files. True when anything changed."""
        if self.directory is None:
            return False
        current: dict[str, tuple[int, int, int]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning(
                "key pool directory unreadable", extra={"dir": str(self.directory), "error": str(exc)}
            )
            return False
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = os.stat(entry.path)  # follows the Secret's symlinks
            except OSError:
                continue
            if not os.path.isfile(entry.path):
                continue
            current[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        changed = False
        for name, stamp in current.items():
            if self._stamps.get(name) == stamp:
                continue
            try:
                text = Path(self.directory, name).read_text()
            except OSError as exc:
                log.warning("key pool unreadable", extra={"pool": name, "error": str(exc)})
                continue
            keys = parse_keys(name, text)
            old = self._pools.get(name)
            self._pools[name] = KeyPool(name, keys)
            self._stamps[name] = stamp
            changed = True
            log.info(
                "key pool loaded" if old is None else "key pool changed",
                extra={"pool": name, "keys": len(keys), "fingerprints": [k.fingerprint for k in keys]},
            )
        for name in set(self._pools) - set(current):
            del self._pools[name]
            self._stamps.pop(name, None)
            changed = True
            log.info("key pool removed", extra={"pool": name})
        return changed
