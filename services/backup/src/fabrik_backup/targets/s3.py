"""Any S3-compatible object store (AWS S3, Hetzner Object Storage, MinIO, ...) through aioboto3."""

from __future__ import annotations

import contextlib
from typing import Any

import aioboto3  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from fabrik_backup.targets.base import PartNotFoundError


class S3Target:
    """Parts are objects `<prefix><name>` in `bucket`. A PUT of an object is atomic, so the
    manifest's PUT commits an archive. Credentials: explicit ones, else the AWS default chain
    (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_SHARED_CREDENTIALS_FILE`, instance roles)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self._session = aioboto3.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._endpoint_url = endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def _s3(self) -> Any:
        if self._client is None:
            self._client = await self._stack.enter_async_context(
                self._session.client("s3", endpoint_url=self._endpoint_url)
            )
        return self._client

    async def put(self, name: str, data: bytes) -> None:
        s3 = await self._s3()
        await s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    async def get(self, name: str) -> bytes:
        s3 = await self._s3()
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise PartNotFoundError(f"{self.url}: no part {name}") from exc
            raise
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def list(self, prefix: str = "") -> list[str]:
        s3 = await self._s3()
        names: list[str] = []
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                names.append(str(item["Key"])[len(self.prefix) :])
        return sorted(names)

    async def delete(self, name: str) -> None:
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()
