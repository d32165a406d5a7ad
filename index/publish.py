"""Published index directories: write, checksum, point `CURRENT` at them atomically, verify on load.

Layout under an index root::

    root/CURRENT                      the served version's name (replaced by write-fsync-rename)
    root/versions/<version>/index.faiss
    root/versions/<version>/ids.parquet
    root/versions/<version>/vectors.npy   the stored unit vectors (GetEmbeddings, exact re-ranking)
    root/versions/<version>/manifest.json model name+version, dim, kind, params, count, created, sha256s
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.config import IndexConfig
from index.errors import IndexVerificationError
from index.faiss_index import as_matrix, build_index, import_faiss, index_kind
from index.fsio import fsync_dir, make_dirs
from index.ids import IdMap

logger = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, VECTORS_FILE, MANIFEST_FILE = "index.faiss", "ids.parquet", "vectors.npy", "manifest.json"
DATA_FILES = (INDEX_FILE, IDS_FILE, VECTORS_FILE)
CURRENT = "CURRENT"
VERSIONS = "versions"
MANIFEST_CHECKSUM = "manifest_sha256"  # over the other fields, so an edited model version or count is caught


@dataclass(frozen=True)
class Manifest:
    """What a published index holds and the checksum of every file."""

    index_version: str
    model_name: str
    model_version: str
    dim: int
    kind: str
    params: dict[str, Any]
    count: int
    created: str
    files: dict[str, str]  # file name -> sha256 hex

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        return json.dumps({**body, MANIFEST_CHECKSUM: _checksum(body)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; refuses one whose own checksum (when it carries one) does not match."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, want an object")
        missing = sorted(set(MANIFEST_TYPES) - set(data))
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        body = {k: v for k, v in data.items() if k != MANIFEST_CHECKSUM}
        unknown = sorted(set(body) - set(MANIFEST_TYPES))
        if MANIFEST_CHECKSUM not in data and unknown:  # e.g. its checksum's own key damaged: not a legacy one
            raise ValueError(f"it has no {MANIFEST_CHECKSUM} and fields a manifest does not have: {unknown}")
        if MANIFEST_CHECKSUM in data and data[MANIFEST_CHECKSUM] != _checksum(body):
            raise ValueError(f"its {MANIFEST_CHECKSUM} does not match its content (altered)")
        # a buggy writer's manifest checksums whatever it wrote: the types are checked too (issue 19)
        wrong = [k for k, t in MANIFEST_TYPES.items() if not isinstance(data[k], t) or isinstance(data[k], bool)]
        if not wrong and not all(isinstance(v, str) for v in data["files"].values()):
            wrong = ["files"]
        if wrong:
            raise ValueError("wrong types: " + ", ".join(f"{k}={data[k]!r:.40} (want {MANIFEST_TYPES[k].__name__})"
                                                         for k in wrong))
        return cls(**{k: data[k] for k in MANIFEST_TYPES})


MANIFEST_TYPES: dict[str, type] = {"index_version": str, "model_name": str, "model_version": str, "dim": int,
                                   "kind": str, "params": dict, "count": int, "created": str, "files": dict}


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class PublishedIndex:
    """A loaded, verified index version."""

    path: Path
    manifest: Manifest
    index: Any  # faiss.Index
    ids: IdMap
    vectors: np.ndarray  # float32 (count, dim), row = label


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with _naming(path), path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise a failed write (EIO, ENOSPC; FAISS reports them as RuntimeError) as an OSError naming `path`."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}", str(path)) from e
    except RuntimeError as e:
        raise OSError(errno.EIO, f"could not write {path}: {str(e).strip().splitlines()[-1][:300]}",
                      str(path)) from e


def new_version_name(model_version: str) -> str:
    """A sortable, unique version name: UTC time, model version, a short random suffix."""
    now = time.time()
    # Microseconds: names are ordered by creation even for versions published within one second.
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"
    safe = "".join(c if c.isalnum() else "-" for c in model_version)[:32]
    return f"{stamp}-m{safe}-{os.urandom(3).hex()}"


def publish_index(root: Path, vectors: np.ndarray, ids: IdMap, config: IndexConfig, model_name: str,
                  model_version: str, make_current: bool = True) -> PublishedIndex:
    """Build an index over `vectors` (row i = `ids` label i), write it as a new version, verify it,
    and (by default) point `CURRENT` at it.
    """
    x = as_matrix(vectors, "vectors")
    if len(x) != len(ids):
        raise ValueError(f"{len(x)} vectors but {len(ids)} ids")
    faiss = import_faiss()
    index = build_index(x, config)
    version = new_version_name(model_version)
    staging = root / VERSIONS / f".{version}.tmp"
    make_dirs(staging.parent)  # a new root's and versions/' names must survive a power cut too
    staging.mkdir()
    with _naming(staging / INDEX_FILE):
        faiss.write_index(index, str(staging / INDEX_FILE))
    with _naming(staging / IDS_FILE):
        ids.write(staging / IDS_FILE)
    with _naming(staging / VECTORS_FILE):
        np.save(staging / VECTORS_FILE, x)
    for name in DATA_FILES:
        with _naming(staging / name), (staging / name).open("rb+") as f:
            os.fsync(f.fileno())
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("threads", "use_gpu")}
    manifest = Manifest(
        index_version=version, model_name=model_name, model_version=model_version, dim=int(x.shape[1]),
        kind=index_kind(index), params=params, count=len(ids),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files={name: sha256_file(staging / name) for name in DATA_FILES})
    _fsync_write(staging / MANIFEST_FILE, manifest.to_json().encode())
    fsync_dir(staging)  # the files' names: else the renamed version may come back from a power cut empty
    try:  # verify what landed on disk before it is listed: FAISS only prints a failed write of its file
        published = load_version(root, staging.name)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"could not write {staging / INDEX_FILE}: it does not read back "
                      f"({str(e).strip().splitlines()[-1][:300]})", str(staging / INDEX_FILE)) from e
    final = root / VERSIONS / version
    os.rename(staging, final)
    fsync_dir(final.parent)
    published.path = final
    if make_current:
        set_current(root, version)
    logger.info("published index %s (%s, %d x %d) for %s/%s", version, manifest.kind, len(ids),
                manifest.dim, model_name, model_version)
    return published


def set_current(root: Path, version: str) -> None:
    """Point `root/CURRENT` at `version` atomically (write a temp file, fsync, rename over)."""
    if not (root / VERSIONS / version / MANIFEST_FILE).is_file():
        raise IndexVerificationError(f"cannot make {version} current: {root / VERSIONS / version} has no manifest")
    tmp = root / f".{CURRENT}.tmp"
    _fsync_write(tmp, (version + "\n").encode())
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def read_current(root: Path) -> str | None:
    """The version `CURRENT` names, or None when nothing was published."""
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def verify_version(directory: Path) -> Manifest:
    """Check the manifest and the sha256 of every file it lists.

    Raises:
        IndexVerificationError: naming the missing, truncated or altered file.
    """
    try:
        manifest = Manifest.from_json((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise IndexVerificationError(f"{directory / MANIFEST_FILE} is missing") from None
    except (ValueError, TypeError) as e:
        raise IndexVerificationError(f"{directory / MANIFEST_FILE} is not a valid manifest: {e}") from None
    for name in DATA_FILES:
        path = directory / name
        if name not in manifest.files:
            raise IndexVerificationError(f"{directory / MANIFEST_FILE} does not list {name}")
        if not path.is_file():
            raise IndexVerificationError(f"{path} is missing")
        if sha256_file(path) != manifest.files[name]:
            raise IndexVerificationError(f"{path} does not match its sha256 in the manifest (truncated or altered)")
    return manifest


def load_version(root: Path, version: str | None = None, mmap: bool = True,
                 verified: tuple[object, ...] | None = None) -> PublishedIndex:
    """Load and verify a published version (default: the one `CURRENT` names).

    Args:
        verified: the `version_fingerprint` taken just before a `verify_version` of this version that
            passed: while the files still have it, they are not hashed again (~10 s at 10M items).
    """
    version = version or read_current(root)
    if version is None:
        raise IndexVerificationError(f"{root} has no {CURRENT} pointer: publish an index first (onetower reindex)")
    directory = root / VERSIONS / version
    if verified is not None and version_fingerprint(root, version) == verified:
        manifest = read_manifest(root, version)
    else:
        manifest = verify_version(directory)
    index = read_index_file(directory / INDEX_FILE, mmap)
    ids = IdMap.read(directory / IDS_FILE)
    vectors = np.load(directory / VECTORS_FILE, mmap_mode="r" if mmap else None)
    check_shapes(directory, manifest, index, ids, vectors)
    return PublishedIndex(path=directory, manifest=manifest, index=index, ids=ids, vectors=vectors)


def version_fingerprint(root: Path, version: str) -> tuple[object, ...]:
    """(size, mtime, inode) of each of a version's files (None when missing): changes when any is rewritten
    (a rewrite in place within the filesystem's timestamp granularity, a few ms, of taking it, keeping the
    size, would not show; a version's files are written once, by `publish_index`, before anything reads them)."""
    out: list[object] = []
    for name in (MANIFEST_FILE, *DATA_FILES):
        try:
            st = (root / VERSIONS / version / name).stat()
        except OSError:
            out.append(None)
            continue
        out.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def check_shapes(directory: Path, manifest: Manifest, index: Any, ids: IdMap, vectors: np.ndarray) -> None:
    """Refuse a version whose index, ids, vectors and manifest disagree on the count or the dimension."""
    if vectors.shape != (manifest.count, manifest.dim) or not index.ntotal == len(ids) == manifest.count \
            or index.d != manifest.dim:
        raise IndexVerificationError(
            f"{directory}: counts or dims disagree (index {index.ntotal} x {index.d}, ids {len(ids)}, vectors "
            f"{' x '.join(map(str, vectors.shape))}, manifest {manifest.count} x {manifest.dim})")


def read_index_file(path: Path, mmap: bool = True) -> Any:
    """Read a FAISS index; with `mmap`, its codes memory-mapped (IO_FLAG_MMAP_IFC), so processes serving
    one version share them in the page cache: measured with FAISS 1.15 at 200k x 128, private memory
    after loading is 0 MB of 98 for flat, 30 of 126 for HNSW (its graph), 1 of 8 for IVF-PQ and 11 of
    104 for the fast-scan kind with refinement (docs/PERFORMANCE.md, multi-process serving)."""
    faiss = import_faiss()
    if mmap and hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:  # a kind this FAISS cannot map: read it whole
            logger.info("%s: not memory-mappable (%s); reading it whole", path, str(e).splitlines()[-1][:200])
    return faiss.read_index(str(path))


def list_versions(root: Path) -> list[str]:
    """Published version names, oldest first."""
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def prune_versions(root: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions (never the current one) and the staging folders of
    publications that were killed; returns the versions removed.

    A version is renamed to a hidden name before its files go, so a crash midway never leaves a
    listed version with files missing. Only while no publication runs on `root` (reindex calls it
    after its own).
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    current = read_current(root)
    old = [v for v in list_versions(root)[:-keep] if v != current]
    folder = root / VERSIONS
    for v in old:
        os.rename(folder / v, folder / f".{v}.deleting")
    if old:
        fsync_dir(folder)
    for leftover in folder.glob(".*"):
        if leftover.is_dir() and leftover.name.endswith((".tmp", ".deleting")):
            shutil.rmtree(leftover)
    return old


def read_manifest(root: Path, version: str) -> Manifest:
    """A version's manifest, read without checking the files (cheap; `load_version` verifies)."""
    path = root / VERSIONS / version / MANIFEST_FILE
    try:
        return Manifest.from_json(path.read_text())
    except FileNotFoundError:
        raise IndexVerificationError(f"{path} is missing") from None
    except (ValueError, TypeError) as e:
        raise IndexVerificationError(f"{path} is not a valid manifest: {e}") from None


def find_version_for_model(root: Path, model_version: str) -> str | None:
    """The index version to serve with `model_version`: `CURRENT` if it was built with that model,
    else the newest published version that was (so a rollback finds the index it kept), else None."""
    current = read_current(root)
    candidates = ([current] if current else []) + list(reversed(list_versions(root)))
    for version in candidates:
        try:
            if read_manifest(root, version).model_version == model_version:
                return version
        except IndexVerificationError as e:
            said = (str(root), version, str(e))
            # a watcher asks every poll: say it once per version and reason, then quietly
            logger.log(logging.DEBUG if said in _SKIPPED else logging.WARNING,
                       "skipping index version %s: unreadable manifest (%s)", version, e)
            if len(_SKIPPED) < 10_000:
                _SKIPPED.add(said)
    return None


_SKIPPED: set[tuple[str, str, str]] = set()  # (root, version, reason) already warned about
