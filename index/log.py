"""The live-write log: append-only, checksummed frames, fsync'd before a write is acknowledged.

Frame: ``u32 length | u32 crc32(payload) | payload`` (little endian); the payload is a JSON record.
A torn tail (the process died mid-append) is dropped and truncated on open; a damaged frame
before the end stops the load with `CorruptLogError`, since skipping it would lose acknowledged writes.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from index.errors import IndexLayerError, LogRewrittenError
from index.fsio import fsync_dir, make_dirs
from index.log_format import (
    HEADER,
    LogEntry,
    LogRecord,
    encode_frame,
    entry_of,
    frame_intact,
    scan_frames,
)

logger = logging.getLogger(__name__)

LOG_FILE = "live.log"  # the log's name under an index root
REWRITES_KEPT = 16  # generations of own rewrites `translate` can follow a reader through
COMPACT_MIN_BYTES = 1 << 20  # superseded bytes below this are never worth a rewrite


class WriteLog:
    """An append-only file of `LogRecord`s. Thread-safe; `append` returns only after fsync.

    Memory holds one small `LogEntry` per record (never its content): `read` streams records
    from the file. `compact` drops records that a later record of the same item supersedes (the
    newest record per item is all that replay and the reindex's fold use), so the file stays
    proportional to the live items plus one small delete record per item deleted since the
    last reindex; `compact_soon` does that in the background once superseded bytes reach
    `COMPACT_MIN_BYTES` and the live bytes. Delete records are never dropped here: they hide
    items that an index published meanwhile may hold.

    Several processes may hold one path open (a server appending, a reindex job folding and
    truncating): `append`, `truncate`, `compact` and opening take an advisory lock (`flock`) on
    the file, and a `WriteLog` that finds the file replaced by another process's `truncate` or
    `compact`, or grown by another's appends, rereads it first. `entries` is this object's view
    as of its last open, append, truncate or compaction. The lock is advisory and POSIX-only:
    every writer must go through `WriteLog`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        make_dirs(path.parent)
        self._entries: list[LogEntry] = []
        self._newest: dict[str, int] = {}  # item id -> index of its newest entry
        self._dead = 0  # bytes of entries a newer entry of the same item supersedes
        self._end = 0  # bytes of intact frames this object has read or written
        self._generation = 0  # bumped whenever the entries are reread or rewritten
        self.compactions = 0
        # generation -> (the next generation, indices of the entries it kept), for this object's own rewrites
        self._rewrites: dict[int, tuple[int, list[int]]] = {}
        self._compactor: threading.Thread | None = None
        self._identity = (-1, 0, 0)  # (fd, inode, device) of the open file, for `changed`
        self._file = self._open()
        try:
            fsync_dir(path.parent)  # the log's name, if this created it: else a power cut loses the whole log
            with self._file_lock():
                pass  # taking the lock reads the file
        except BaseException:
            self._file.close()
            raise

    def _identify(self, file: Any) -> tuple[int, int, int]:
        st = os.fstat(file.fileno())
        self._identity = (file.fileno(), st.st_ino, st.st_dev)
        return self._identity

    def _open(self) -> Any:
        # unbuffered: a failed write leaves no bytes behind to flush later; readable for `read`
        return self.path.open("a+b", buffering=0)

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Hold `flock` on the file that `path` names now, reread first if another process changed it."""
        while True:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            if not self._replaced():
                break
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)  # a truncate renamed a new file over ours
            self._file.close()
            self._file = self._open()
            self._end = -1
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size != self._end:
                self._catch_up(size)
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

    def _catch_up(self, size: int) -> None:
        """Index what another process appended (or everything, after the file was replaced), and drop a
        torn tail (caller holds the file lock, so no append is under way)."""
        fd = self._file.fileno()
        grown = 0 <= self._end < size
        entries, good_end = scan_frames(fd, self.path, self._end if grown else 0, len(self._entries) if grown else 0)
        if size != good_end:
            logger.warning("%s: dropping a torn tail of %d bytes", self.path, size - good_end)
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        if grown:
            for e in entries:
                self._add(e)
            self._end = good_end
        else:
            self._set_entries(entries, good_end)

    def _set_entries(self, entries: list[LogEntry], end: int) -> None:
        self._entries, self._newest, self._dead, self._end = [], {}, 0, end
        self._generation += 1
        for e in entries:
            self._add(e)

    def _add(self, entry: LogEntry) -> None:
        before = self._newest.get(entry.item_id)
        if before is not None:
            self._dead += self._entries[before].size
        self._newest[entry.item_id] = len(self._entries)
        self._entries.append(entry)

    # ---- reading -------------------------------------------------------------------------------
    @property
    def entries(self) -> list[LogEntry]:
        """One entry per record, in order, as of this object's last open, append, truncate or compaction."""
        with self._lock:
            return list(self._entries)

    def view(self) -> tuple[int, list[LogEntry]]:
        """(generation, entries) as of this object's last look at the file; the generation changes whenever
        the entries are reread from scratch or rewritten (a compaction or truncate)."""
        with self._lock:
            return self._generation, list(self._entries)

    def between(self, generation: int, start: int, stop: int) -> list[LogEntry] | None:
        """Entries `start:stop` of `generation`, or None when the view has moved to another generation."""
        with self._lock:
            return self._entries[start:stop] if generation == self._generation else None

    def changed(self) -> bool:
        """Whether the file may hold what this view lacks (grown, or replaced by another process): one
        stat call, for a reader that must see every acknowledged write before it answers."""
        try:
            named = os.stat(self.path)
        except OSError:
            return True
        file = self._file
        try:
            own = self._identity if self._identity[0] == file.fileno() else self._identify(file)
        except (OSError, ValueError):  # closed and reopened by another thread meanwhile
            return True
        return named.st_size != self._end or (named.st_ino, named.st_dev) != own[1:]

    def sync(self) -> None:
        """Bring the view up to date with the file (what other processes appended or rewrote)."""
        with self._lock, self._file_lock():
            pass

    def translate(self, generation: int, count: int) -> tuple[int, int] | None:
        """Where the first `count` entries of `generation` ended up after this object's own rewrites since:
        (generation, how many of its entries they are), or None when the file was reread from scratch
        (another process rewrote it: the caller must treat every entry as new)."""
        with self._lock:
            while generation != self._generation:
                step = self._rewrites.get(generation)
                if step is None:
                    return None
                generation, kept = step
                count = bisect.bisect_left(kept, count)
            return generation, count

    @property
    def records(self) -> list[LogRecord]:
        """Every record, in order, read from the file (content included: for tools and tests)."""
        return list(self.read())

    def read(self, entries: Sequence[LogEntry] | None = None) -> Iterator[LogRecord]:
        """Stream the records of `entries` (default: all of this view) from the file, one at a time.

        Raises:
            LogRewrittenError: an entry no longer matches the file (it was compacted or truncated since).
        """
        with self._lock:
            chosen = list(self._entries) if entries is None else list(entries)
            fd = os.dup(self._file.fileno())  # the file as it is now, even if it is replaced meanwhile
        try:
            for e in chosen:
                frame = os.pread(fd, e.size, e.offset)
                if len(frame) != e.size or not frame_intact(frame, 0) or HEADER.unpack_from(frame)[1] != e.crc:
                    raise LogRewrittenError(f"{self.path}: the record of {e.item_id!r} at byte {e.offset} "
                                            "changed since it was listed (compacted or truncated)")
                yield LogRecord.from_bytes(frame[HEADER.size:])
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes of intact records in this view."""
        return self._end

    @property
    def superseded_bytes(self) -> int:
        """Bytes of records that a later record of the same item supersedes (what `compact` frees)."""
        return self._dead

    # ---- writing -------------------------------------------------------------------------------
    def append(self, records: Iterable[LogRecord]) -> tuple[int, int]:
        """Write and fsync `records`; raises OSError (e.g. ENOSPC, EIO) without acknowledging them.

        Returns:
            (generation, index of the first appended entry): entries before it that the caller has not
            seen are other processes' appends.
        """
        batch = list(records)
        frames = [encode_frame(r) for r in batch]
        data = b"".join(frames)
        with self._lock, self._file_lock():
            fd = self._file.fileno()
            try:
                view = memoryview(data)
                while view:  # O_APPEND; a short write (the disk filled up) goes on until it raises
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as failed:
                try:
                    os.ftruncate(fd, self._end)  # do not leave half a batch behind
                except OSError as e:  # e.g. EIO, or a device that cannot be truncated: the next open drops the tail
                    logger.error("%s: could not cut a failed append back to byte %d: %s", self.path, self._end, e)
                raise OSError(failed.errno, f"{failed.strerror or failed} writing {self.path}", str(self.path)) \
                    from failed
            first, offset = len(self._entries), self._end
            for record, frame in zip(batch, frames, strict=True):
                self._add(entry_of(record, offset, frame))
                offset += len(frame)
            self._end = offset
            return self._generation, first

    def truncate(self, keep_from: int = 0, keep: Iterable[int] = ()) -> None:
        """Drop records before index `keep_from` (after they were folded into a published index), except
        those at the indices `keep` (writes the catalog does not show yet, see `reconcile_log`).

        Records appended after this object read the log, by it or by another process, are kept:
        the file is reread under the lock and only its first `keep_from` records are dropped.

        Raises:
            LogRewrittenError: another process truncated or compacted the log since this object
                read it, so its first `keep_from` records are no longer the ones this object saw.
        """
        if keep_from < 0:
            raise ValueError(f"keep_from={keep_from} must be >= 0")
        held = sorted(set(keep))
        if held and not 0 <= held[0] <= held[-1] < keep_from:
            raise ValueError(f"keep={held[:5]}...: indices to keep must be in [0, keep_from={keep_from})")
        with self._lock:
            seen, generation = self._entries, self._generation
            with self._file_lock():
                if self._generation != generation and not _same_prefix(seen, self._entries, keep_from):
                    raise LogRewrittenError(f"{self.path}: rewritten by another process since it was read; "
                                            f"refusing to drop its first {keep_from} records")
                order = [*held, *range(keep_from, len(self._entries))]
                rewritten = (self._generation, order)
                kept = self._rewrite([self._entries[i] for i in order])
            self._reopen(kept, rewritten)

    def compact(self) -> int:
        """Drop every record that a later record of the same item supersedes; returns the bytes freed.

        Crash-safe as `truncate` is: the kept records are copied to a new file, fsync'd, renamed
        over the log and the folder fsync'd; a crash before the rename leaves the old log whole.
        """
        with self._lock:
            with self._file_lock():
                before = self._end
                keep = [i for i, e in enumerate(self._entries) if self._newest[e.item_id] == i]
                if len(keep) == len(self._entries):
                    return 0
                rewritten = (self._generation, keep)
                kept = self._rewrite([self._entries[i] for i in keep])
            self._reopen(kept, rewritten)
            self.compactions += 1
        logger.info("%s: compacted %d -> %d bytes (%d records kept)", self.path, before, self._end, len(kept))
        return before - self._end

    def wants_compaction(self) -> bool:
        """Superseded records hold at least `COMPACT_MIN_BYTES` and as many bytes as the live ones."""
        return self._dead >= max(COMPACT_MIN_BYTES, self._end - self._dead)

    def compact_soon(self) -> None:
        """Start a background `compact` when `wants_compaction` and none is running."""
        with self._lock:
            if not self.wants_compaction() or (self._compactor is not None and self._compactor.is_alive()):
                return
            self._compactor = threading.Thread(target=self._compact_logged, name="onetower-log-compact",
                                               daemon=True)
            self._compactor.start()

    def _compact_logged(self) -> None:
        try:
            self.compact()
        except (OSError, IndexLayerError) as e:  # the old log stays whole; the next write tries again
            logger.error("%s: compaction failed, the log is unchanged: %s", self.path, e)

    def _rewrite(self, kept: Sequence[LogEntry]) -> list[LogEntry]:
        """Replace the file by the frames of `kept`, copied as they are (caller holds both locks)."""
        src = self._file.fileno()
        tmp = self.path.with_suffix(".tmp")
        out: list[LogEntry] = []
        with tmp.open("wb") as f:
            for e in kept:
                out.append(e._replace(offset=f.tell()))
                f.write(os.pread(src, e.size, e.offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        return out

    def _reopen(self, entries: list[LogEntry], before: tuple[int, list[int]]) -> None:
        """After `_rewrite`, outside the file lock: the replaced file's lock goes with it. `before` is the
        rewritten generation and the indices of its entries kept, in order (see `translate`)."""
        self._file.close()
        self._file = self._open()
        self._set_entries(entries, sum(e.size for e in entries))
        old, kept = before
        self._rewrites[old] = (self._generation, kept)
        for stale in [g for g in self._rewrites if g < old - REWRITES_KEPT]:
            del self._rewrites[stale]

    def close(self) -> None:
        compactor = self._compactor
        if compactor is not None:
            compactor.join()
        with self._lock:
            self._file.close()


def _same_prefix(a: Sequence[LogEntry], b: Sequence[LogEntry], n: int) -> bool:
    """Whether the first `n` records of `a` (or all it has) start `b` too (same frames at the same places)."""
    m = min(n, len(a))
    return len(b) >= m and all((x.offset, x.size, x.crc) == (y.offset, y.size, y.crc)
                               for x, y in zip(a[:m], b[:m], strict=True))
