"""The web dashboard's page and assets: routes, SPA fallback, caching and security headers."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from fabrik_gateway.api.dashboard import (
    CONTENT_SECURITY_POLICY,
    SPA_ROUTES,
    STATIC_DIR,
    dashboard_router,
    load_bundle,
)
from fabrik_gateway.app import build
from fabrik_gateway.edge import security_headers_middleware
from fabrik_gateway.problems import make_exception_handlers
from fabrik_gateway.settings import GatewaySettings

PAGES = [
    "/",
    "/runs",
    "/runs/01JH3Z9W4R8Q0M6Y2V5T7K1B3C",
    "/experiments/01JH3Z9W4R8Q0M6Y2V5T7K1B3C",
    "/queue",
    "/submit",
    "/schedules",
    "/costs",
    "/experiments",
]


@pytest.fixture
def client() -> TestClient[Litestar]:
    app = Litestar(
        route_handlers=[dashboard_router()],
        middleware=[security_headers_middleware(GatewaySettings())],
        exception_handlers=make_exception_handlers(),
    )
    return TestClient(app)


@pytest.mark.parametrize("path", PAGES)
def test_every_client_route_answers_the_page(client: TestClient[Litestar], path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.text == client.get("/").text


def test_the_page_has_no_inline_script_or_style_and_no_data(client: TestClient[Litestar]) -> None:
    page = client.get("/").text
    assert "{{assets}}" not in page
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert scripts, "the page loads its module"
    for attrs, body in scripts:
        assert 'type="module"' in attrs and "src=" in attrs
        assert body.strip() == ""
    assert "<style" not in page and " style=" not in page
    assert re.search(r"<[^>]*\son[a-z]+\s*=", page) is None, "no inline event handlers"
    for word in ("run_id", "api_token", "fbk_"):
        assert word not in page


def test_assets_are_versioned_immutable_and_typed(client: TestClient[Litestar]) -> None:
    bundle = load_bundle()
    page = client.get("/").text
    urls = re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page)
    assert {u.rsplit("/", 1)[1] for u in urls} == {"favicon.svg", "style.css", "app.js"}
    for url in urls:
        assert url.startswith(f"/dashboard/{bundle.version}/")
        response = client.get(url)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    js = client.get(f"/dashboard/{bundle.version}/pages/runs.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert client.get(f"/dashboard/{bundle.version}/style.css").headers["content-type"].startswith("text/css")


def test_every_module_import_resolves_to_a_shipped_asset() -> None:
    bundle = load_bundle()
    for name, asset in bundle.assets.items():
        if not name.endswith(".js"):
            continue
        for target in re.findall(r'from "(\.[^"]+)"', asset.body.decode()):
            resolved = (Path("/") / name).parent.joinpath(target).resolve().as_posix().lstrip("/")
            assert resolved in bundle.assets, f"{name} imports {target}, which is not shipped"


def test_another_version_is_served_but_not_cached(client: TestClient[Litestar]) -> None:
    response = client.get("/dashboard/0000000000000000/app.js")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/v/missing.js",
        "/dashboard/v/../api/dashboard.py",
        "/dashboard/v/%2e%2e/%2e%2e/app.py",
        "/dashboard/v//etc/passwd",
    ],
)
def test_unknown_assets_and_traversal_are_404_problems(client: TestClient[Litestar], path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


def test_the_version_changes_with_any_asset(tmp_path: Path) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "app.js").write_text("export {};\n")
    index = tmp_path / "index.html"
    index.write_text('<script type="module" src="{{assets}}/app.js"></script>')
    first = load_bundle(static, index)
    (static / "app.js").write_text("export const x = 1;\n")
    second = load_bundle(static, index)
    assert first.version != second.version
    assert f"/dashboard/{second.version}/app.js".encode() in second.index


def test_the_gateway_serves_the_dashboard_outside_its_api_document() -> None:
    service = build(GatewaySettings())
    paths = {route.path for route in service.http_app.routes}
    assert {"/", "/runs/{run_id:str}", "/dashboard/{version:str}/{path:path}"} <= paths
    for route in SPA_ROUTES:
        assert route in paths
    document = service.http_app.openapi_schema.to_schema()
    assert not [p for p in document["paths"] if not p.startswith(("/api/", "/webhooks/"))]
    assert "/api/v1/runs/{run_id}/llm-calls" in document["paths"]


def test_no_hidden_or_cache_files_are_shipped() -> None:
    names = load_bundle().assets
    assert all("__pycache__" not in n and not n.startswith(".") for n in names)
    assert (STATIC_DIR / "app.js").exists()


def test_the_wheel_ships_the_page_and_every_asset(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH: the wheel cannot be built here")
    root = Path(__file__).resolve().parents[3]
    subprocess.run(
        [uv, "build", "--package", "fabrik-gateway", "--wheel", "--out-dir", str(tmp_path)],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("fabrik_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "fabrik_gateway/dashboard/index.html" in names
    for asset in load_bundle().assets:
        assert f"fabrik_gateway/dashboard/static/{asset}" in names
