"""``m2f serve``: uvicorn on a socket bound before the model loads, every connection bounded, and the drain.

Connections (fixed bounds, in the limits table of docs/serving.md):

- the request line and headers must arrive within :data:`HEADER_TIMEOUT_S` of the connection's opening or of
  the request's first byte (uvicorn has no such bound): else a JSON 408 ``header_timeout`` with
  ``Connection: close`` when part of a request came, a plain close when nothing did;
- headers over 16 KiB (h11's bound) get a JSON 400; an idle keep-alive connection is closed after
  :data:`KEEP_ALIVE_S`;
- at most :data:`MAX_CONNECTIONS` connections at once (fewer when the process's file limit is low): one more
  gets a JSON 503 ``too_many_connections`` and is closed, so open files stay bounded;
- an answer sent before the request's body was read to its end (408, 413, an early 503, ...) or while the
  server drains says ``Connection: close`` and the connection is closed (:class:`CloseConnections`);
- every close is a lingering one (:class:`LingeringTransport`): the server sends FIN and reads and discards
  what the client still sends for up to :data:`LINGER_S`, so that a client still sending gets the answer and
  an end of file, not a reset that could discard the answer.

Drain (:class:`DrainingServer`): on SIGTERM/SIGINT readiness fails at once (``/readyz`` 503, new segment
requests 503 ``draining`` with ``Retry-After``) on a listener that stays open, so the requests a load balancer
still sends are answered; the listener closes once nothing is being uploaded or waits for an answer
(``ServiceState.busy() == 0``) or at ``drain_timeout_s``, when whatever is still open is answered JSON 503
``draining``. Then the remaining connections close and the process ends as terminated by the signal.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import socket
import time
import uuid
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import create_app
from service.errors import error_body
from service.logs import Message, Receive, Scope, Send, configure_logging
from service.settings import Settings
from service.state import ServiceState

HEADER_TIMEOUT_S = 10.0  # request line and headers, from the connection's opening or the request's first byte
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
LINGER_S = 2.0  # after our FIN, what the client still sends is read and discarded for at most this long
MAX_CONNECTIONS = 1000  # open connections at once; more get 503 too_many_connections
FD_RESERVE = 128  # files kept free of connections (model files, thread pools, logs) when the file limit is low
DRAIN_GRACE_S = 3  # past the drain: time for the last answers to be written and the connections to close
DRAIN_POLL_S = 0.05

log = logging.getLogger("m2f.service")


def connection_limit(limit: int = MAX_CONNECTIONS) -> int:
    """``limit``, or fewer when the process may not open that many files plus :data:`FD_RESERVE`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(min(limit, soft - FD_RESERVE), 1)


