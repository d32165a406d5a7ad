"""Run the explorer's app with uvicorn: in a background thread (beside a server, in tests) or in the foreground."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import uvicorn

from service.explorer.app import create_app
from service.explorer.backend import Explorer
from service.explorer.catalog import load_catalog
from service.explorer.config import ExplorerConfig

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


def _server(config: ExplorerConfig) -> tuple[uvicorn.Server, Explorer]:
    explorer = Explorer(config, load_catalog(config.catalog))
    app = create_app(explorer)
    settings = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                              lifespan="off", timeout_graceful_shutdown=2)
    return uvicorn.Server(settings), explorer


def _url(server: uvicorn.Server, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{shown}:{port}/"


def start_explorer(config: ExplorerConfig) -> tuple[str, Callable[[], None]]:
    """Serve the explorer in a daemon thread; returns its URL and a function that stops it.

    Raises:
        RuntimeError: the port could not be bound within START_TIMEOUT_S.
    """
    server, explorer = _server(config)
    thread = threading.Thread(target=server.run, name="onetower-explorer", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            explorer.close()
            raise RuntimeError(f"the explorer could not listen on {config.host}:{config.port} (in use?)")
        time.sleep(0.02)
    url = _url(server, config.host)
    logger.info("explorer on %s (service %s)", url, config.target)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        explorer.close()

    return url, stop


def serve_explorer(config: ExplorerConfig, on_ready: Callable[[str], None]) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM (then return); `on_ready(url)` once the port is open."""
    server, explorer = _server(config)
    thread = threading.Thread(target=_announce, args=(server, config.host, on_ready), daemon=True)
    thread.start()
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again: both end here as KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        explorer.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _announce(server: uvicorn.Server, host: str, on_ready: Callable[[str], None]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and not server.should_exit and time.monotonic() < deadline:
        time.sleep(0.02)
    if server.started:
        on_ready(_url(server, host))
