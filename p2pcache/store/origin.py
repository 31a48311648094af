"""Origins of lock-file dependencies over HTTP: registry tarball URLs and PEP 503/691 simple indexes.

Owns the client side only: streaming a URL's body (`stream`), and finding a file's URL by name in a
simple index (`find_in_index`, for poetry.lock, which names files but not URLs). Nothing here verifies or
stores; the prefetch service checks every byte against the lock file's hash before anything is recorded.
Async on httpx (anyio), so it runs under the trio node and under `trio.run` in the CLI.
"""

from __future__ import annotations

import html.parser
import json
import re
from typing import AsyncIterator
from urllib.parse import urljoin

import httpx

from ..errors import OriginError

__all__ = ["HttpOrigin", "OriginError"]


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), ""

    def handle_data(self, data):
        if self._href is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._text.strip(), self._href))
            self._href = None


class HttpOrigin:
    def __init__(self, connections: int = 64, timeout: float = 60.0):
        self.client = httpx.AsyncClient(
            follow_redirects=True, timeout=httpx.Timeout(timeout, read=300),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stream(self, url: str) -> AsyncIterator[bytes]:
        """The body of `url`, piece by piece; OriginError for a non-200 answer or a broken transfer."""
        try:
            async with self.client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise OriginError(f"origin answered HTTP {resp.status_code} for {url}", resp.status_code)
                async for piece in resp.aiter_bytes(1 << 20):
                    yield piece
        except httpx.HTTPError as e:
            raise OriginError(f"cannot download {url}: {type(e).__name__}: {e}") from None

    async def find_in_index(self, index_url: str, project: str, filename: str) -> str:
        """The URL of `filename` on `project`'s page of a PEP 691 (JSON) or PEP 503 (HTML) simple index."""
        page = f"{index_url.rstrip('/')}/{re.sub(r'[-_.]+', '-', project).lower()}/"
        try:
            resp = await self.client.get(page, headers={
                "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
        except httpx.HTTPError as e:
            raise OriginError(f"cannot read the index page {page}: {type(e).__name__}: {e}") from None
        if resp.status_code != 200:
            raise OriginError(f"index answered HTTP {resp.status_code} for {page}", resp.status_code)
        if "json" in resp.headers.get("content-type", ""):
            try:
                links = [(f["filename"], f["url"]) for f in json.loads(resp.text).get("files", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise OriginError(f"index page {page} is not PEP 691 JSON") from None
        else:
            parser = _Links()
            parser.feed(resp.text)
            links = parser.links
        for text, href in links:
            if text == filename or href.split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1] == filename:
                return urljoin(page, href.split("#", 1)[0])
        raise OriginError(f"{filename} is not listed on the index page {page}", 404)
