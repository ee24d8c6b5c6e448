"""``/docs`` and ``/redoc`` work without internet: their pages reference no URL outside the server, and every
asset they reference is served, with a JavaScript, CSS or image content type."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import pytest

ASSET_TYPES = ("text/javascript", "application/javascript", "text/css", "image/png")


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def references(html: str) -> list[str]:
    """URLs the page loads: src/href attributes, the spec URL given to Swagger UI or ReDoc."""
    refs = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html)
    refs += re.findall(r"""\burl:\s*["']([^"']+)["']""", html)
    return refs


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_loads_only_from_the_server(server, page):
    r = server.client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    external = [
        u for u in re.findall(r"https?://[^\s\"'<>)]+", html) if urlsplit(u).netloc != f"127.0.0.1:{server.port}"
    ]
    assert external == [], f"{page} references {external}"
    refs = references(html)
    assets = [u for u in refs if not u.endswith("openapi.json")]
    assert len(assets) >= 2 and any(u.endswith(".js") for u in assets), refs  # the UI's script, favicon (+ css)
    for url in refs:
        assert not urlsplit(url).netloc, url  # relative to this server
        got = server.client.get(urljoin(server.base + page, url))
        assert got.status_code == 200, url
        ctype = got.headers["content-type"].split(";")[0]
        if url.endswith("openapi.json"):
            assert ctype == "application/json" and "/v1/segment" in got.json()["paths"]
        else:
            assert ctype in ASSET_TYPES, f"{url}: {ctype}"
            assert len(got.content) > 1000, url


def test_swagger_ui_does_not_call_the_public_validator(server):
    assert '"validatorUrl": null' in server.client.get("/docs").text
