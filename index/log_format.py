"""The live-write log's file format: checksummed frames of JSON records, and scanning them.

Frame: ``u32 length | u32 crc32(payload) | payload`` (little endian); the payload is a JSON record.
A torn tail (the process died mid-append) is left out of a scan; a damaged frame before the end stops
it with `CorruptLogError`, since skipping it would lose acknowledged writes.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from index.errors import CorruptLogError

HEADER = struct.Struct("<II")
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
    # when the write was made (ms since the epoch, the writer's clock): a reindex lets a catalog row updated
    # at or after it replace it (`index.compact.reconcile_log`); 0: unknown (records of older versions)
    written_ms: int = 0

    def to_bytes(self) -> bytes:
        content = dict(self.content)
        content["images"] = [base64.b64encode(bytes(b)).decode() for b in content.get("images", ())]
        body = {"op": self.op, "item_id": self.item_id, "model_version": self.model_version,
                "content": content, "content_hash": self.content_hash, "written_ms": self.written_ms,
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
                   content=content, content_hash=body.get("content_hash", ""),
                   written_ms=int(body.get("written_ms") or 0))


def frame_intact(data: bytes, pos: int) -> bool:
    """Whether a whole frame with a matching checksum starts at `pos` (empty payloads never do)."""
    if pos + HEADER.size > len(data):
        return False
    length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    return 0 < length <= MAX_RECORD_BYTES and end <= len(data) and zlib.crc32(data[pos + HEADER.size: end]) == crc


def _next_intact(data: bytes, start: int, chunk: int = 1 << 20) -> int | None:
    """The first byte offset at or after `start` where an intact frame begins, or None."""
    buf = np.frombuffer(data, dtype=np.uint8)
    last = len(data) - HEADER.size  # exclusive: a frame needs its header and a non-empty payload
    for lo in range(start, last, chunk):
        hi = min(lo + chunk, last)
        b = buf[lo: hi + 3].astype(np.int64)
        n = hi - lo
        lengths = b[:n] | b[1: n + 1] << 8 | b[2: n + 2] << 16 | b[3: n + 3] << 24  # u32 LE at each offset
        room = np.minimum(last - np.arange(lo, hi), MAX_RECORD_BYTES)
        for off in np.flatnonzero((lengths > 0) & (lengths <= room)):  # only these can hold a whole frame
            if frame_intact(data, lo + int(off)):
                return lo + int(off)
    return None


def encode_frame(record: LogRecord) -> bytes:
    payload = record.to_bytes()
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class LogEntry(NamedTuple):
    """Where one record lies in the log, and what replay and compaction need of it without its content."""

    op: str
    item_id: str
    model_version: str
    content_hash: str
    offset: int  # of the frame's header
    size: int  # of the whole frame, header included
    crc: int


def entry_of(record: LogRecord, offset: int, frame: bytes) -> LogEntry:
    return LogEntry(record.op, record.item_id, record.model_version, record.content_hash, offset, len(frame),
                    HEADER.unpack_from(frame)[1])


def scan_frames(fd: int, path: Path, pos: int = 0, first: int = 0) -> tuple[list[LogEntry], int]:
    """The entries of every intact frame from byte `pos` (frame number `first`), and where they end
    (a torn tail is left out).

    Raises:
        CorruptLogError: a damaged or unreadable frame that intact frames follow.
    """
    size = os.fstat(fd).st_size
    entries: list[LogEntry] = []
    while pos + HEADER.size <= size:
        length, crc = HEADER.unpack(os.pread(fd, HEADER.size, pos))
        frame_size = HEADER.size + length
        payload = os.pread(fd, length, pos + HEADER.size) if 0 < length <= min(MAX_RECORD_BYTES, size) else b""
        if len(payload) != length or length == 0 or zlib.crc32(payload) != crc:
            # A damaged frame with no intact frame after it is the tail the process died writing
            # (a partial frame, or garbage/zeros the filesystem left); anything else lost acknowledged writes.
            rest = os.pread(fd, size - pos, pos)
            following = _next_intact(rest, 1)
            if following is None:
                break
            raise CorruptLogError(
                f"{path}: frame {first + len(entries)} at byte {pos} is damaged (checksum mismatch) and "
                f"intact frames follow it from byte {pos + following}; refusing to drop acknowledged writes")
        try:
            body = json.loads(payload)
            entries.append(LogEntry(str(body["op"]), str(body["item_id"]), str(body.get("model_version", "")),
                                    str(body.get("content_hash", "")), pos, frame_size, crc))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptLogError(f"{path}: frame {first + len(entries)} at byte {pos} is unreadable: {e}") from None
        pos += frame_size
    return entries, pos


