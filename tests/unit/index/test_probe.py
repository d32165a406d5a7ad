"""`index.probe`: a published version read and searched in a child process, refused by file name.

Each probe is a real child interpreter (~0.4 s); the damaged versions are rehashed as a buggy writer
would leave them, so `verify_version` passes and only the readers meet the damage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index.config import IndexConfig
from index.errors import IndexProbeError
from index.ids import IdMap
from index.probe import probe_version
from index.publish import (
    DATA_FILES,
    INDEX_FILE,
    MANIFEST_CHECKSUM,
    MANIFEST_FILE,
    VECTORS_FILE,
    VERSIONS,
    load_version,
    publish_index,
    verify_version,
    version_fingerprint,
)

N, DIM = 60, 16


@pytest.fixture
def version(tmp_path: Path, clustered: Callable[..., np.ndarray]) -> str:
    ids = IdMap([f"i{i}" for i in range(N)], [f"h{i}" for i in range(N)], [{} for _ in range(N)])
    return publish_index(tmp_path, clustered(N, DIM, seed=3, clusters=5), ids, IndexConfig(kind="flat"),
                         "onetower-encoder", "1").manifest.index_version


def rehashed_copy(root: Path, version: str, damage: Callable[[Path], None], name: str = "damaged") -> str:
    """A copy of `version` named `name`, damaged, with a manifest rehashed over what is now on disk."""
    directory = root / VERSIONS / name
    shutil.copytree(root / VERSIONS / version, directory)
    damage(directory)
    data = json.loads((directory / MANIFEST_FILE).read_text())
    data.pop(MANIFEST_CHECKSUM)
    data["index_version"] = name
    data["files"] = {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in DATA_FILES}
    data[MANIFEST_CHECKSUM] = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(data))
    verify_version(directory)  # the checksums pass: only the readers stand in the way
    return name


def _truncate_index(directory: Path) -> None:
    path = directory / INDEX_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_sound_version_passes_and_reports_its_cost(tmp_path: Path, version: str) -> None:
    report = probe_version(tmp_path, version)
    assert 0 < report.child_seconds < report.seconds < 30
    assert report.peak_rss_kib > 0


def test_a_rehashed_truncated_index_is_refused_naming_the_file(tmp_path: Path, version: str) -> None:
    bad = rehashed_copy(tmp_path, version, _truncate_index)
    with pytest.raises(RuntimeError):  # what FAISS itself does with the bytes, were they read here
        load_version(tmp_path, bad)
    with pytest.raises(IndexProbeError, match=rf"{bad}/{INDEX_FILE} could not be read: RuntimeError"):
        probe_version(tmp_path, bad)


def test_a_huge_count_in_the_header_runs_into_the_memory_limit(tmp_path: Path, version: str) -> None:
    def huge_codes_size(directory: Path) -> None:
        data = bytearray((directory / INDEX_FILE).read_bytes())
        at = data.index((N * DIM).to_bytes(8, "little"))  # the length of a flat index's vector of floats
        data[at:at + 8] = (1 << 28).to_bytes(8, "little")  # 1 GiB of floats: under FAISS's own limit
        (directory / INDEX_FILE).write_bytes(bytes(data))

    bad = rehashed_copy(tmp_path, version, huge_codes_size)
    with pytest.raises(IndexProbeError, match=rf"{INDEX_FILE} could not be read: MemoryError.*more than \d+ bytes"):
        probe_version(tmp_path, bad, memory_bytes=256 << 20)


@pytest.mark.parametrize("damage, match", [
    (lambda d: np.save(d / VECTORS_FILE, np.full((N, DIM), np.nan, np.float32)), "not finite unit vectors"),
    (lambda d: np.save(d / VECTORS_FILE, np.load(d / VECTORS_FILE)[::-1]), "differ from vectors.npy"),
    (lambda d: shutil.copyfile(d / VECTORS_FILE, d / INDEX_FILE), f"{INDEX_FILE} could not be read"),
], ids=["nan-vectors", "vectors-unlike-the-index", "vectors-as-index"])
def test_content_the_readers_accept_is_still_checked(tmp_path: Path, version: str,
                                                     damage: Callable[[Path], None], match: str) -> None:
    bad = rehashed_copy(tmp_path, version, damage)
    with pytest.raises(IndexProbeError, match=match):
        probe_version(tmp_path, bad)


def test_a_manifest_naming_another_version_is_refused(tmp_path: Path, version: str) -> None:
    other = rehashed_copy(tmp_path, version, lambda d: None, name="renamed")
    manifest = tmp_path / VERSIONS / other / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["index_version"] = version
    (tmp_path / VERSIONS / other / MANIFEST_FILE).write_text(json.dumps({k: v for k, v in data.items()
                                                                          if k != MANIFEST_CHECKSUM}))
    with pytest.raises(IndexProbeError, match=r"names the version .* not its folder's name"):
        probe_version(tmp_path, other)


def test_a_child_killed_by_a_signal_or_the_clock_is_reported(tmp_path: Path, version: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IndexProbeError, match=r"not read within 0.01s by a probe process \(killed\)"):
        probe_version(tmp_path, version, timeout_s=0.01)
    # a reader that dies mid-read, as FAISS's abort() would: the error names the file it was reading
    dying = tmp_path / "dying.sh"
    dying.write_text(f"#!/bin/sh\necho 'probe-step {tmp_path / INDEX_FILE}'\nkill -ABRT $$\n")
    dying.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dying))
    with pytest.raises(IndexProbeError, match=rf"{INDEX_FILE}: reading it killed a probe process with SIGABRT"):
        probe_version(tmp_path, version)


def test_the_fingerprint_changes_when_a_file_is_rewritten(tmp_path: Path, version: str) -> None:
    before = version_fingerprint(tmp_path, version)
    assert before == version_fingerprint(tmp_path, version)
    (tmp_path / VERSIONS / version / VECTORS_FILE).unlink()
    assert version_fingerprint(tmp_path, version) != before
