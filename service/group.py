"""`serve --processes N`: N server processes on one port, supervised, with one /metrics.

gRPC Python serves one interpreter's worth of calls (docs/PERFORMANCE.md measures its floor), so a box
uses all of its cores with several processes, the pattern of gRPC's own multiprocessing example: each
member binds the port with SO_REUSEPORT and the kernel spreads connections over them. Only members of
one group share the port: the group holds a lock file named after the port, and a server outside any
group binds without SO_REUSEPORT, so a second server or group on that port fails as before.

Each member is a whole server (model, index, watcher) over the same index root: the published index
files are memory-mapped where the kind allows, so the page cache holds them once; the live-write log
is shared, and every member follows it before answering (`LiveIndex.catch_up`), so a write one member
acknowledged is seen by a read on any other made after the acknowledgement. The supervisor restarts a
member that dies; what it acknowledged is in the fsync'd log.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.config import ServiceConfig

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # a member loads its model and index within this
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits before restarting a member that keeps dying
STABLE_AFTER_S = 60.0  # a member up this long resets its backoff


class PortInUseError(RuntimeError):
    """Another server or process group holds the port."""


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[tuple[socket.socket, int]]:
    """Bind `host:port` (0: a free one) with SO_REUSEPORT and hold it, not listening, for the group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUseError(f"cannot bind {host}:{port} ({e.strerror}): another server holds it") from None
    try:
        yield sock, int(sock.getsockname()[1])
    finally:
        sock.close()


@contextlib.contextmanager
def port_lock(port: int) -> Iterator[Path]:
    """An exclusive lock named after the port: a second group on the same port fails here."""
    path = Path(tempfile.gettempdir()) / f"onetower-port-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PortInUseError(f"port {port} is held by another onetower process group (lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)


@dataclass
class _Member:
    slot: int
    process: Any = None  # multiprocessing.Process
    started: float = 0.0
    failures: int = 0


