"""The browser UI every node serves at ``/``: a chat and a cluster view (plain ES modules under ``static/``).

This package owns ``static/`` (the page, its modules and the vendored libraries with their licenses) and
the two routes that serve it:

- ``GET /``: the page, ``Cache-Control: no-cache`` with an ETag (a revalidation is a 304);
- ``GET /ui/{version}/{path}``: every other file, under a version that is a hash of all of them, so that
  they are ``immutable`` for a year: a changed file changes the version, and the page names the new one.
  A request for another version is a 404 (its files are gone).

Files are read once per process, when routes are first added; nothing is built. The page talks to the node's own API
(``/v1/*``, ``/health``), so its security headers allow only this origin.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

__all__ = ["Assets", "add_routes", "packaged"]

STATIC = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
BASE_MARK = b"{{BASE}}"  # where index.html names its assets' directory

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE files
}
IMMUTABLE = "public, max-age=31536000, immutable"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(body: bytes, suffix: str) -> Asset:
    content_type = CONTENT_TYPES.get(suffix)
    if content_type is None:
        raise ValueError(f"no content type known for {suffix!r} files: add it to CONTENT_TYPES")
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


class Assets:
    """Every file under ``root``, read once, with the version that names them and the page that uses it."""

    def __init__(self, root: Path = STATIC) -> None:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != INDEX and not p.name.startswith("."))
        digest = hashlib.sha256()
        self.files: dict[str, Asset] = {}
        for path in files:
            rel = path.relative_to(root).as_posix()
            body = path.read_bytes()
            digest.update(rel.encode() + b"\0" + hashlib.sha256(body).digest())
            self.files[rel] = _asset(body, path.suffix)
        page = (root / INDEX).read_bytes()
        digest.update(page)
        self.version = digest.hexdigest()[:16]
        self.base = f"/ui/{self.version}/"
        self.index = _asset(page.replace(BASE_MARK, self.base.encode()), ".html")

    def get(self, version: str, path: str) -> Asset | None:
        return self.files.get(path) if version == self.version else None


def _respond(request: web.Request, asset: Asset, cache: str, extra: dict[str, str] | None = None) -> web.Response:
    headers = {"ETag": asset.etag, "Cache-Control": cache, **SECURITY_HEADERS, **(extra or {})}
    if asset.etag in {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


@functools.cache
def packaged() -> Assets:
    """The files shipped with the package, read once per process (every app serves the same)."""
    return Assets()


def add_routes(app: web.Application, assets: Assets | None = None) -> Assets:
    """Serve the page at ``/`` and its files under ``/ui/{version}/`` (see the module docstring)."""
    found = assets or packaged()

    async def page(request: web.Request) -> web.Response:
        return _respond(request, found.index, "no-cache", {"Content-Security-Policy": PAGE_POLICY})

    async def file(request: web.Request) -> web.Response:
        asset = found.get(request.match_info["version"], request.match_info["path"])
        if asset is None:
            raise web.HTTPNotFound()
        return _respond(request, asset, IMMUTABLE)

    app.router.add_get("/", page)
    app.router.add_get("/ui/{version}/{path:.+}", file)
    return found
