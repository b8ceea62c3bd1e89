"""A NATS object store as a target (the embedded default: backups live beside the data).

This protects against mistakes (a purge, a bad migration) and feeds a restore into another
server; it does not survive the loss of the NATS server itself, which needs a directory or S3
target. The object store's own stream is left out of backups."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from fabrik_backup.targets.base import PartNotFoundError


class NatsObjectStoreTarget:
    def __init__(self, nc: Client, bucket: str, *, replicas: int = 1) -> None:
        self.nc = nc
        self.bucket = bucket
        self.replicas = replicas
        self.url = f"nats://{bucket}"
        self._store: ObjectStore | None = None

    @property
    def stream(self) -> str:
        return f"OBJ_{self.bucket}"

    async def _obj(self) -> ObjectStore:
        if self._store is None:
            js = self.nc.jetstream(timeout=30.0)
            try:
                self._store = await js.object_store(self.bucket)
            except NotFoundError:
                try:
                    self._store = await js.create_object_store(
                        self.bucket,
                        api.ObjectStoreConfig(
                            description="Fabrik backup archives",
                            storage=api.StorageType.FILE,
                            replicas=self.replicas,
                        ),
                    )
                except BadRequestError:
                    self._store = await js.object_store(self.bucket)
        return self._store

    async def put(self, name: str, data: bytes) -> None:
        store = await self._obj()
        await store.put(name, data)

    async def get(self, name: str) -> bytes:
        store = await self._obj()
        try:
            result = await store.get(name)
        except (ObjectNotFoundError, NotFoundError) as exc:
            raise PartNotFoundError(f"{self.url}: no part {name}") from exc
        return result.data or b""

    async def list(self, prefix: str = "") -> list[str]:
        store = await self._obj()
        try:
            infos = await store.list(ignore_deletes=True)
        except NotFoundError:
            return []
        return sorted(i.name for i in infos if i.name and not i.deleted and i.name.startswith(prefix))

    async def delete(self, name: str) -> None:
        store = await self._obj()
        try:
            await store.delete(name)
        except (ObjectNotFoundError, NotFoundError):
            return

    async def close(self) -> None:
        return None