@dataclass
class ProcessGroup:
    """A started group: `port`, member pids; `stop()` stops them all."""

    config: ServiceConfig
    processes: int
    port: int = 0
    members: list[_Member] = field(default_factory=list)
    restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _context: Any = None
    _metrics: Any = None
    _metrics_dir: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [m.process.pid for m in self.members if m.process is not None and m.process.is_alive()]

    def _spawn(self, member: _Member, ready: Any) -> None:
        log_level = logging.getLevelName(logging.getLogger().level)
        log_format = "json" if any(type(h).__name__ == "StreamHandler" for h in logging.getLogger().handlers) \
            else "text"
        member.process = self._context.Process(
            target=_member_main, args=(self.config, member.slot, ready, log_format, log_level),
            name=f"onetower-serve-{member.slot}", daemon=False)
        member.process.start()
        member.started = time.monotonic()

    def request_stop(self) -> None:
        """Make `supervise` return (safe from a signal handler)."""
        self._stop.set()

    def supervise(self) -> None:
        """Restart members that exit until `stop()`; blocks."""
        while not self._stop.is_set():
            sentinels = {m.process.sentinel: m for m in self.members if m.process is not None}
            done = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            for sentinel in done:
                member = sentinels[sentinel]  # type: ignore[index]
                if self._stop.is_set():
                    return
                self._restart(member)

    def _restart(self, member: _Member) -> None:
        code = member.process.exitcode
        self._mark_dead(member.process.pid)
        up = time.monotonic() - member.started
        member.failures = 0 if up > STABLE_AFTER_S else member.failures + 1
        wait = RESTART_BACKOFF_S[min(member.failures, len(RESTART_BACKOFF_S)) - 1] if member.failures else 0.0
        logger.warning("serve process %d (pid %d) exited with %s after %.0fs; restarting%s", member.slot,
                       member.process.pid, code, up, f" in {wait:.0f}s" if wait else "",
                       extra={"event": "member_restarted", "exitcode": code})
        if wait and self._stop.wait(wait):
            return
        self.restarts += 1
        self._spawn(member, None)

    def _mark_dead(self, pid: int) -> None:
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, str(self._metrics_dir))

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every member (each finishes its in-flight calls), then SIGKILL what is left after `grace`."""
        self._stop.set()
        alive = [m.process for m in self.members if m.process is not None and m.process.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        if self._metrics is not None:
            self._metrics[0].shutdown()
            self._metrics[0].server_close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        logger.info("process group on port %d stopped", self.port)


def start_group(config: ServiceConfig, processes: int) -> tuple[ProcessGroup, contextlib.ExitStack]:
    """Reserve the port, start `processes` members and wait until each serves.

    Returns the group and the resources it holds (close the stack after `group.stop()`).

    Raises:
        PortInUseError: the port is held by another server or group.
        RuntimeError: a member failed to start (the others are stopped).
    """
    if processes < 2:
        raise ValueError(f"processes={processes}: a group has at least 2 (1 is a plain `serve`)")
    stack = contextlib.ExitStack()
    try:
        _, port = stack.enter_context(reserve_port(config.host, config.port))
        stack.enter_context(port_lock(port))
        swap_dir = Path(tempfile.mkdtemp(prefix="onetower-swap-"))
        stack.callback(shutil.rmtree, swap_dir, True)
        group = ProcessGroup(replace(config, port=port, reuse_port=True, metrics_port=None, swap_dir=swap_dir,
                                     swap_members=processes), processes, port)
        group._context = multiprocessing.get_context("spawn")
        if config.metrics_port is not None:
            group._metrics_dir = Path(tempfile.mkdtemp(prefix="onetower-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(group._metrics_dir)  # inherited by the members
        _start_members(group)
        if config.metrics_port is not None:
            group._metrics = _serve_group_metrics(config.metrics_port, config.metrics_host or config.host,
                                                  group._metrics_dir)
    except BaseException:
        stack.close()
        raise
    return group, stack


def _start_members(group: ProcessGroup) -> None:
    ready = group._context.Queue()
    group.members = [_Member(slot) for slot in range(group.processes)]
    for member in group.members:
        group._spawn(member, ready)
    started = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while started < group.processes:
        try:
            slot, error = ready.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - queue.Empty: check the members are still alive
            dead = [m for m in group.members if m.process.exitcode is not None]
            if dead or time.monotonic() > deadline:
                group.stop(grace=2)
                raise RuntimeError(f"serve process {dead[0].slot if dead else '?'} did not start "
                                   f"(exit code {dead[0].process.exitcode if dead else 'timeout'}); see its log") \
                    from None
            continue
        if error:
            group.stop(grace=2)
            raise RuntimeError(f"serve process {slot} failed to start: {error}")
        started += 1
    logger.info("process group: %d serve processes on port %d (pids %s)", group.processes, group.port,
                ", ".join(map(str, group.pids)), extra={"port": group.port, "processes": group.processes})


def _serve_group_metrics(port: int, host: str, directory: Path | None) -> tuple[Any, Any]:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    server = start_http_server(port, addr=host, registry=registry)
    logger.info("metrics of the group on %s:%d/metrics", host, port)
    return server  # type: ignore[no-any-return]


def _member_main(config: ServiceConfig, slot: int, ready: Any, log_format: str, log_level: str) -> None:
    """One member: a whole server on the shared port until SIGTERM."""
    from service.logs import configure_logging
    from service.server import start_server

    configure_logging(log_format, log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C reaches it
    try:
        running = start_server(replace(config, swap_slot=slot))
    except Exception as e:
        if ready is not None:
            ready.put((slot, f"{type(e).__name__}: {e}"))
        raise
    if ready is not None:
        ready.put((slot, ""))
    logger.info("serve process %d (pid %d) serving on port %d", slot, os.getpid(), running.port)
    stop.wait()
    running.stop()
