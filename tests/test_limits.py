"""The server's limits on what a client sends and how slowly (API.md "Limits on input"): a real `jwtauth serve`
process and raw sockets, since an HTTP client library would not send such requests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from jwtauth.config import Settings

from .conftest import PASSWORD, Server, add_user, start_server, stop_server, table_counts

pytestmark = pytest.mark.sqlite_only  # the HTTP server's limits: the backend plays no part


@pytest.fixture
def server(env: dict[str, str]) -> Iterator[Server]:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server(env)
    yield server
    stop_server(server)


def connect(server: Server, timeout: float = 5) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a close)."""
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


def head_of(size: int) -> bytes:
    """A GET /healthz whose head (request line, headers, blank line) is exactly `size` bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def assert_json_error(reply: bytes, status: int) -> None:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "invalid_request"


def test_a_head_of_exactly_16_kib_is_served(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(head_of(16_384))
        reply = read_reply(sock)

    assert reply.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "head",
    [
        head_of(16_385),
        b"GET /healthz?" + b"q" * 16_400 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a long request line
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 3_000 + b"\r\n",  # many small headers
    ],
    ids=["one-byte-over", "long-request-line", "many-headers"],
)
def test_a_head_over_16_kib_is_refused_with_a_json_431(server: Server, head: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(head)
        reply = read_reply(sock)

    assert_json_error(reply, 431)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2**20 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 100_000 + b"\r\n",
    ],
    ids=["a-1-mib-header", "100000-headers"],
)
def test_the_heads_of_the_attack_report_are_refused(server: Server, head: bytes) -> None:
    """The two heads that were answered 200 before the bound. The server stops reading at 16 KiB and closes
    with the rest unread, which resets the connection: the client may lose the 431 to the reset, or be cut
    off while it still sends. Either way the head is never served."""
    with connect(server) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(head)
        reply = read_reply(sock)

    if reply:
        assert_json_error(reply, 431)
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/healthz").status_code == 200


def resident_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def send_endless_header(server: Server, limit: int = 32 * 2**20) -> int:
    """Send one header that never ends, up to `limit` bytes; return how many went out before the server
    closed the connection."""
    sent = 0
    with connect(server, timeout=10) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            while sent < limit:
                sock.sendall(b"e" * 65_536)
                sent += 65_536
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
    return sent


def test_an_endless_header_does_not_grow_the_server(server: Server) -> None:
    """The attack of issue 15: two connections, each sending 32 MiB of one header, grew the server by 65 MiB."""
    before = resident_kib(server.process.pid)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sent = list(pool.map(lambda _: send_endless_header(server), range(2)))

    assert all(count < 32 * 2**20 for count in sent), sent  # the server hung up long before the end
    assert resident_kib(server.process.pid) - before < 4096
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


LOGIN_HEAD = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
REVOKE = b'{"token": "not-a-token"}'


def silent(sock: socket.socket) -> None:
    """Connects and sends nothing."""


def trickled_head(sock: socket.socket) -> None:
    """Sends a head one header every half second, never ending it."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for number in range(40):
        time.sleep(0.5)
        sock.sendall(b"X-Header-%d: x\r\n" % number)


def stalled_body(sock: socket.socket) -> None:
    """Sends a head and the first bytes of a login's body, then nothing."""
    sock.sendall(LOGIN_HEAD + b'{"email": "alice@example.com", ')


def idle_keep_alive(sock: socket.socket) -> None:
    """Makes one request on a keep-alive connection, then sends nothing."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")


def trickled_body(sock: socket.socket) -> None:
    """Sends a revocation's body a byte every 0.6 s, for longer than the body timeout: slow but alive."""
    sock.sendall(b"POST /revoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(REVOKE))  # fmt: skip
    for byte in REVOKE:
        time.sleep(0.6)
        sock.sendall(bytes([byte]))


def closed_after(server: Server, client: Callable[[socket.socket], None]) -> tuple[float, bytes]:
    """Run a client on a new connection; return the seconds until the server closed it, and what it sent."""
    with connect(server, timeout=30) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the server may close the connection while the client still sends
            client(sock)
        reply = read_reply(sock)
        return time.monotonic() - started, reply


def test_slow_clients_are_closed_after_10_seconds(server: Server) -> None:
    """All at once, so that the test takes the longest of them: about 15 seconds."""
    before = table_counts(server.env["JWTAUTH_DATABASE"])
    clients = [silent, trickled_head, stalled_body, idle_keep_alive, trickled_body]
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        outcomes = dict(zip(clients, pool.map(lambda client: closed_after(server, client), clients), strict=True))

    for client in (silent, trickled_head, stalled_body):
        seconds, reply = outcomes[client]
        assert 9.5 <= seconds <= 12, (client.__name__, seconds)
        assert reply == b"", client.__name__
    seconds, reply = outcomes[idle_keep_alive]
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert 4.5 <= seconds <= 7  # uvicorn's keep-alive timeout
    seconds, reply = outcomes[trickled_body]
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"{}")  # a body that moves is not cut off
    assert seconds > 12
    assert table_counts(server.env["JWTAUTH_DATABASE"]) == before


def test_a_burst_of_idle_connections_does_not_lock_out_new_clients(env: dict[str, str]) -> None:
    """400 connections that send nothing, at a server allowed 256 open files: new clients still get in."""
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server(env, open_files=256)
    idle: list[socket.socket] = []
    try:
        idle.extend(connect(server) for _ in range(400))
        started = time.monotonic()
        response = httpx.post(
            f"{server.url}/login", json={"email": "alice@example.com", "password": PASSWORD}, timeout=5
        )
        seconds = time.monotonic() - started
    finally:
        for sock in idle:
            sock.close()
        stop_server(server)

    assert response.status_code == 200
    assert seconds < 2
