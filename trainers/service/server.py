"""Runs the service under uvicorn: prints the URL once it accepts requests, stops on SIGTERM.

Uvicorn handles SIGTERM and SIGINT: it stops accepting, finishes open requests, and the
app's shutdown stops the scheduler after its current request. Whatever is in flight when
the process dies harder (SIGKILL) is redone on the next start (``Executor.restore``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket

import uvicorn

from trainers.service.app import create_app
from trainers.service.config import ServiceConfig
from trainers.service.service import Service


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """SIGTERM/SIGINT start the graceful shutdown; unlike uvicorn's own handling the
        signal is not re-raised afterwards, so a clean stop exits with status 0."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"trillora service listening on http://127.0.0.1:{port}", flush=True)


def serve(cfg: ServiceConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    config = uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=10)
    _Server(config).run(sockets=[sock])
