"""Publishing, verifying and pointing at index versions (`index.publish`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index.config import IndexConfig
from index.errors import IndexVerificationError
from index.faiss_index import search_index
from index.ids import IdMap
from index.publish import (
    CURRENT,
    DATA_FILES,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    VERSIONS,
    Manifest,
    list_versions,
    load_version,
    prune_versions,
    publish_index,
    read_current,
    set_current,
    verify_version,
    version_fingerprint,
)

N, DIM = 200, 16
FLAT = IndexConfig(kind="flat")


@pytest.fixture
def vectors(clustered: Callable[..., np.ndarray]) -> np.ndarray:
    return clustered(N, DIM, seed=7, clusters=10)


@pytest.fixture
def ids() -> IdMap:
    return IdMap([f"i{i}" for i in range(N)], [f"h{i}" for i in range(N)],
                 [{"colour": ["red", "blue"][i % 2]} for i in range(N)])


@pytest.fixture
def publish(tmp_path: Path, vectors: np.ndarray, ids: IdMap) -> Callable[..., str]:
    def run(model_version: str = "3", make_current: bool = True, seed: int = 0) -> str:
        x = vectors if not seed else np.roll(vectors, seed, axis=0)
        return publish_index(tmp_path, x, ids, FLAT, "onetower-encoder", model_version,
                             make_current=make_current).manifest.index_version
    return run


def test_publish_points_current_at_a_verified_version(tmp_path: Path, vectors: np.ndarray, ids: IdMap) -> None:
    assert read_current(tmp_path) is None
    published = publish_index(tmp_path, vectors, ids, FLAT, "onetower-encoder", "3")
    version = published.manifest.index_version
    assert read_current(tmp_path) == version
    assert (tmp_path / CURRENT).read_text() == version + "\n"
    assert published.path == tmp_path / VERSIONS / version
    assert sorted(p.name for p in published.path.iterdir()) == sorted([*DATA_FILES, MANIFEST_FILE])
    assert list((tmp_path / VERSIONS).iterdir()) == [published.path]  # no staging directory left

    loaded = load_version(tmp_path)
    m = loaded.manifest
    assert (m.model_name, m.model_version, m.dim, m.kind, m.count) == ("onetower-encoder", "3", DIM, "flat", N)
    assert m.params["kind"] == "flat" and "threads" not in m.params
    assert set(m.files) == set(DATA_FILES) and all(len(h) == 64 for h in m.files.values())
    assert np.array_equal(loaded.vectors, vectors)
    assert loaded.ids.item_ids == ids.item_ids and loaded.ids.attributes == ids.attributes
    scores, labels = search_index(loaded.index, vectors[:5], 3, None, None, FLAT)
    assert labels[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert verify_version(published.path) == m


def test_make_current_false_leaves_current_alone(publish: Callable[..., str], tmp_path: Path) -> None:
    first = publish()
    second = publish(make_current=False)
    assert read_current(tmp_path) == first
    assert load_version(tmp_path, second).manifest.index_version == second
    set_current(tmp_path, second)
    assert read_current(tmp_path) == second


def test_publish_refuses_mismatched_inputs(tmp_path: Path, vectors: np.ndarray, ids: IdMap) -> None:
    with pytest.raises(ValueError, match=f"{N - 1} vectors but {N} ids"):
        publish_index(tmp_path, vectors[:-1], ids, FLAT, "m", "1")
    bad = vectors.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        publish_index(tmp_path, bad, ids, FLAT, "m", "1")
    assert read_current(tmp_path) is None


def _alter(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_alter, _truncate, _delete], ids=["altered", "truncated", "deleted"])
@pytest.mark.parametrize("name", [INDEX_FILE, IDS_FILE, VECTORS_FILE, MANIFEST_FILE])
def test_damaged_files_are_refused_by_name(publish: Callable[..., str], tmp_path: Path, name: str,
                                           damage: Callable[[Path], None]) -> None:
    previous = publish(seed=1)
    version = publish()
    damage(tmp_path / VERSIONS / version / name)
    with pytest.raises(IndexVerificationError, match=name):
        load_version(tmp_path)
    with pytest.raises(IndexVerificationError, match=name):
        verify_version(tmp_path / VERSIONS / version)
    # the previous version is untouched and can keep serving
    assert load_version(tmp_path, previous).manifest.index_version == previous


def test_a_version_verified_is_not_hashed_again_unless_a_file_changed(
        publish: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import index.publish as publish_module

    version = publish()
    fingerprint = version_fingerprint(tmp_path, version)
    verify_version(tmp_path / VERSIONS / version)
    hashed: list[Path] = []
    real = publish_module.sha256_file
    monkeypatch.setattr(publish_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    assert load_version(tmp_path, version, verified=fingerprint).manifest.index_version == version
    assert hashed == []
    time.sleep(0.05)  # past the filesystem's timestamp granularity (a few ms), so the rewrite moves the mtime
    _alter(tmp_path / VERSIONS / version / VECTORS_FILE)  # after the verification: the fingerprint moves
    with pytest.raises(IndexVerificationError, match=VECTORS_FILE):
        load_version(tmp_path, version, verified=fingerprint)
    assert len(hashed) == 3


@pytest.mark.parametrize("field, value", [("model_version", "4"), ("count", N - 1), ("dim", 8),
                                          ("kind", "hnsw"), ("model_name", "other")])
def test_edited_manifest_fields_are_refused(publish: Callable[..., str], tmp_path: Path, field: str,
                                            value: object) -> None:
    version = publish()
    path = tmp_path / VERSIONS / version / MANIFEST_FILE
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(IndexVerificationError, match=MANIFEST_FILE):
        load_version(tmp_path)


def test_manifest_without_a_file_entry_is_refused(publish: Callable[..., str], tmp_path: Path) -> None:
    version = publish()
    path = tmp_path / VERSIONS / version / MANIFEST_FILE
    manifest = Manifest.from_json(path.read_text())
    files = {k: v for k, v in manifest.files.items() if k != VECTORS_FILE}
    path.write_text(Manifest(**{**manifest.__dict__, "files": files}).to_json())
    with pytest.raises(IndexVerificationError, match=f"does not list {VECTORS_FILE}"):
        load_version(tmp_path)


def test_manifest_round_trip() -> None:
    m = Manifest(index_version="v", model_name="n", model_version="1", dim=4, kind="flat", params={"a": 1},
                 count=3, created="2024-01-01T00:00:00Z", files={"index.faiss": "0" * 64})
    assert Manifest.from_json(m.to_json()) == m
    legacy = {k: v for k, v in json.loads(m.to_json()).items() if k != "manifest_sha256"}
    assert Manifest.from_json(json.dumps(legacy)) == m  # manifests written before the self-checksum still load
    with pytest.raises(ValueError, match="does not match its content"):
        Manifest.from_json(json.dumps({**json.loads(m.to_json()), "count": 4}))
    with pytest.raises(ValueError, match="manifest lacks"):
        Manifest.from_json(json.dumps({"dim": 4}))


@pytest.mark.parametrize("field, value", [("files", 1.5), ("files", {"index.faiss": 1}), ("count", "12"),
                                          ("dim", True), ("params", [1, 2]), ("model_version", None)])
def test_a_rehashed_manifest_with_wrong_types_is_refused(field: str, value: object) -> None:
    m = Manifest(index_version="v", model_name="n", model_version="1", dim=4, kind="flat", params={},
                 count=3, created="2024-01-01T00:00:00Z", files={"index.faiss": "0" * 64})
    body = {**json.loads(m.to_json()), field: value}
    body.pop("manifest_sha256")  # a buggy writer's checksum over its own content passes; the types do not
    with pytest.raises(ValueError, match=f"wrong types: {field}="):
        Manifest.from_json(json.dumps(body))
    with pytest.raises(ValueError, match="want an object"):
        Manifest.from_json("[1, 2]")


def test_load_without_current_or_with_unknown_version(tmp_path: Path, publish: Callable[..., str]) -> None:
    with pytest.raises(IndexVerificationError, match="no CURRENT pointer"):
        load_version(tmp_path)
    publish()
    with pytest.raises(IndexVerificationError, match=f"{MANIFEST_FILE} is missing"):
        load_version(tmp_path, "no-such-version")


def test_set_current_is_an_atomic_replace(publish: Callable[..., str], tmp_path: Path) -> None:
    first, second = publish(), publish()
    assert read_current(tmp_path) == second
    inode_before = (tmp_path / CURRENT).stat().st_ino
    set_current(tmp_path, first)
    assert read_current(tmp_path) == first
    assert (tmp_path / CURRENT).stat().st_ino != inode_before  # a new file renamed over, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == [CURRENT, VERSIONS]  # no temp file left behind


def test_set_current_refuses_a_version_without_manifest(publish: Callable[..., str], tmp_path: Path) -> None:
    version = publish()
    (tmp_path / VERSIONS / "half-written").mkdir()
    with pytest.raises(IndexVerificationError, match="has no manifest"):
        set_current(tmp_path, "half-written")
    with pytest.raises(IndexVerificationError, match="has no manifest"):
        set_current(tmp_path, "missing")
    assert read_current(tmp_path) == version
    assert sorted(os.listdir(tmp_path)) == [CURRENT, VERSIONS]


def test_versions_are_listed_in_publish_order(publish: Callable[..., str], tmp_path: Path) -> None:
    published = [publish(model_version=v) for v in ("9", "10", "1", "1")]  # within one second, too
    assert len(set(published)) == 4
    assert list_versions(tmp_path) == published


def test_prune_keeps_the_newest_and_the_current(publish: Callable[..., str], tmp_path: Path) -> None:
    versions = [publish() for _ in range(4)]
    set_current(tmp_path, versions[0])
    removed = prune_versions(tmp_path, keep=2)
    assert removed == versions[1:2]
    assert list_versions(tmp_path) == [versions[0], *versions[2:]]
    assert load_version(tmp_path).manifest.index_version == versions[0]
    set_current(tmp_path, versions[3])
    assert prune_versions(tmp_path, keep=1) == [versions[0], versions[2]]
    assert list_versions(tmp_path) == [versions[3]]
    assert prune_versions(tmp_path, keep=1) == []
    with pytest.raises(ValueError, match="keep=0"):
        prune_versions(tmp_path, keep=0)


def test_a_manifest_whose_checksum_key_is_damaged_is_not_taken_for_a_legacy_one(publish: Callable[..., str],
                                                                                 tmp_path: Path) -> None:
    """A manifest without `manifest_sha256` is read as one written before checksums, but only with exactly
    the old fields: a bit flipped in the key itself leaves an unknown field behind, and is refused."""
    version = publish()
    path = tmp_path / VERSIONS / version / MANIFEST_FILE
    path.write_text(path.read_text().replace('"manifest_sha256"', '"manifest_sha246"'))
    with pytest.raises(IndexVerificationError, match="manifest_sha246"):
        load_version(tmp_path)
