"""Embedding shards: the vectors of a batch job, kept on disk as they complete so a rerun can resume.

Layout of a work folder::

    work/meta.json               what made the shards (e.g. model name and version, dim)
    work/shard-000000.npy        float32 (embedded rows, dim)
    work/shard-000000.parquet    item_id, content_hash, error ("" when the item was embedded)

Every file is written under a temporary name, fsync'd and renamed; the parquet goes last and
marks the shard complete, so a shard cut short by a crash is ignored (and overwritten).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.faiss_index import as_matrix
from index.fsio import fsync_dir, make_dirs

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
_PREFIX = "shard-"


@dataclass(frozen=True)
class Shard:
    """One completed shard: row i of `vectors` belongs to the i-th item whose error is empty."""

    number: int
    item_ids: list[str]
    content_hashes: list[str]
    errors: list[str]
    vectors: np.ndarray  # float32 (embedded rows, dim), memory-mapped

    def __len__(self) -> int:
        return len(self.item_ids)


class ShardStore:
    """A folder of completed embedding shards made by one encoder.

    Args:
        directory: the work folder (created if missing).
        identity: what made the shards (JSON-serialisable); a folder made by another identity
            is emptied, since its vectors would not match this run's.
    """

    def __init__(self, directory: Path, identity: Mapping[str, Any]) -> None:
        self.directory = directory
        self.identity = json.loads(json.dumps(dict(identity), sort_keys=True))
        meta = directory / META_FILE
        if directory.exists() and _read_meta(meta) != self.identity:
            logger.info("%s: shards of another run (%s), starting afresh", directory, _read_meta(meta))
            self._remove_own_files()
        make_dirs(directory)
        for leftover in directory.glob(f"{_PREFIX}*.tmp"):
            leftover.unlink()
        if not meta.exists():
            _atomic_write(meta, lambda f: f.write(json.dumps(self.identity, sort_keys=True).encode()))
            fsync_dir(directory)  # else a power cut may keep the shards but lose what made them

    def shards(self) -> list[Shard]:
        """The completed shards, in the order they were written."""
        out = []
        for number in self._numbers():
            table = pq.read_table(self._path(number, "parquet"))
            errors = table.column("error").to_pylist()
            try:
                vectors = np.load(self._path(number, "npy"), mmap_mode="r")
            except (OSError, ValueError) as e:
                logger.warning("%s: ignoring shard %d: %s", self.directory, number, e)
                continue
            if vectors.ndim != 2 or len(vectors) != sum(not e for e in errors):
                logger.warning("%s: ignoring shard %d: %s vectors for %d embedded items", self.directory, number,
                               vectors.shape, sum(not e for e in errors))
                continue
            out.append(Shard(number, table.column("item_id").to_pylist(),
                             table.column("content_hash").to_pylist(), errors, vectors))
        return out

    def write(self, item_ids: Sequence[str], content_hashes: Sequence[str], errors: Sequence[str],
              vectors: np.ndarray) -> Shard:
        """Write one shard atomically; `vectors` holds a row per item whose error is empty."""
        if not len(item_ids) == len(content_hashes) == len(errors):
            raise ValueError(f"lengths differ: {len(item_ids)} ids, {len(content_hashes)} hashes, "
                             f"{len(errors)} errors")
        x = as_matrix(vectors, "vectors")
        if len(x) != sum(not e for e in errors):
            raise ValueError(f"{len(x)} vectors for {sum(not e for e in errors)} items without an error")
        numbers = self._numbers()
        number = numbers[-1] + 1 if numbers else 0
        table = pa.table({"item_id": pa.array(list(item_ids), pa.string()),
                          "content_hash": pa.array(list(content_hashes), pa.string()),
                          "error": pa.array(list(errors), pa.string())})
        _atomic_write(self._path(number, "npy"), lambda f: np.save(f, x))
        _atomic_write(self._path(number, "parquet"), lambda f: pq.write_table(table, f))  # marks it complete
        fsync_dir(self.directory)
        return Shard(number, list(item_ids), list(content_hashes), list(errors),
                     np.load(self._path(number, "npy"), mmap_mode="r"))

    def clear(self) -> None:
        """Remove the shards, and the folder when nothing else is in it (after the job published)."""
        self._remove_own_files()
        try:
            self.directory.rmdir()
        except OSError:
            pass  # not empty: someone else's files live there too

    def _remove_own_files(self) -> None:
        """Only the files this store writes: a work folder given by a user may hold others."""
        for path in [*self.directory.glob(f"{_PREFIX}*"), self.directory / META_FILE]:
            path.unlink(missing_ok=True)

    def _numbers(self) -> list[int]:
        return sorted(int(p.stem.removeprefix(_PREFIX)) for p in self.directory.glob(f"{_PREFIX}*.parquet"))

    def _path(self, number: int, suffix: str) -> Path:
        return self.directory / f"{_PREFIX}{number:06d}.{suffix}"


def _read_meta(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write under a temporary name, fsync, rename; a failure (EIO, ENOSPC) names the file and leaves
    only the temporary file, which the next `ShardStore` removes."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}", str(path)) from e
