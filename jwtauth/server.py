"""The HTTP server of `jwtauth serve`: uvicorn with its httptools parser, bounded against greedy and slow clients.

uvicorn does not bound what the httptools parser buffers (uvicorn#157): a header that never ends is kept whole,
and a connection that never completes its request stays open. LimitedHttpToolsProtocol keeps httptools' speed
and adds the limits of API.md ("Limits on input"): it counts the bytes of each request head, closes a
connection that waits too long on its client, and, near the process's file limit, closes the connection that
has waited longest on its client so that a burst of idle connections cannot lock new clients out. The cost is
a few attribute updates per read and about one timer per connection and request. With one worker per usable
CPU, each worker keeps to a CPU of its own (take_cpu).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import resource
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import uvicorn
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess

from jwtauth.logs import skip_unused_record_fields

MAX_HEAD_BYTES = 16_384  # request line and headers (API.md); a head over it gets 431
HEAD_TIMEOUT_SECONDS = 10.0  # for a complete head, from the connection or from the previous response
BODY_TIMEOUT_SECONDS = 10.0  # without a byte while a request body is incomplete
KEEP_ALIVE_SECONDS = 5  # an idle connection between requests (uvicorn's default, said here)
# File descriptors kept for everything but client connections: a SQLite connection (and its WAL and shared
# memory files) per worker thread, the keys, the logs, the event loop's own.
RESERVED_FILES = 128

log = logging.getLogger("jwtauth")
T = TypeVar("T")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on request heads, timeouts on slow clients and a ceiling on
    connections; its own errors (a malformed request, a head too large) are JSON like the app's."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.is_in_body = False  # between the end of a request's head and the end of its body
        self.head_bytes = 0  # bytes received of the head being read
        self.heads_done = 0  # heads read so far on this connection
        self.feeding = 0  # length of the bytes being parsed now
        self.message_ended = False  # whether a request ended in the bytes being parsed now
        self.waiting_since = 0.0  # when the connection began to wait on its client (loop time)
        self.deadline: float | None = None  # when it is closed unless its client makes progress
        self.timer: asyncio.TimerHandle | None = None

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.wait_for_head()
        if len(self.connections) > max_connections():
            self.make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.message_ended = False
        if self.is_in_body:
            self.deadline = self.loop.time() + BODY_TIMEOUT_SECONDS
        elif len(data) <= MAX_HEAD_BYTES - self.head_bytes:
            self.head_bytes += len(data)
        else:
            self.receive_beyond_head_limit(data)
            return
        self.feeding = len(data)
        super().data_received(data)

    def receive_beyond_head_limit(self, data: bytes) -> None:
        """Parse only what fits, since httptools would buffer a header of any length; refuse the head if it
        does not end there, else go on with the rest."""
        room, heads_done = MAX_HEAD_BYTES - self.head_bytes, self.heads_done
        self.head_bytes, self.feeding = MAX_HEAD_BYTES, room
        if room:
            super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self.heads_done == heads_done:
            self.refuse(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
            return
        self.data_received(data[room:])

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, "malformed HTTP request")

    def refuse(self, status: int, description: str) -> None:
        """Answer with a JSON error and close. While the app answers an earlier request (pipelined), just close:
        the client would take an answer now for that request's."""
        cycle = self.cycle
        in_own_body = self.is_in_body and not self.pipeline and not cycle.response_started
        if cycle is None or cycle.response_complete or in_own_body:
            if cycle is not None:  # the app, still reading this request, must not answer after us
                cycle.disconnected = True
                cycle.message_event.set()
            body = json.dumps({"error": "invalid_request", "error_description": description}, separators=(",", ":"))
            head = [STATUS_LINE[status]]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\n",
                     b"content-length: %d\r\n\r\n" % len(body)]  # fmt: skip
            self.transport.write(b"".join([*head, body.encode()]))
        self.transport.close()

    # The parser's callbacks

    def on_message_begin(self) -> None:
        if self.message_ended:  # a pipelined request began inside these bytes: count them all as its head
            self.head_bytes = self.feeding
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.heads_done += 1
        self.is_in_body = True
        self.deadline = self.loop.time() + BODY_TIMEOUT_SECONDS
        if self.timer is None:
            self.arm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.is_in_body = False
        self.head_bytes = 0
        self.message_ended = True
        self.deadline = None  # the app has the request: the client waits for us
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.is_in_body and not self.pipeline:  # answered before its body ended (413): read no more of it
            self.transport.close()
        super().on_response_complete()
        if not self.transport.is_closing():
            self.waiting_since = self.loop.time()
            self.deadline = self.waiting_since + HEAD_TIMEOUT_SECONDS
            if self.timer is None:
                self.arm()

    # Deadlines

    def wait_for_head(self) -> None:
        self.waiting_since = self.loop.time()
        self.deadline = self.waiting_since + HEAD_TIMEOUT_SECONDS
        self.arm()

    def arm(self) -> None:
        """One timer at a time: it goes off at the deadline it was set for and looks at the current one."""
        if self.timer is None and self.deadline is not None:
            self.timer = self.loop.call_at(self.deadline, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        if self.deadline is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # we stopped reading (a pipelined request waits), not the client
            self.deadline = now + (BODY_TIMEOUT_SECONDS if self.is_in_body else HEAD_TIMEOUT_SECONDS)
        if now < self.deadline:
            self.arm()
        elif self.is_waiting_on_client():
            self.transport.close()
        else:
            self.deadline = None  # a pipelined head, read while the app works: its time starts at the response

    def is_waiting_on_client(self) -> bool:
        """Whether the connection waits for its client's bytes rather than for the app."""
        return self.is_in_body or self.cycle is None or self.cycle.response_complete

    def make_room(self) -> None:
        """Close the connection that has waited longest on its client, which may be this new one."""
        ours = [c for c in self.connections if isinstance(c, LimitedHttpToolsProtocol)]
        open_ = [connection for connection in ours if not connection.transport.is_closing()]  # not closed just now
        if len(open_) > max_connections():
            waiting = [connection for connection in open_ if connection.is_waiting_on_client()]  # this one too
            min(waiting, key=lambda connection: connection.waiting_since).transport.close()


@functools.cache
def max_connections() -> int:
    """Connections a worker keeps open at once: what its file limit leaves beside RESERVED_FILES."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, soft - RESERVED_FILES)


# One CPU per worker
#
# With as many workers as usable CPUs, each worker keeps its threads (the event loop's and those that wait for
# the database) to a CPU of its own, like nginx's worker_cpu_affinity. Left to the scheduler, a worker's threads
# spread over the CPUs: every hand-over of Python's GIL between its event loop and a thread waiting for
# PostgreSQL then wakes a thread on another CPU, and two workers at times share one CPU while another idles.
# Argon2 is the exception: a password check may use every CPU, as its lanes run in parallel (p=4 by default).


@dataclass(frozen=True, slots=True)
class _Pin:
    cpu: int  # this worker's
    every_cpu: set[int]  # the server's, for Argon2
    slot: IO[str]  # the locked slot file, held open for the life of the process


_pin: _Pin | None = None  # once this worker has taken a CPU


def make_cpu_slots(workers: int) -> Path | None:
    """In `jwtauth serve`, before the workers start: if there are `workers` > 1 usable CPUs, a directory with a
    slot file per CPU, for the workers' JWTAUTH_CPU_SLOTS; else None (the scheduler places them)."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers < 2 or workers != len(cpus):
        return None
    directory = Path(tempfile.mkdtemp(prefix="jwtauth-cpus-"))
    for cpu in cpus:
        (directory / f"cpu-{cpu}").touch()
    return directory


def take_cpu(slots: Path | None) -> int | None:
    """In a worker, at start: lock the first free slot of make_cpu_slots and keep every thread of this process
    (and those it starts later) to that CPU. The lock ends with the process, so a worker that replaces a dead one
    takes the CPU it left; a worker that found none free tries again when called again. Returns the CPU, or None
    if the server runs without slots or none is free."""
    global _pin
    if slots is None or _pin is not None:
        return _pin.cpu if _pin else None
    every_cpu = os.sched_getaffinity(0)
    for cpu in sorted(every_cpu):
        try:
            slot = open(slots / f"cpu-{cpu}")  # noqa: SIM115 - held open while the process lives
        except OSError:  # not made by make_cpu_slots: left to the scheduler
            return None
        try:
            fcntl.flock(slot, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another worker's
            slot.close()
            continue
        _pin = _Pin(cpu, every_cpu, slot)
        for thread in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(int(thread), {cpu})
        log.info("worker %d keeps to CPU %d", os.getpid(), cpu)
        return cpu
    return None


def start_worker(cpu_slots: Path | None) -> None:
    """What each worker process does before its application is built (jwtauth's, or the bench's bare one):
    spare its log records the fields that no format writes, and keep to a CPU of its own (take_cpu)."""
    skip_unused_record_fields()
    take_cpu(cpu_slots)


def on_every_cpu(call: Callable[[], T]) -> T:
    """Run `call` in this thread free to use every CPU of the server (Argon2's lanes); then back to the
    worker's CPU."""
    pin = _pin
    if pin is None:
        return call()
    try:
        os.sched_setaffinity(0, pin.every_cpu)
    except OSError:  # the server's CPUs changed since it started (a cgroup's cpuset): the check runs where it is
        return call()
    try:
        return call()
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {pin.cpu})


def run_server(app: str, host: str, port: int, workers: int, log_config: dict[str, Any]) -> None:
    """Serve the ASGI app factory `app` ("module:function") until interrupted."""
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "http": f"{__name__}:{LimitedHttpToolsProtocol.__name__}",
        "ws": "none",  # no endpoint speaks WebSocket: an upgrade request is an ordinary request
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "lifespan": "on",
        "proxy_headers": False,  # the app reads X-Forwarded-For itself, from JWTAUTH_TRUSTED_PROXIES only
        "server_header": False,
        "log_config": log_config,
    }
    if workers < 2 or not sys.platform.startswith("linux"):  # elsewhere SO_REUSEPORT does not spread connections
        uvicorn.run(app, **options)
        return
    config = Config(app, **options)
    port_holder = bind_port_holder(config)
    with contextlib.suppress(KeyboardInterrupt), port_holder:
        Multiprocess(config, sockets=[port_holder]).run()


