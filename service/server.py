"""``m2f serve``: uvicorn on a socket bound before the model loads, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import math
import socket
from typing import Any

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings
from service.state import ServiceState

DRAIN_GRACE_S = 3  # seconds uvicorn waits past drain_timeout_s for the 503s to be written


def serve(settings: Settings) -> int:
    """Run the service with uvicorn until SIGTERM/SIGINT, draining on the way out (uvicorn then re-raises
    the signal, so the process ends as terminated by it). Returns 1 when the model failed to load; raises
    OSError (one line) at once when the address cannot be bound."""
    import uvicorn  # lazy: uvicorn (the serve extra; create_app runs without it, as in tests)

    configure_logging(settings.log_level, settings.log_format)  # text or JSON lines, each with its request id
    app = create_app(settings)
    state: ServiceState = app.state.service

    class DrainingServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_drain()  # before uvicorn stops listening: /readyz and new requests see it
            if self.loop is not None and not self.should_exit:
                state.abandon_after(self.loop, settings.drain_timeout_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through ours (configure_logging): one format, request ids
        access_log=False,  # ours is service.logs.RequestIdMiddleware's, with the request's timings
        # Later than our own drain timeout, which answers what is still open in JSON first.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + DRAIN_GRACE_S,
    )
    listener = listen_socket(settings.host, settings.port)  # a port in use fails here, before the model loads
    server = DrainingServer(config)
    app.state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[listener])
    return 1 if state.load_error is not None else 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (uvicorn listens on it); OSError in one line when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
