"""Container health check: exit 0 when the service's ``GET /healthz`` answers 200, else 1.

The CPU image has no curl or wget, so Docker's ``HEALTHCHECK`` and docker-compose run this with the
image's Python. It asks 127.0.0.1 on ``M2F_PORT`` (default 8000) and ignores any HTTP proxy settings.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("M2F_PORT", "8000")
    timeout = float(os.environ.get("M2F_HEALTHCHECK_TIMEOUT_S", "4"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            ok = response.status == 200
    except Exception as e:  # refused, timed out, 5xx: all mean unhealthy
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