# A listening socket per worker
#
# uvicorn's workers share one listening socket, and a worker's event loop accepts every connection waiting on it
# when it wakes: a burst of new connections lands on one worker, which then serves them all while the other
# idles. Here the supervisor only holds the port: each worker listens on a socket of its own, bound to the same
# address with SO_REUSEPORT, and Linux spreads new connections over them by a hash of their addresses (nginx's
# `reuseport`). The price: connections still waiting in a worker's queue when it ends (it died, or SIGHUP
# replaced it) are reset, where a shared socket would have kept them for the other workers.


class PortHolder(socket.socket):
    """The supervisor's socket: bound with SO_REUSEPORT, never listening, so it takes no connection. Handed to a
    worker, it becomes a listening socket of the worker's own on the same address (its __reduce__)."""

    def __reduce__(self) -> tuple[Callable[..., socket.socket], tuple[Any, ...]]:
        return worker_listener, (self.family, self.getsockname())


def bind_port_holder(config: Config) -> PortHolder:
    """The PortHolder for uvicorn's host and port, bound as uvicorn's Config.bind_socket binds its socket.

    SO_REUSEPORT would let it share a port that another server of the same user listens on (a second
    `jwtauth serve`, one not yet stopped), which would then take some of the connections: the address is
    first bound without it, which fails as uvicorn's own socket would if anything listens there."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    holder = PortHolder(family)
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((config.host, config.port))
            address = probe.getsockname()  # port 0: the one the system chose
        bind_shared(holder, address)
    except OSError as exc:
        holder.close()
        logging.getLogger("uvicorn.error").error(exc)
        sys.exit(STARTUP_FAILURE)
    host, port = holder.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port)
    return holder


def worker_listener(family: socket.AddressFamily, address: tuple[Any, ...]) -> socket.socket:
    """In a worker, as it starts: a socket of its own on the supervisor's address; uvicorn makes it listen."""
    sock = socket.socket(family)
    try:
        bind_shared(sock, address)
    except OSError as exc:  # no file left, say: uvicorn stops, as it does for any worker that cannot start
        sock.close()
        print(f"jwtauth: a worker cannot listen on {address[0]}:{address[1]}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    return sock


def bind_shared(sock: socket.socket, address: tuple[Any, ...]) -> None:
    """Bind `sock` to `address` as one of the sockets that share it (SO_REUSEPORT), like uvicorn's with
    SO_REUSEADDR, so that a restart does not wait for the old connections' TIME_WAIT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
