"""The browser page at ``GET /`` of ``edgeft serve``: three static files shipped in the package.

``index.html``, ``app.js`` and ``style.css`` sit next to this module: no build step and no
CDN, so the page works on a machine without internet. The page talks only to the server's
own OpenAI-compatible routes (``/v1/models``, ``/v1/chat/completions``, ``/v1/classify``,
``/v1/embeddings``) and never turns model output or server data into markup. It carries no
secrets: with ``--api-key`` it asks the user for the key and keeps it in the tab's
``sessionStorage``.

This module knows the file names and the headers they go out with (a Content-Security-Policy
that allows only the page's own script, styles and requests); it knows nothing of models or
of the routes the page calls.
"""

from __future__ import annotations

from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read(name: str) -> bytes:
    """One of the page's files, as shipped in the package."""
    return resources.files(__name__).joinpath(name).read_bytes()


def routes() -> list[Route]:
    """``/`` (the page) and ``/ui/{name}`` (its script and styles); files are read once, here."""
    files = {name: read(name) for name in TYPES}

    def answer(name: str) -> Response:
        return Response(files[name], media_type=TYPES[name], headers=HEADERS)

    async def page(request: Request) -> Response:
        return answer("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files or name == "index.html":
            raise HTTPException(404, "Not Found")
        return answer(name)

    return [Route("/", page, methods=["GET", "HEAD"]), Route("/ui/{name}", asset, methods=["GET", "HEAD"])]
