"""Helpers for the crash tests: `onetower serve` and `onetower reindex` as real processes, and a pause hook.

Run as a script, this module is `onetower` with one seam: `python crash_util.py PHASE MARKER -- ARGS...`
runs the real `onetower ARGS...` (e.g. `reindex ...`) but, on reaching PHASE, writes MARKER and
blocks until the process is killed. The hooks wrap the library functions each phase runs, from
outside, so the job itself carries no test code:

- ``embed``: the first embedding shard is on disk and the rest of the catalog is still to embed
- ``build``: every vector is in hand and the FAISS index is about to be built
- ``write``: ``index.faiss`` is written in the staging folder, ``ids.parquet`` not yet
- ``current``: the new version is renamed into place and verified, ``.CURRENT.tmp`` is written and
  fsync'd, and CURRENT is about to be replaced
- ``truncate``: CURRENT names the new version, the trimmed log is written to ``live.tmp`` and fsync'd,
  and it is about to replace ``live.log`` (the job holds the log's flock meanwhile)
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from index.log import LOG_FILE
from training.lifecycle.tracking import DEFAULT_MODEL_URI

PHASES = ("embed", "build", "write", "current", "truncate")
SHARD_SIZE = 100  # items per shard in paused runs, so a 400-item catalog makes several shards
REPO = Path(__file__).resolve().parents[2]


# ---- the processes, from the test's side ---------------------------------------------------------
def serve_process(index_root: Path, tracking_uri: str, port: int, cache_dir: Path, log: Path,
                  poll_seconds: float = 0, model_uri: str = DEFAULT_MODEL_URI,
                  extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """`onetower serve` following `model_uri` (the champion alias), on `index_root`; `extra`: more options."""
    cmd = [sys.executable, "-m", "onetower.cli", "serve", "--model", model_uri,
           "--index-root", str(index_root), "--tracking-uri", tracking_uri, "--port", str(port),
           "--poll-seconds", str(poll_seconds), "--cache-dir", str(cache_dir), "--workers", "4", *extra]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO)


def copy_index_root(source: Path, root: Path) -> Path:
    """A private copy of an index root: published versions only (no live writes, staging or model cache)."""
    shutil.copytree(source, root, ignore=shutil.ignore_patterns(LOG_FILE, "*.tmp", ".model-cache"))
    return root


def reindex_process(catalog: Path, index_root: Path, tracking_uri: str, log: Path,
                    pause_at: str | None = None, marker: Path | None = None) -> subprocess.Popen[bytes]:
    """`onetower reindex` (flat index, CPU) on `index_root`; with `pause_at`, it stops at that phase."""
    args = ["reindex", "--catalog", str(catalog), "--index-root", str(index_root), "--model",
            DEFAULT_MODEL_URI, "--tracking-uri", tracking_uri, "--kind", "flat",
            "--device", "cpu"]
    if pause_at is None:
        cmd = [sys.executable, "-m", "onetower.cli", *args]
    else:
        if pause_at not in PHASES or marker is None:
            raise ValueError(f"pause_at={pause_at!r} must be one of {PHASES}, with a marker path")
        cmd = [sys.executable, __file__, pause_at, str(marker), "--", *args]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO)


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None, timeout: float = 180.0, every: float = 0.1) -> None:
    """Poll `condition` until it holds; fail early if `proc` exits, late after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{tail(log) if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{tail(log) if log else ''}")
        time.sleep(every)


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` and reap it; it must not have exited on its own before."""
    assert proc.poll() is None, f"process already exited with {proc.returncode}"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


# ---- the pause hooks, inside the job ---------------------------------------------------------------
def _pause(phase: str, marker: Path) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(f"{phase} {os.getpid()}\n")
    os.replace(tmp, marker)  # the test sees the marker whole or not at all
    threading.Event().wait()  # until SIGKILL


class _OsPausingBeforeReplace:
    """Stands in for `os` inside one module: `os.replace(src, dst)` onto `dst_name` pauses first."""

    def __init__(self, dst_name: str, phase: str, marker: Path) -> None:
        self._dst_name, self._phase, self._marker = dst_name, phase, marker

    def replace(self, src: Any, dst: Any) -> None:
        if Path(dst).name == self._dst_name:
            _pause(self._phase, self._marker)
        os.replace(src, dst)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def install_pause(phase: str, marker: Path) -> None:
    """Wrap the library function that `phase` runs so the process pauses there (see the module doc)."""
    import index.ids
    import index.log
    import index.publish
    import index.shards
    import training.reindex.driver
    import training.reindex.job

    # every paused run writes small shards, so a kill while embedding leaves some behind to resume from
    training.reindex.driver.reindex = functools.partial(training.reindex.job.reindex, shard_size=SHARD_SIZE)  # type: ignore
    if phase == "embed":
        write_shard = index.shards.ShardStore.write

        def write_then_pause(self: Any, *args: Any, **kwargs: Any) -> Any:
            shard = write_shard(self, *args, **kwargs)
            _pause(phase, marker)
            return shard

        index.shards.ShardStore.write = write_then_pause  # type: ignore[method-assign]
    elif phase == "build":
        build = index.publish.build_index

        def pause_then_build(*args: Any, **kwargs: Any) -> Any:
            _pause(phase, marker)
            return build(*args, **kwargs)

        index.publish.build_index = pause_then_build
    elif phase == "write":
        write_ids = index.ids.IdMap.write

        def pause_then_write(self: Any, path: Path) -> None:
            if Path(path).parent.name.endswith(".tmp"):  # the staging folder of a version, not a shard
                _pause(phase, marker)
            write_ids(self, path)

        index.ids.IdMap.write = pause_then_write  # type: ignore[method-assign]
    elif phase == "current":
        index.publish.os = _OsPausingBeforeReplace(index.publish.CURRENT, phase, marker)  # type: ignore
    elif phase == "truncate":
        index.log.os = _OsPausingBeforeReplace(index.log.LOG_FILE, phase, marker)  # type: ignore
    else:
        raise ValueError(f"phase={phase!r} must be one of {PHASES}")


def main(argv: list[str]) -> None:
    phase, marker, sep, *args = argv
    if sep != "--":
        raise SystemExit(f"usage: {Path(__file__).name} PHASE MARKER -- ONETOWER_ARGS...")
    install_pause(phase, Path(marker))
    from onetower.cli import app

    app(args=args, prog_name="onetower")


if __name__ == "__main__":
    main(sys.argv[1:])
