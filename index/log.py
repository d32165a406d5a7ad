"""The live-write log: append-only, checksummed frames, fsync'd before a write is acknowledged.

Frame: ``u32 length | u32 crc32(payload) | payload`` (little endian); the payload is a JSON record.
A torn tail (the process died mid-append) is dropped and truncated on open; a damaged frame
before the end stops the load with `CorruptLogError`, since skipping it would lose acknowledged writes.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.errors import CorruptLogError, LogRewrittenError
from index.fsio import fsync_dir

logger = logging.getLogger(__name__)

LOG_FILE = "live.log"  # the log's name under an index root
_HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LogRecord:
    """One live write. `op` is "upsert" (content, vector and model version set) or "delete"."""

    op: str
    item_id: str
    model_version: str = ""
    vector: np.ndarray | None = None  # float32 (dim,)
    content: Mapping[str, Any] = field(default_factory=dict)  # title, description, attributes, images (bytes)
    content_hash: str = ""

    def to_bytes(self) -> bytes:
        content = dict(self.content)
        content["images"] = [base64.b64encode(bytes(b)).decode() for b in content.get("images", ())]
        body = {"op": self.op, "item_id": self.item_id, "model_version": self.model_version,
                "content": content, "content_hash": self.content_hash,
                "vector": None if self.vector is None else
                base64.b64encode(np.asarray(self.vector, dtype="<f4").tobytes()).decode()}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LogRecord:
        body = json.loads(data)
        content = dict(body.get("content") or {})
        content["images"] = [base64.b64decode(b) for b in content.get("images", ())]
        vector = body.get("vector")
        return cls(op=body["op"], item_id=body["item_id"], model_version=body.get("model_version", ""),
                   vector=None if vector is None else np.frombuffer(base64.b64decode(vector), dtype="<f4").copy(),
                   content=content, content_hash=body.get("content_hash", ""))


def _intact(data: bytes, pos: int) -> bool:
    """Whether a whole frame with a matching checksum starts at `pos` (empty payloads never do)."""
    if pos + _HEADER.size > len(data):
        return False
    length, crc = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    return 0 < length <= MAX_RECORD_BYTES and end <= len(data) and zlib.crc32(data[pos + _HEADER.size: end]) == crc


def _next_intact(data: bytes, start: int, chunk: int = 1 << 20) -> int | None:
    """The first byte offset at or after `start` where an intact frame begins, or None."""
    buf = np.frombuffer(data, dtype=np.uint8)
    last = len(data) - _HEADER.size  # exclusive: a frame needs its header and a non-empty payload
    for lo in range(start, last, chunk):
        hi = min(lo + chunk, last)
        b = buf[lo: hi + 3].astype(np.int64)
        n = hi - lo
        lengths = b[:n] | b[1: n + 1] << 8 | b[2: n + 2] << 16 | b[3: n + 3] << 24  # u32 LE at each offset
        room = np.minimum(last - np.arange(lo, hi), MAX_RECORD_BYTES)
        for off in np.flatnonzero((lengths > 0) & (lengths <= room)):  # only these can hold a whole frame
            if _intact(data, lo + int(off)):
                return lo + int(off)
    return None


def _frame(record: LogRecord) -> bytes:
    payload = record.to_bytes()
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class WriteLog:
    """An append-only file of `LogRecord`s. Thread-safe; `append` returns only after fsync.

    Several processes may hold one path open (a server appending, a reindex job folding and
    truncating): `append`, `truncate` and opening take an advisory lock (`flock`) on the file,
    and a `WriteLog` that finds the file replaced by another process's `truncate`, or grown by
    another's appends, rereads it first. `records` is this object's view as of its last
    open, append or truncate; records another process wrote since show up only after one of those.
    The lock is advisory and POSIX-only: every writer must go through `WriteLog`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._records: list[LogRecord] = []
        self._end = 0  # bytes of intact frames this object has read or written
        self._file = path.open("ab", buffering=0)  # unbuffered: a failed write leaves no bytes behind to flush later
        try:
            with self._file_lock():
                pass  # taking the lock reads the file
        except BaseException:
            self._file.close()
            raise

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Hold `flock` on the file that `path` names now, reread first if another process changed it."""
        while True:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            if not self._replaced():
                break
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)  # a truncate renamed a new file over ours
            self._file.close()
            self._file = self.path.open("ab", buffering=0)
            self._end = -1
        try:
            if os.fstat(self._file.fileno()).st_size != self._end:
                self._reload()
            yield
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def _replaced(self) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self._file.fileno())
        return (named.st_ino, named.st_dev) != (own.st_ino, own.st_dev)

    def _reload(self) -> None:
        """Read every record and drop a torn tail (caller holds the file lock, so no append is under way)."""
        self._records, good_end = self._scan()
        size = os.fstat(self._file.fileno()).st_size
        if size != good_end:
            logger.warning("%s: dropping a torn tail of %d bytes", self.path, size - good_end)
            self._file.truncate(good_end)
            os.fsync(self._file.fileno())
        self._end = good_end

    def _scan(self) -> tuple[list[LogRecord], int]:
        data = self.path.read_bytes()
        records: list[LogRecord] = []
        pos = 0
        while pos < len(data):
            if pos + _HEADER.size > len(data):
                break  # torn header at the tail
            length, _ = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            payload = data[pos + _HEADER.size: end]
            if not _intact(data, pos):
                # A damaged frame with no intact frame after it is the tail the process died writing
                # (a partial frame, or garbage/zeros the filesystem left); anything else lost acknowledged writes.
                following = _next_intact(data, pos + 1)
                if following is None:
                    break
                raise CorruptLogError(
                    f"{self.path}: frame {len(records)} at byte {pos} is damaged (checksum mismatch) and "
                    f"intact frames follow it from byte {following}; refusing to drop acknowledged writes")
            try:
                records.append(LogRecord.from_bytes(payload))
            except (ValueError, KeyError) as e:
                raise CorruptLogError(f"{self.path}: frame {len(records)} at byte {pos} is unreadable: {e}") from None
            pos = end
        return records, pos

    @property
    def records(self) -> list[LogRecord]:
        """Every record read at open (or at the last reread) plus those appended since, in order."""
        with self._lock:
            return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def append(self, records: Iterable[LogRecord]) -> None:
        """Write and fsync `records`; raises OSError (e.g. ENOSPC, EIO) without acknowledging them."""
        batch = list(records)
        data = b"".join(_frame(r) for r in batch)
        with self._lock, self._file_lock():
            fd = self._file.fileno()
            try:
                view = memoryview(data)
                while view:  # O_APPEND; a short write (the disk filled up) goes on until it raises
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, self._end)  # do not leave half a batch behind
                except OSError as e:  # e.g. EIO, or a device that cannot be truncated: the next open drops the tail
                    logger.error("%s: could not cut a failed append back to byte %d: %s", self.path, self._end, e)
                raise
            self._records.extend(batch)
            self._end += len(data)

    def truncate(self, keep_from: int = 0) -> None:
        """Drop records before index `keep_from` (after they were folded into a published index).

        Records appended after this object read the log, by it or by another process, are kept:
        the file is reread under the lock and only its first `keep_from` records are dropped.

        Raises:
            LogRewrittenError: another process truncated the log since this object read it, so
                its first `keep_from` records are no longer the ones this object saw.
        """
        if keep_from < 0:
            raise ValueError(f"keep_from={keep_from} must be >= 0")
        with self._lock:
            seen = self._records
            with self._file_lock():
                if self._records is not seen and not _same_prefix(seen, self._records, keep_from):
                    raise LogRewrittenError(f"{self.path}: rewritten by another process since it was read; "
                                            f"refusing to drop its first {keep_from} records")
                kept = self._records[keep_from:]
                data = b"".join(_frame(r) for r in kept)
                tmp = self.path.with_suffix(".tmp")
                with tmp.open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                fsync_dir(self.path.parent)
            self._file.close()  # after unlocking: the replaced file's lock goes with it
            self._file = self.path.open("ab", buffering=0)
            self._records, self._end = kept, len(data)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _same_prefix(a: list[LogRecord], b: list[LogRecord], n: int) -> bool:
    """Whether the first `n` records of `a` (or all it has) start `b` too."""
    m = min(n, len(a))
    return len(b) >= m and all(x.to_bytes() == y.to_bytes() for x, y in zip(a[:m], b[:m], strict=True))
