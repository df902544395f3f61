"""Run the app under uvicorn: `serve(engine, ...)` in the main thread (the CLI: SIGINT and
SIGTERM stop it), or `ServerThread` (tests, benchmarks) on a thread.

Shutdown: uvicorn stops accepting, lets in-flight requests finish for up to
`shutdown_timeout` seconds, then cancels them (a cancelled stream aborts its requests);
then the engine loop aborts whatever is left and its thread is joined.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
from contextlib import asynccontextmanager

from jaxrt.errors import SettingError

from .app import ServerConfig, create_app
from .engine_loop import EngineLoop
from .metrics import ServerMetrics


def build_app(engine, *, model_name: str, api_key: str | None = None,
              max_pending: int = 256, max_body_bytes: int = 8 << 20):
    """(app, loop): the loop's thread starts with the app's lifespan and stops with it."""
    metrics = ServerMetrics(model_name)
    loop = EngineLoop(engine, max_pending=max_pending, metrics=metrics)
    config = ServerConfig(model_name, api_key, max_body_bytes)
    app = create_app(loop, config, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        loop.start()
        try:
            yield
        finally:
            loop.shutdown()

    app.router.lifespan_context = lifespan
    return app, loop


def _uvicorn_server(app, host: str, port: int, shutdown_timeout: float, on_ready=None):
    import asyncio
    import time

    import uvicorn
    loop: EngineLoop = app.state.loop

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:  # listening, lifespan started
                on_ready()

        def handle_exit(self, sig, frame):
            # uvicorn re-raises a captured SIGINT/SIGTERM after its shutdown (exit 130 /
            # killed by the signal); a clean stop of `jaxrt serve` is exit 0. A second
            # SIGINT still forces the exit.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def shutdown(self, sockets=None):
            # New requests get 503; accepted ones get shutdown_timeout seconds to finish,
            # then are aborted by the engine loop, so their streams end with an "abort"
            # chunk and [DONE] before uvicorn closes the connections.
            loop.drain()
            deadline = time.monotonic() + shutdown_timeout
            while loop.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(loop.shutdown)
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on")
    return Server(config)


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or SettingError (an unknown or foreign host, a port
    out of range or in use). The CLI binds before loading the model, so a bad --host
    fails at once instead of after the load and warm-up."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise SettingError(f"--port must be in [0, 65535], got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, UnicodeError, ValueError, TypeError) as e:  # unknown or unencodable
        sock.close()
        why = getattr(e, "strerror", None) or e
        raise SettingError(f"--host/--port: cannot listen on {host!r}:{port}: "
                           f"{why}") from None
    return sock


def serve(engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_pending: int = 256, max_body_bytes: int = 8 << 20,
          shutdown_timeout: float = 10.0, out=sys.stdout,
          sock: socket.socket | None = None) -> None:
    """Serve until SIGINT or SIGTERM (main thread). Prints one line once ready. `sock`:
    a socket from `bind_listener(host, port)` (else it is bound here)."""
    app, _ = build_app(engine, model_name=model_name, api_key=api_key,
                       max_pending=max_pending, max_body_bytes=max_body_bytes)
    if sock is None:
        sock = bind_listener(host, port)
    line = (f"jaxrt: serving {model_name} on http://{host}:{sock.getsockname()[1]}/v1 "
            f"(max_model_len {engine.max_model_len})")
    server = _uvicorn_server(app, host, port, shutdown_timeout,
                             on_ready=lambda: print(line, file=out, flush=True))
    server.run(sockets=[sock])


class ServerThread:
    """A server on a background thread, on 127.0.0.1 and a free port:

        with ServerThread(engine, model_name="m") as srv:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x")...
    """

    def __init__(self, engine, *, model_name: str, api_key: str | None = None,
                 max_pending: int = 256, max_body_bytes: int = 8 << 20,
                 shutdown_timeout: float = 5.0):
        self.app, self.loop = build_app(engine, model_name=model_name, api_key=api_key,
                                        max_pending=max_pending,
                                        max_body_bytes=max_body_bytes)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _uvicorn_server(self.app, "127.0.0.1", self.port, shutdown_timeout)
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="jaxrt-http")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        import time
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
