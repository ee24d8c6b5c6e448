"""Every connection is bounded (DESIGN.md section 5), against the real ``m2f serve`` on 127.0.0.1 over raw sockets:
the time to send the headers, idle keep-alive, the number of open connections, and ``Connection: close`` plus an
actual close after an answer sent before the request's body was read (408, 413), even while the client keeps
sending. A close is an end of file after the answer, never a reset."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from m2f import synth
from service.server import FD_RESERVE, HEADER_TIMEOUT_S, KEEP_ALIVE_S, LINGER_S

TOO_LARGE = 2**30  # a Content-Length over the body limit


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synth.make_sample(seed=2024, index=0, size=(160, 160)).image).save(buf, format="PNG")
    return buf.getvalue()


SERVER_ARGS = ("--max-batch-size", "1", "--max-batch-delay-ms", "1")
UPLOAD_DEADLINE_S = 3  # a body not sent by then gets 408


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SERVER_ARGS, "--request-timeout-s", str(UPLOAD_DEADLINE_S))


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def open_fds(server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def read_until_eof(sock: socket.socket, timeout: float, trickle: bytes = b"") -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when the end of file came (monotonic); sends
    ``trickle`` every 0.2 s meanwhile when given. Fails on a reset or when no end of file comes in ``timeout``."""
    end = time.monotonic() + timeout
    reply = b""
    while time.monotonic() < end:
        if select.select([sock], [], [], 0.2)[0]:
            part = sock.recv(65536)  # ConnectionResetError here fails the test: a close must not be a reset
            if not part:
                return reply, time.monotonic()
            reply += part
        elif trickle:
            sock.sendall(trickle)
    pytest.fail(f"the connection is still open after {timeout} s; received {reply[:300]!r}")


