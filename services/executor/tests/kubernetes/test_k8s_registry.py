"""Resolving tags to digests (registry.py) against the OCI registry double."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from fabrik_common.natsserver import free_port
from fabrik_common.testing.registry_double import RegistryDouble
from fabrik_executor.kubernetes.registry import (
    ImageRef,
    RegistryClient,
    RegistryError,
    load_credentials,
    parse_challenge,
    parse_reference,
)


def test_references_are_normalised_as_docker_does() -> None:
    assert parse_reference("python:3.12-slim") == ImageRef("docker.io", "library/python", "3.12-slim")
    assert parse_reference("busybox") == ImageRef("docker.io", "library/busybox", "latest")
    assert parse_reference("org/app:1") == ImageRef("docker.io", "org/app", "1")
    assert parse_reference("index.docker.io/org/app:1") == ImageRef("docker.io", "org/app", "1")
    assert parse_reference("ghcr.io/org/agent:1.2") == ImageRef("ghcr.io", "org/agent", "1.2")
    assert parse_reference("localhost:5000/a/b") == ImageRef("localhost:5000", "a/b", "latest")
    assert parse_reference("python:3.12").api_host == "registry-1.docker.io"
    with pytest.raises(ValueError, match="not a tag reference"):
        parse_reference("x@sha256:" + "0" * 64)


def test_challenge_and_credentials_parsing(tmp_path: Path) -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.test/token",service="reg",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.test/token", "service": "reg", "scope": "repository:a/b:pull"}
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                    "ghcr.io": {"username": "u", "password": "p"},
                }
            }
        )
    )
    assert load_credentials(config) == {"docker.io": ("hub", "pw"), "ghcr.io": ("u", "p")}


async def test_anonymous_token_flow() -> None:
    async with RegistryDouble() as reg:
        digest = reg.push("fabrik/agent", "1.2")
        client = RegistryClient(insecure=[reg.host])
        assert await client.resolve(f"{reg.host}/fabrik/agent:1.2") == digest
        methods = [(m, p.split("?")[0]) for m, p, _ in reg.requests]
        assert methods == [
            ("HEAD", "/v2/fabrik/agent/manifests/1.2"),
            ("GET", "/token"),
            ("HEAD", "/v2/fabrik/agent/manifests/1.2"),
        ]
        accept = reg.requests[0][2]["Accept"]
        for media in ("oci.image.index.v1", "oci.image.manifest.v1", "manifest.list.v2", "manifest.v2"):
            assert media in accept
        assert "Authorization" not in reg.requests[1][2]  # anonymous


async def test_credentialed_flow(tmp_path: Path) -> None:
    async with RegistryDouble() as reg:
        digest = reg.push("team/private", "latest", private=True)
        ref = f"{reg.host}/team/private"
        # anonymous: a token, but not one that may pull a private repository
        with pytest.raises(RegistryError, match=r"answered 401"):
            await RegistryClient(insecure=[reg.host]).resolve(ref)
        auth = tmp_path / "config.json"
        auth.write_text(
            json.dumps(
                {"auths": {f"http://{reg.host}": {"auth": base64.b64encode(b"robot:s3cret").decode()}}}
            )
        )
        assert await RegistryClient(insecure=[reg.host], auth_file=str(auth)).resolve(ref) == digest
        assert reg.requests[-2][2]["Authorization"].startswith("Basic ")  # the token request
        # wrong credentials: the token endpoint refuses
        auth.write_text(
            json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"robot:wrong").decode()}}})
        )
        with pytest.raises(RegistryError, match=r"refused a pull token with the configured credentials"):
            await RegistryClient(insecure=[reg.host], auth_file=str(auth)).resolve(ref)


async def test_unknown_tag_is_404_naming_the_image() -> None:
    async with RegistryDouble() as reg:
        reg.push("fabrik/agent", "1.2")
        image = f"{reg.host}/fabrik/agent:9.9"
        with pytest.raises(RegistryError) as info:
            await RegistryClient(insecure=[reg.host]).resolve(image)
    message = str(info.value)
    assert image in message and reg.host in message and "404" in message


async def test_unreachable_registry() -> None:
    host = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match="unreachable") as info:
        await RegistryClient(insecure=[host], timeout_seconds=3).resolve(f"{host}/a/b:1")
    assert f"{host}/a/b:1" in str(info.value)


def test_https_unless_listed_insecure() -> None:
    client = RegistryClient(insecure=["127.0.0.1:5000", "http://LOCALHOST:5001"])
    assert client.base_url(parse_reference("127.0.0.1:5000/a:1")) == "http://127.0.0.1:5000"
    assert client.base_url(parse_reference("localhost:5001/a:1")) == "http://localhost:5001"
    assert client.base_url(parse_reference("ghcr.io/a:1")) == "https://ghcr.io"
    assert client.base_url(parse_reference("python:3")) == "https://registry-1.docker.io"
