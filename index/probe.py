"""Prove a published version readable in a child process before a serving process reads it.

FAISS's reader trusts the sizes in a file's header: a corrupt `index.faiss` (also one whose manifest
a buggy writer rehashed, so `verify_version` passes) can make `faiss.read_index` abort the process,
crash it or allocate what the header says (FAISS 1.15 refuses only sizes over 1 TiB a vector), and a
corrupt parquet file can do the same to pyarrow. The probe runs the reads a server does
(`load_version`), checks what they give, and searches, in a fresh interpreter with a bounded address
space and a timeout; when that process dies or fails, the error names the file it was reading.
Measured on a 120-item flat index (2 busy cores): 0.45 s a probe, half of it the child's interpreter
and imports, 173 MiB peak in the child; cheap enough that every version is probed, the one a server
starts on too.

    python -m index.probe ROOT VERSION MEMORY_BYTES    (what `probe_version` runs)
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.config import IndexConfig, search_config
from index.errors import IndexProbeError, IndexVerificationError
from index.faiss_index import IndexShape, import_faiss, index_kind, search_index
from index.ids import IdMap
from index.publish import (
    DATA_FILES,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    VERSIONS,
    Manifest,
    check_shapes,
    read_index_file,
)

PROBE_TIMEOUT_S = 120.0
HEADROOM_BYTES = 2 << 30  # address space the child may take beyond three times its files (imports, search)
PROBE_QUERIES = 8
NORM_TOLERANCE = 1e-3  # stored vectors are unit rows
CHUNK_ROWS = 1 << 16  # rows checked at a time, so the check's own memory stays bounded
STEP, DONE, FAILED = "probe-step", "probe-done", "probe-failed"  # the child's lines on stdout: progress, verdicts
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ProbeReport:
    """What a passed probe measured."""

    seconds: float  # wall time of the whole probe, child start to exit
    child_seconds: float  # the reads and checks inside the child
    peak_rss_kib: int  # the child's peak resident memory


def probe_version(root: Path, version: str, timeout_s: float = PROBE_TIMEOUT_S,
                  memory_bytes: int | None = None) -> ProbeReport:
    """Read and search `root/versions/<version>` in a child process, as `load_version` would here.

    Args:
        timeout_s: the child is killed after this long.
        memory_bytes: address space the child may add to what it holds after its imports; default
            three times the version's files (each read may map or copy them) plus HEADROOM_BYTES.

    Raises:
        IndexProbeError: naming the file being read when the child died (signal), ran out of memory
            or time, or found the files unreadable or inconsistent.
    """
    root = root.absolute()  # the child runs in PACKAGE_PARENT, so `-m index.probe` finds this package
    directory = root / VERSIONS / version
    if memory_bytes is None:
        sizes = [(directory / n).stat().st_size for n in DATA_FILES if (directory / n).is_file()]
        memory_bytes = 3 * sum(sizes) + HEADROOM_BYTES
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "index.probe", str(root), version, str(memory_bytes)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=PACKAGE_PARENT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    seconds = time.monotonic() - started
    lines = out.decode("utf-8", "replace").splitlines()
    said = {tag: rest for tag, _, rest in (line.partition(" ") for line in lines) if tag in (STEP, DONE, FAILED)}
    if not timed_out and proc.returncode == 0 and DONE in said:
        report = json.loads(said[DONE])
        return ProbeReport(seconds, report["seconds"], report["peak_rss_kib"])
    if FAILED in said and not timed_out:
        raise IndexProbeError(said[FAILED])
    where = said.get(STEP, str(directory))
    raise IndexProbeError(f"{where}: {_why(proc.returncode, timed_out, timeout_s, lines)}")


def _why(code: int, timed_out: bool, timeout_s: float, lines: list[str]) -> str:
    """Why a child that reported no verdict of its own ended, with the last thing it printed."""
    output = [line.strip() for line in lines if line.strip() and not line.startswith(STEP + " ")]
    last = output[-1][:300] if output else "no output"
    if timed_out:
        return f"not read within {timeout_s:g}s by a probe process (killed); the file is corrupt or far too large"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"reading it killed a probe process with {name} ({last}); the file is corrupt"
    return f"a probe process reading it exited with code {code} ({last})"


# ---- the child ----------------------------------------------------------------------------------
_reading: list[Path] = []  # the child's current step


def _step(path: Path) -> None:
    _reading[:] = [path]
    print(f"{STEP} {path}", flush=True)


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (0 where there is none)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), 0)


def _limit_memory(memory_bytes: int) -> None:
    """Cap the address space at what the process holds now plus `memory_bytes`; no core files."""
    held = _status_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (held + memory_bytes, held + memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def check_version(directory: Path) -> None:
    """What the child runs: each read `load_version` does, then checks on what the reads gave.

    Raises:
        IndexVerificationError, ValueError, RuntimeError, OSError: the files are unreadable or disagree.
    """
    _step(directory / MANIFEST_FILE)
    manifest = Manifest.from_json((directory / MANIFEST_FILE).read_text())
    if manifest.index_version != directory.name:  # the server compares the two to know what it serves
        raise IndexVerificationError(f"{directory / MANIFEST_FILE} names the version {manifest.index_version[:80]!r}, "
                                     f"not its folder's name")
    _step(directory / INDEX_FILE)
    index = read_index_file(directory / INDEX_FILE)
    kind = index_kind(index)
    if kind != manifest.kind:
        raise IndexVerificationError(f"{directory / INDEX_FILE} is a {kind} index, the manifest says {manifest.kind}")
    _step(directory / IDS_FILE)
    ids = IdMap.read(directory / IDS_FILE)
    _step(directory / VECTORS_FILE)
    vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    check_shapes(directory, manifest, index, ids, vectors)
    if vectors.dtype != np.float32:
        raise IndexVerificationError(f"{directory / VECTORS_FILE} holds {vectors.dtype}, want float32")
    for start in range(0, len(vectors), CHUNK_ROWS):
        rows = np.asarray(vectors[start: start + CHUNK_ROWS])
        norms = np.linalg.norm(rows, axis=1)
        if not np.isfinite(rows).all() or (np.abs(norms - 1) > NORM_TOLERANCE).any():
            raise IndexVerificationError(f"{directory / VECTORS_FILE}: rows from {start} are not finite unit vectors")
        if kind == "flat" and not np.array_equal(index.reconstruct_n(start, len(rows)), rows):
            raise IndexVerificationError(f"{directory / INDEX_FILE}: rows from {start} differ from {VECTORS_FILE}")
    _step(directory / INDEX_FILE)
    _check_search(directory, index, vectors, search_config(manifest.params, threads=1))


def _check_search(directory: Path, index: object, vectors: np.ndarray, config: IndexConfig) -> None:
    """Search with a few stored rows, plainly and with an ID selector (the tombstone path)."""
    n = len(vectors)
    rows = np.unique(np.linspace(0, n - 1, min(PROBE_QUERIES, n)).astype(np.int64))
    queries = np.asarray(vectors[rows], dtype=np.float32)
    shape = IndexShape.of(index)
    k = min(10, n)
    selector = import_faiss().IDSelectorNot(import_faiss().IDSelectorBatch(rows[:1]))
    for sel in (None, selector):
        scores, labels = search_index(index, queries, k, sel, None, config, vectors, shape)
        found = labels >= 0
        if not found[:, 0].all() or ((labels < -1) | (labels >= n)).any() or not np.isfinite(scores[found]).all():
            raise IndexVerificationError(f"{directory / INDEX_FILE}: a search gives labels outside 0..{n - 1}, "
                                         "no hit or scores that are not finite")


def main(argv: list[str]) -> int:
    root, version, memory = Path(argv[0]), argv[1], int(argv[2])
    _limit_memory(memory)
    started = time.monotonic()
    try:
        check_version(root / VERSIONS / version)
    except IndexVerificationError as e:  # a check of ours: the message names the file
        print(f"{FAILED} {e}", flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - any failure of a reader is the answer; the child exits after it
        where = _reading[0] if _reading else root / VERSIONS / version
        text = " ".join(str(e).split())[:400]
        message = f"{type(e).__name__}: {text}" if text else type(e).__name__
        if isinstance(e, MemoryError) or "bad_alloc" in message:
            message += f" (it wanted more than {memory} bytes of memory: a size in its header is wrong?)"
        print(f"{FAILED} {where} could not be read: {message}", flush=True)
        return 1
    peak = _status_kib("VmHWM")  # not ru_maxrss: that keeps the parent's peak across the fork and exec
    print(f"{DONE} " + json.dumps({"seconds": round(time.monotonic() - started, 4), "peak_rss_kib": peak}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