def parse(reply: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else {}


# ---------------------------------------------------------------------------------------------- headers
def test_connections_that_never_finish_their_headers_are_closed(server):
    """200 connections send part of a request line or of the headers and stall, 50 send nothing: each is closed
    at the header deadline (408 JSON with Connection: close when part of a request came, a plain close when
    nothing did), the process's open files come back down, and a well-behaved request meanwhile gets 200.
    (Before the deadline existed, they stayed open for as long as the client wished.)"""
    partial = [b"POST /v1/segment HTT", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "]
    fds_before = open_fds(server)
    started = time.monotonic()
    socks = [connect(server) for _ in range(250)]
    try:
        for i, sock in enumerate(socks[:200]):
            sock.sendall(partial[i % 2])
        end = time.monotonic() + 5
        while open_fds(server) < fds_before + 250 and time.monotonic() < end:  # until the server accepted them all
            time.sleep(0.05)
        assert open_fds(server) >= fds_before + 250
        time.sleep(1)
        r = server.client.post("/v1/segment", content=png_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda s: read_until_eof(s, HEADER_TIMEOUT_S + 10), socks))
    finally:
        for sock in socks:
            sock.close()
    for _, closed_at in replies:
        assert HEADER_TIMEOUT_S - 0.5 <= closed_at - started <= HEADER_TIMEOUT_S + LINGER_S + 3
    for reply, _ in replies[:200]:
        status, headers, body = parse(reply)
        assert status == 408 and headers["connection"] == "close", reply
        assert body["error"]["reason"] == "header_timeout" and headers["content-type"] == "application/json"
    assert all(reply == b"" for reply, _ in replies[200:])
    time.sleep(0.5)
    assert open_fds(server) <= fds_before + 5
    assert server.client.get("/healthz").status_code == 200


def test_a_stalled_request_on_a_kept_alive_connection_is_closed(server):
    """A first request is answered and the connection kept alive; it is closed KEEP_ALIVE_S after the answer
    when idle, and HEADER_TIMEOUT_S after the first byte of a second request whose headers never end (which
    before kept it open for good: any byte stopped uvicorn's keep-alive timer)."""
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as idle, connect(server) as stalled:
        idle.sendall(get)
        stalled.sendall(get)
        first = time.monotonic()
        stalled.recv(65536)
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        reply, closed_at = read_until_eof(idle, KEEP_ALIVE_S + LINGER_S + 5)
        assert parse(reply)[0] == 200 and KEEP_ALIVE_S - 0.5 <= closed_at - first <= KEEP_ALIVE_S + LINGER_S + 2
        reply, closed_at = read_until_eof(stalled, HEADER_TIMEOUT_S + LINGER_S + 5)
        assert parse(reply)[0] == 408 and HEADER_TIMEOUT_S - 0.5 <= closed_at - first <= HEADER_TIMEOUT_S + 3


def test_oversized_headers_get_a_json_400(server):
    """Headers still incomplete past 16 KiB (h11's bound) get a JSON 400 and a close."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000)
        time.sleep(0.2)
        sock.sendall(b"a" * 10000)
        status, headers, body = parse(read_until_eof(sock, 10)[0])
    assert status == 400 and headers["connection"] == "close" and body["error"]["reason"] == "bad_request"


# ---------------------------------------------------------------------------------------------- early answers
def test_413_closes_the_connection_while_the_client_keeps_sending(server):
    """A body announced over the limit is answered 413 before it is read: Connection: close, and the server
    closes although the client goes on sending (before, it read the trickle for as long as it came)."""
    with connect(server) as sock:
        head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {TOO_LARGE}\r\n"
        sock.sendall(head.encode() + b"\r\n" + b"\x89")
        sent = time.monotonic()
        reply, closed_at = read_until_eof(sock, 15, trickle=b"\x00")
    status, headers, body = parse(reply)
    assert status == 413 and headers["connection"] == "close" and body["error"]["reason"] == "too_large"
    assert closed_at - sent <= LINGER_S + 2


def test_408_closes_the_connection_while_the_client_keeps_sending(server):
    """A body trickled too slowly gets 408 at the upload deadline, with Connection: close, and the connection is
    closed although the client goes on sending."""
    with connect(server) as sock:
        head = "POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 50000\r\n\r\n"
        sock.sendall(head.encode())
        sent = time.monotonic()
        reply, closed_at = read_until_eof(sock, 20, trickle=b"\x00")
    status, headers, body = parse(reply)
    assert status == 408 and headers["connection"] == "close" and body["error"]["reason"] == "upload_timeout"
    assert closed_at - sent <= UPLOAD_DEADLINE_S + LINGER_S + 2


def test_a_client_still_sending_a_large_body_reads_the_413(server):
    """A client that goes on sending a body announced over the limit (as fast as it can) still reads the 413 and
    an end of file: the server closes its side first and discards what comes for a while (a plain close with
    unread data sends a reset, which can destroy the answer before the client reads it)."""
    head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {TOO_LARGE}\r\n\r\n"
    stop = threading.Event()

    def send_body(sock: socket.socket) -> None:
        chunk = b"\x00" * 65536
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(chunk)

    for _ in range(5):
        with connect(server) as sock:
            sock.sendall(head.encode())
            sender = threading.Thread(target=send_body, args=(sock,))
            sender.start()
            try:
                reply, _ = read_until_eof(sock, 10)
            finally:
                stop.set()
                sender.join()
            stop.clear()
        status, headers, body = parse(reply)
        assert status == 413 and headers["connection"] == "close" and body["error"]["reason"] == "too_large"


def test_a_refused_body_does_not_keep_the_connection(server):
    """An answer sent before the body was read (here 404: no such route) closes the connection instead of
    reading a body nobody wants; an answer after the body was read keeps it alive."""
    with connect(server) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\x00" * 10)
        status, headers, _ = parse(read_until_eof(sock, 10, trickle=b"\x00")[0])
        assert status == 404 and headers["connection"] == "close"
    with httpx.Client(base_url=server.base) as client:  # one connection, kept alive
        for _ in range(2):
            r = client.post("/v1/segment", content=png_bytes(), headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and "connection" not in r.headers


# ---------------------------------------------------------------------------------------------- cap
def test_open_connections_are_capped_below_the_file_limit(start_server):
    """With a file limit of FD_RESERVE + 100 the server keeps at most 100 connections: the next one gets a JSON
    503 too_many_connections (then an end of file), and once the others are closed requests are served again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_RESERVE + 100, hard))  # the server process inherits it
    try:
        server = start_server(*SERVER_ARGS, ready=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    server.wait_ready()
    socks = [connect(server) for _ in range(100)]
    try:
        time.sleep(0.5)
        with connect(server) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = parse(read_until_eof(extra, 10)[0])
        assert status == 503 and body["error"]["reason"] == "too_many_connections"
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    assert server.client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- drain
def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], dict]:
    """One response on a kept-alive connection (read to its Content-Length, the connection left open)."""
    sock.settimeout(timeout)
    reply = b""
    while b"\r\n\r\n" not in reply:
        part = sock.recv(65536)
        assert part, f"the connection closed before an answer: {reply!r}"
        reply += part
    status, headers, _ = parse(reply.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    while len(reply.partition(b"\r\n\r\n")[2]) < int(headers["content-length"]):
        reply += sock.recv(65536)
    return parse(reply)


def test_sigterm_fails_readiness_answers_during_the_drain_then_exits(start_server):
    """SIGTERM while a request waits for its batch (1.5 s): during the drain the listener stays open, /readyz
    says 503, a new connection's request gets a JSON 503 draining with Retry-After, and a request on an idle
    kept-alive connection gets the same with Connection: close, then an end of file, not a reset. The waiting
    request is answered 200, then the listener closes and the process ends as terminated by SIGTERM, without
    waiting for the drain timeout. (Before, the listener closed at once: new connections were refused.)"""
    batching = ("--max-batch-size", "8", "--max-batch-delay-ms", "1500")
    server = start_server(*batching, env={"M2F_BATCH_PROFILE": "false"})
    data = png_bytes()
    head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
    with connect(server) as waiting, connect(server) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept)[0] == 200
        waiting.sendall(head.encode() + data)
        time.sleep(0.4)  # uploaded and waiting for others to fill its batch
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)

        with httpx.Client(base_url=server.base, timeout=10) as fresh:
            ready = fresh.get("/readyz")
            assert ready.status_code == 503 and ready.json()["draining"] is True
            r = fresh.post("/v1/segment", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == 503 and r.json()["error"]["reason"] == "draining"
            assert r.headers["Retry-After"] == "1" and r.headers["Connection"] == "close"

        kept.sendall(head.encode() + data)
        status, headers, body = read_response(kept)
        assert status == 503 and body["error"]["reason"] == "draining" and headers["connection"] == "close"
        assert read_until_eof(kept, LINGER_S + 3)[0] == b""

        status, _, body = read_response(waiting)
        answered = time.monotonic()
        assert status == 200 and body["segments"] is not None
    assert server.proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn raises the signal again once stopped
    assert time.monotonic() - answered < 10  # once nothing is open, not at the 30 s drain timeout
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
    log = server.log()
    assert "draining:" in log and "Traceback" not in log