# ---------------------------------------------------------------------------------------------- connections
class LingeringTransport:
    """The transport uvicorn's protocol writes to, with ``close()`` made a lingering close: FIN once the answer
    is written, then what the client still sends is discarded until it closes its side or :data:`LINGER_S`
    passes. Everything else goes to the real transport."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger_s: float = LINGER_S):
        self._transport = transport
        self._loop = loop
        self._linger_s = linger_s
        self._timer: asyncio.TimerHandle | None = None
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering:
            return
        self.lingering = True
        transport = self._transport
        if transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # FIN once the write buffer is flushed
        transport.resume_reading()  # keep reading (and discarding) whatever was paused
        self._timer = self._loop.call_later(self._linger_s, transport.close)

    def lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with every connection bounded: a deadline for the request line and headers, a
    cap on open connections, JSON answers to bad or late headers, and lingering closes."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    _last_cap_warning = 0.0  # monotonic time of the last "too many connections" line (one per 10 s at most)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self.loop))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            self.warn_cap()
            message = "too many connections are open; try again later"
            self.answer_and_close(503, "too_many_connections", message, {"Retry-After": "1"})
            return
        self.start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # lingering: what the client still sends is discarded
            return
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self.start_header_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are complete (or the connection is done)
            self.cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_timer()
        self.transport.lost()  # type: ignore[attr-defined]
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # malformed request or headers over 16 KiB
        self.answer_and_close(400, "bad_request", f"invalid HTTP request: {msg}")

    # ------------------------------------------------------------------ header deadline
    def start_header_timer(self) -> None:
        self.cancel_header_timer()
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.header_timeout)

    def cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        received = len(self.conn.trailing_data[0])
        if not received:  # nothing of a request came: close quietly, as an idle keep-alive connection
            self.transport.close()
            return
        log.info("header timeout: %d bytes of a request's headers in %.0f s", received, self.header_timeout_s)
        message = f"the request's headers did not arrive within {self.header_timeout_s:g} s"
        self.answer_and_close(408, "header_timeout", message)

    # ------------------------------------------------------------------ answers outside the app
    def answer_and_close(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        """A JSON error answer written before any request was parsed (no app, no h11 state), then a close."""
        body = error_body(status, reason, message)
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        fields = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close"}
        fields |= {"x-request-id": uuid.uuid4().hex, **(headers or {})}
        lines += [f"{k}: {v}" for k, v in fields.items()]
        default = b"".join(k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers)  # date, server
        self.cancel_header_timer()
        self.transport.write("\r\n".join(lines).encode("latin-1") + b"\r\n" + default + b"\r\n" + body)
        self.transport.close()

    @classmethod
    def warn_cap(cls) -> None:
        now = time.monotonic()
        if now - cls._last_cap_warning >= 10:
            cls._last_cap_warning = now
            log.warning("%d connections are open: refusing new ones with 503", cls.max_connections)


class CloseConnections:
    """ASGI middleware: ``Connection: close`` on an answer sent while the server drains or before the request's
    body was read to its end (uvicorn then closes the connection instead of reading the rest of a body nobody
    wants, or keeping a client of a draining server)."""

    def __init__(self, app: Any, state: ServiceState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        body_read = not (b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() != b"0")

        async def receive_and_watch() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_with_close(message: Message) -> None:
            if message["type"] == "http.response.start" and (self.state.draining or not body_read):
                fields = list(message.get("headers") or [])
                if not any(k.lower() == b"connection" for k, _ in fields):
                    message = {**message, "headers": [*fields, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_and_watch, send_with_close)


# ---------------------------------------------------------------------------------------------- drain
class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain: on the first SIGTERM/SIGINT readiness fails and admission stops while the
    listener stays open; the server stops (listener, then connections) once ``state.busy()`` is 0 or
    ``drain_timeout_s`` has passed (open requests are then answered 503 ``draining``). A second signal stops
    the wait; a second SIGINT after that forces the exit, as in uvicorn."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task[None] | None = None
        self.drain_started = False

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.loop is None or self.drain_started or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self.drain_started = True
        self._captured_signals.append(sig)  # uvicorn raises it again once stopped: the exit status says SIGTERM
        self.loop.call_soon_threadsafe(self.start_drain)  # in the loop, not in the signal handler

    def start_drain(self) -> None:
        assert self.loop is not None
        self.state.begin_drain()
        self.state.abandon_after(self.loop, self.drain_timeout_s)
        self.drain_task = self.loop.create_task(self.drain())

    async def drain(self) -> None:
        assert self.loop is not None
        end = self.loop.time() + self.drain_timeout_s + DRAIN_GRACE_S
        while self.state.busy() > 0 and not self.should_exit and self.loop.time() < end:
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("drained (%d request(s) open): closing the listener", self.state.busy())
        self.should_exit = True


# ---------------------------------------------------------------------------------------------- serve
def serve(settings: Settings) -> int:
    """Run the service with uvicorn until SIGTERM/SIGINT, draining on the way out (uvicorn then raises the
    signal again, so the process ends as terminated by it). Returns 1 when the model failed to load; raises
    OSError (one line) at once when the address cannot be bound."""
    configure_logging(settings.log_level, settings.log_format)  # text or JSON lines, each with its request id
    app = create_app(settings)
    state: ServiceState = app.state.service
    app.add_middleware(CloseConnections, state=state)
    protocol = type("Protocol", (BoundedH11Protocol,), {"max_connections": connection_limit()})
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary request
        timeout_keep_alive=KEEP_ALIVE_S,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through ours (configure_logging): one format, request ids
        access_log=False,  # ours is service.logs.RequestIdMiddleware's, with the request's timings
        timeout_graceful_shutdown=DRAIN_GRACE_S,  # the drain itself happens before uvicorn's shutdown
    )
    listener = listen_socket(settings.host, settings.port)  # a port in use fails here, before the model loads
    server = DrainingServer(config, state, settings.drain_timeout_s)
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
