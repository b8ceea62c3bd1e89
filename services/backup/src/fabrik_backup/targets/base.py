"""Where archives are stored: a flat namespace of named parts."""

from __future__ import annotations

from typing import Protocol


class TargetError(RuntimeError):
    pass


class PartNotFoundError(TargetError):
    pass


class Target(Protocol):
    """Named parts (`<backup_id>/...`). `put` replaces a part atomically: a reader sees the old
    part, or the whole new one, never a torn write. A backup's manifest is put last, which commits
    the archive."""

    url: str

    async def put(self, name: str, data: bytes) -> None: ...

    async def get(self, name: str) -> bytes:
        """The part's bytes; `PartNotFoundError` when there is none."""
        ...

    async def list(self, prefix: str = "") -> list[str]:
        """Names of parts starting with `prefix`, sorted."""
        ...

    async def delete(self, name: str) -> None:
        """Remove a part (nothing happens when it is already gone)."""
        ...

    async def close(self) -> None: ...
