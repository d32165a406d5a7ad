"""An HTTP/1.1 proxy on loopback in front of a real server that can start hanging: it keeps accepting
connections and reading requests but never answers the ones it is told to hang (all of them, or those
whose path contains a marker, e.g. the artifact downloads). What a registry behind a stuck load balancer
or a frozen process looks like, unlike a dead one (connection refused)."""

from __future__ import annotations

import contextlib
import socket
import threading


class HangingProxy:
    """Forwards each request to `upstream` unless `hang(path)` says to hold it; `hanging` switches it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hang_paths: tuple[str, ...] | None = None  # None: forward all; (): hang all; else hang matching paths
        self.held: list[str] = []  # request lines held unanswered
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self, paths: tuple[str, ...] = ()) -> None:
        """From now on hold requests whose path contains one of `paths` (every request when empty)."""
        self.hang_paths = paths
        self._drop_connections()  # kept-alive connections would otherwise carry requests past the check

    def forward(self) -> None:
        self.hang_paths = None
        self._drop_connections()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._drop_connections()

    def _holds(self, path: str) -> bool:
        paths = self.hang_paths
        return paths is not None and (not paths or any(p in path for p in paths))

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _drop_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Read requests one by one (head + Content-Length body); forward each or hold it forever."""
        upstream: socket.socket | None = None
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buffer) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                body, buffer = buffer[:length], buffer[length:]
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                if self._holds(request_line.split(" ")[1] if " " in request_line else ""):
                    self.held.append(request_line)
                    while client.recv(65536):  # hold it: read whatever comes, answer nothing
                        pass
                    return
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                    self._track(upstream)
                    threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
                upstream.sendall(head + b"\r\n\r\n" + body)
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
