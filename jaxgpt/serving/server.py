"""Running the application under uvicorn: binding, the ready line, graceful shutdown.

Shutdown on Ctrl-C / SIGTERM: uvicorn stops accepting at once; the scheduler then gives the
running requests `grace` seconds to finish and ends the rest with a final error event, so every
connection closes and the process exits 0 (a second Ctrl-C forces the exit). uvicorn would
re-raise the signal after its graceful shutdown (exit status 130 / -15); a stop that was asked
for is a clean exit here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import threading

import uvicorn


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening; OSError (e.g. the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, draining the scheduler on shutdown and calling `on_ready(url)` once bound."""

    def __init__(self, app, sock: socket.socket, *, grace: float | None = None, on_ready=None,
                 log_level: str = "warning"):
        grace = app.state.shutdown_grace if grace is None else grace
        super().__init__(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                        timeout_graceful_shutdown=grace + 2.0))
        self.sock, self.grace, self.on_ready = sock, grace, on_ready
        self.scheduler = app.state.scheduler
        self.url = url_of(sock)

    def run(self, sockets=None) -> None:
        asyncio.run(self.serve(sockets=[self.sock]))

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True  # not recorded: no re-raise after the graceful shutdown

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if should_exit:
            self.scheduler.drain(self.grace)
        return should_exit

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit and self.on_ready is not None:
            self.on_ready(self.url)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, **kwargs) -> tuple[Server, threading.Thread]:
    """Starts the app on (host, port) in a background thread; returns once it accepts connections.

    For the tests and the serving benchmark. Stop it with `server.should_exit = True` and
    `thread.join()`.
    """
    ready = threading.Event()
    server = Server(app, bind(host, port), on_ready=lambda url: ready.set(), **kwargs)
    thread = threading.Thread(target=server.run, name="jaxgpt-uvicorn", daemon=True)
    thread.start()
    while not ready.wait(0.05):
        if not thread.is_alive():
            raise RuntimeError("the server stopped during start-up")
    return server, thread
