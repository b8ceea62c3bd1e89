"""Every target stores, lists, reads and deletes parts, and carries a whole backup and restore."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from backup_fixtures import populate, server_snapshot
from moto.server import ThreadedMotoServer

from fabrik_backup import jsapi
from fabrik_backup.engine import BackupOptions, run_backup
from fabrik_backup.restore import restore
from fabrik_backup.targets import PartNotFoundError, S3Options, Target, TargetError, open_target
from fabrik_backup.verify import verify
from fabrik_common.natsserver import NatsServer
from fabrik_common.testing import NatsServerLike


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["dir", "s3", "nats"])
async def target(
    request: pytest.FixtureRequest, tmp_path: Path, nats_server: NatsServerLike
) -> AsyncIterator[Target]:
    nc = await jsapi.connect_raw(nats_server.url)
    s3 = None
    if request.param == "dir":
        url = f"dir://{tmp_path / 'archives'}"
    elif request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        s3 = S3Options(
            endpoint_url=endpoint, region="us-east-1", access_key_id="test", secret_access_key="test"
        )
        import aioboto3  # type: ignore[import-untyped]

        async with aioboto3.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ) as client:
            await client.create_bucket(Bucket="fabrik-backups")
        url = "s3://fabrik-backups/cluster-a"
    else:
        url = "nats://archives"
    opened = open_target(url, nc=nc, s3=s3)
    try:
        yield opened
    finally:
        await opened.close()
        await nc.close()


async def test_parts_put_get_list_delete(target: Target) -> None:
    assert await target.list() == []
    await target.put("b1/streams/S/00000000.chunk.zst", b"one")
    await target.put("b1/manifest.json", b"{}")
    await target.put("b2/manifest.json", b"{}")
    await target.put("b1/manifest.json", b'{"v": 2}')  # replaced whole
    assert await target.list("b1/") == ["b1/manifest.json", "b1/streams/S/00000000.chunk.zst"]
    assert await target.get("b1/manifest.json") == b'{"v": 2}'
    await target.delete("b1/manifest.json")
    await target.delete("b1/manifest.json")  # already gone: nothing happens
    assert await target.list() == ["b1/streams/S/00000000.chunk.zst", "b2/manifest.json"]
    with pytest.raises(PartNotFoundError):
        await target.get("b1/manifest.json")


async def test_backup_verify_restore_through_the_target(
    target: Target, nats_server: NatsServerLike, fresh_server: NatsServer
) -> None:
    nc = await nats.connect(nats_server.url)
    await populate(nc)
    await nc.close()
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    try:
        exclude = ("OBJ_archives",)  # a nats:// target's own store
        manifest = await run_backup(
            source, target, "t1", BackupOptions(exclude=exclude, chunk_max_messages=50)
        )
        assert "OBJ_archives" not in {s.name for s in manifest.streams}
        checked = await verify(target, "t1")
        assert checked.parts == manifest.parts > 10
        await restore(dest, target, manifest)
        before = await server_snapshot(source, exclude=exclude)
        after = await server_snapshot(dest)
        assert {n: (s.count, s.digest, s.state) for n, s in after.items()} == {
            n: (s.count, s.digest, s.state) for n, s in before.items()
        }
    finally:
        await source.close()
        await dest.close()


def test_target_urls_are_checked() -> None:
    for url, rule in [
        ("file:///x", "must start with"),
        ("dir://relative", "absolute path"),
        ("s3://", "bucket"),
        ("nats://bad/name", "object store name"),
    ]:
        with pytest.raises(TargetError, match=rule):
            open_target(url)
