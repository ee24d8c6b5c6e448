"""API keys: who may call the segment routes, and the admin routes (load, reload, unload models).

Keys come from the ``keys_file`` setting, a JSON file ``{"segment": ["...", ...], "admin": ["...", ...]}``
(a Kubernetes Secret mounted as a file, say). Without segment keys the segment routes are open; without admin
keys the admin routes are off. A request names its key as ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``);
a missing or wrong one gets a JSON 401. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from service.errors import HTTPError

KINDS = ("segment", "admin")


@dataclass(frozen=True)
class Keys:
    segment: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_file(cls, path: Path | None) -> Keys:
        """The keys of a keys file (no file: no keys); a malformed file raises ValueError saying what is wrong."""
        if path is None:
            return cls()
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"keys file {path}: {e}") from None
        if not isinstance(doc, dict) or set(doc) - set(KINDS):
            raise ValueError(f'keys file {path}: expected {{"segment": [...], "admin": [...]}}')
        keys = {}
        for kind in KINDS:
            values = doc.get(kind, [])
            if not isinstance(values, list) or not all(isinstance(k, str) and len(k) >= 16 for k in values):
                raise ValueError(f"keys file {path}: {kind!r} must be a list of keys of at least 16 characters")
            keys[kind] = tuple(k.encode() for k in values)
        return cls(**keys)

    def check(self, request: Request, kind: str) -> None:
        """Raise the HTTP error for a request to a ``kind`` route that may not pass (401, or 403 admin off)."""
        allowed = self.admin if kind == "admin" else self.segment
        if kind == "admin" and not allowed:
            raise HTTPError(403, "forbidden", "the admin routes are off: the server has no admin keys (keys_file)")
        if not allowed:
            return
        given = _given_key(request)
        if given is None:
            raise HTTPError(401, "unauthorized", "this route needs an API key", {"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(given, key) for key in allowed):
            raise HTTPError(401, "unauthorized", "the API key is not valid here", {"WWW-Authenticate": "Bearer"})


def _given_key(request: Request) -> bytes | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    key = request.headers.get("x-api-key", "").strip()
    return key.encode() if key else None
