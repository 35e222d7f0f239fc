"""Running the app under uvicorn, and how it stops.

SIGTERM or Ctrl-C: uvicorn stops accepting connections and waits for the running
requests; a stream sees ``stopping()`` turn true and ends at its next token with an
error event, so shutdown waits at most one token per stream. Then the app's lifespan
closes the engines.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn
from fastapi import FastAPI

from .app import ServeSettings


class Server(uvicorn.Server):
    """uvicorn's server, minus raising the stop signal again after the graceful shutdown.

    uvicorn re-raises SIGTERM / SIGINT once it has shut down, so the process would end
    killed by the signal (or with a KeyboardInterrupt through click). dera-serve has
    finished its work by then (streams ended, engines closed), so it exits with status 0.
    A second Ctrl-C still forces the exit (uvicorn's ``handle_exit``).
    """

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run(app: FastAPI, settings: ServeSettings, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C; ``settings.stopping`` follows the server's state."""
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    settings.stopping = lambda: server.should_exit
    server.run()
