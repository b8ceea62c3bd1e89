"""A local directory (or a mounted volume) as a target."""

from __future__ import annotations

import asyncio
import builtins
import os
import tempfile
from pathlib import Path

from fabrik_backup.targets.base import PartNotFoundError, TargetError


class DirectoryTarget:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"dir://{root}"

    def _path(self, name: str) -> Path:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise TargetError(f"invalid part name {name!r}")
        return self.root / name

    async def put(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, name, data)

    def _put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, name: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(name).read_bytes)
        except FileNotFoundError as exc:
            raise PartNotFoundError(f"{self.url}: no part {name}") from exc

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[str]:
        if not self.root.exists():
            return []
        names = []
        for dirpath, _dirs, files in os.walk(self.root):
            for file in files:
                if file.startswith(".part-"):
                    continue
                name = os.path.relpath(os.path.join(dirpath, file), self.root).replace(os.sep, "/")
                if name.startswith(prefix):
                    names.append(name)
        return sorted(names)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._path(name).unlink, True)

    async def close(self) -> None:
        return None
