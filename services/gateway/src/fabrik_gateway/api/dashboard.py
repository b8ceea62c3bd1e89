"""The web dashboard: one HTML page and its static assets, shipped in this package.

The page holds no data: it loads plain ES modules, which read everything from `/api/v1` with the
operator's credentials (or none, when the gateway allows anonymous access). The client-side routes
(`/runs/<id>`, `/queue`, ...) all answer the same page.

- Assets are read once, at start, from `fabrik_gateway/dashboard/static/`, and served under
  `/dashboard/<version>/<path>`, where `<version>` is a hash of all of them: an asset URL never
  changes its content, so assets are cached for a year (`immutable`); the page itself is
  `no-cache`, so a new release is picked up on the next load. An older version's URL (a page
  loaded before an upgrade) gets the current file, not cached.
- Content-Security-Policy: scripts, styles, images and connections from this origin only; no
  inline script or style, no frames, no plugins, forms post nowhere.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from litestar import Response, Router, get
from litestar.params import FromPath

from fabrik_gateway.problems import not_found

PACKAGE_DIR: Final = Path(__file__).resolve().parent.parent / "dashboard"
STATIC_DIR: Final = PACKAGE_DIR / "static"
INDEX_FILE: Final = PACKAGE_DIR / "index.html"
ASSETS_PREFIX: Final = "/dashboard"
ASSETS_PLACEHOLDER: Final = "{{assets}}"

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    )
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
IMMUTABLE: Final = "public, max-age=31536000, immutable"
SPA_ROUTES: Final = (
    "/",
    "/runs",
    "/runs/{run_id:str}",
    "/queue",
    "/submit",
    "/schedules",
    "/costs",
    "/experiments",
    "/experiments/{experiment_id:str}",
)
_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str


@dataclass(frozen=True)
class Bundle:
    """The page and its assets as served: read and hashed once."""

    version: str
    index: bytes
    assets: dict[str, Asset]

    @property
    def base(self) -> str:
        return f"{ASSETS_PREFIX}/{self.version}"


def _media_type(path: Path) -> str:
    if path.suffix in _TYPES:
        return _TYPES[path.suffix]
    if path.name.isupper() or path.name in ("NOTICE", "LICENSE"):
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def load_bundle(static_dir: Path = STATIC_DIR, index_file: Path = INDEX_FILE) -> Bundle:
    """Every file under `static_dir` (relative POSIX path → content) and the page, whose
    `{{assets}}` placeholders become the versioned asset prefix."""
    assets: dict[str, Asset] = {}
    digest = hashlib.sha256()
    for path in sorted(p for p in static_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(static_dir).as_posix()
        if relative.startswith(".") or "/." in relative or "__pycache__" in relative:
            continue
        body = path.read_bytes()
        assets[relative] = Asset(body=body, media_type=_media_type(path))
        digest.update(relative.encode() + b"\0" + hashlib.sha256(body).digest())
    version = digest.hexdigest()[:16]
    index = index_file.read_text(encoding="utf-8").replace(ASSETS_PLACEHOLDER, f"{ASSETS_PREFIX}/{version}")
    return Bundle(version=version, index=index.encode(), assets=assets)


def dashboard_router(bundle: Bundle | None = None) -> Router:
    """The page at `/` and at every client-side route, and the assets."""
    served = bundle if bundle is not None else load_bundle()

    @get(list(SPA_ROUTES), include_in_schema=False, sync_to_thread=False)
    def page() -> Response[bytes]:
        return Response(served.index, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @get(f"{ASSETS_PREFIX}/{{version:str}}/{{path:path}}", include_in_schema=False, sync_to_thread=False)
    def asset(version: FromPath[str], path: FromPath[str]) -> Response[bytes]:
        found = served.assets.get(path.lstrip("/"))
        if found is None:
            raise not_found(f"dashboard asset {path}")
        cache = IMMUTABLE if version == served.version else "no-cache"
        return Response(
            found.body,
            media_type=found.media_type,
            headers={"Cache-Control": cache, "Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )

    return Router(path="/", route_handlers=[page, asset], include_in_schema=False)
