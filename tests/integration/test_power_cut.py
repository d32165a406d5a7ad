"""Power cuts of the live-write log (issue 19), on the lost-write filesystem (tests/chaos/lostfs.py).

A real writer process appends upserts and deletes through `index.log.WriteLog` (compacting every few
appends), is SIGKILLed after a random number of acknowledged appends, and the power is cut: what was
never fsync'd (file data, and names in folders never fsync'd) is dropped, or in the `random` mode a
random part of it survives. After the remount the log reopens and every acknowledged write is its
item's newest record, no acknowledged delete comes back, and no state appears that nobody wrote. The
batch in flight at the kill may be found either way. Run at larger counts by `make chaos`.
"""

# ruff: noqa: F811  (pytest fixtures arrive as parameters named like the imported fixture)
from __future__ import annotations

import errno
import gc
import random

import pytest

from index.config import IndexConfig
from index.log import LOG_FILE, WriteLog
from index.publish import publish_index, read_current
from index.shards import ShardStore
from tests.chaos.log_cuts import run_log_cuts
from tests.chaos.log_writer import record
from tests.chaos.lostfs import Fault, LostMount
from tests.chaos.mounts import lostfs  # noqa: F401  (the fixture)
from tests.chaos.publish_cuts import MODEL, _vectors, check_root, run_publish_cuts, run_truncate_cuts

CUTS = 6


def test_power_cuts_of_the_live_log_lose_no_acknowledged_write(lostfs: LostMount) -> None:
    seed = random.SystemRandom().randrange(2**31)
    # first without compaction (the log's own creation must be durable: only its appends fsync), then
    # compacting every 7 appends (the rewrite: live.tmp, fsync, rename, folder fsync)
    results = [run_log_cuts(lostfs, 2, seed, compact_every=0), run_log_cuts(lostfs, CUTS - 2, seed + 1)]
    failures = [f for r in results for f in r.failures]
    assert not failures, "\n".join(failures[:10])
    assert sum(r.cuts for r in results) == CUTS and sum(r.acked for r in results) >= 5 * CUTS
    assert sum(r.compactions for r in results) > 0, f"no compaction ran before a cut (seed {seed})"


def test_power_cuts_of_publish_and_of_the_log_truncate_keep_one_verified_version(lostfs: LostMount) -> None:
    """Publish (staging folder, files, manifest, rename, CURRENT) and prune, and a reindex's log truncate,
    each dying at a random change of the disk, then a power cut: CURRENT names a version that loads and
    verifies (the old one, or the new one once publish returned), every listed version verifies, and the
    log holds all its records or exactly those from `keep_from` on (only the latter once truncate returned)."""
    seed = random.SystemRandom().randrange(2**31)
    results = [run_publish_cuts(lostfs, 8, seed), run_truncate_cuts(lostfs, 8, seed)]
    failures = [f for r in results for f in r.failures]
    assert not failures, "\n".join(failures[:10])
    assert all(r.cuts == 8 for r in results)


def _errno_rule(op: str, path: str, error: str) -> list[Fault]:
    return [Fault(op=op, path=path, error=error, times=0)]


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("op", ["write", "fsync"])
def test_a_failed_log_append_is_not_acknowledged_and_leaves_no_torn_record(lostfs: LostMount, op: str,
                                                                           error: str) -> None:
    path = lostfs.mountpoint / "index" / LOG_FILE
    log = WriteLog(path)
    log.append([record("a", "h1")])
    lostfs.faults(_errno_rule(op, f"*/{LOG_FILE}", error))
    with pytest.raises(OSError) as raised:
        log.append([record("b", "h2"), record("c", None)])
    assert raised.value.errno == getattr(errno, error)
    lostfs.faults([])
    log.append([record("d", "h3")])  # the next write works once the disk does
    log.close()
    lostfs.cut("drop")
    reopened = WriteLog(path)
    try:
        assert [(e.item_id, e.content_hash) for e in reopened.entries] == [("a", "h1"), ("d", "h3")]
    finally:
        reopened.close()


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("op", ["create", "write", "fsync", "rename", "fsyncdir"])
def test_a_failed_log_truncate_keeps_the_whole_log(lostfs: LostMount, op: str, error: str) -> None:
    path = lostfs.mountpoint / "index" / LOG_FILE
    log = WriteLog(path)
    for i in range(4):
        log.append([record(f"i{i}", f"h{i}")])
    lostfs.faults(_errno_rule(op, "*/live.*" if op != "fsyncdir" else "*/index", error))
    with pytest.raises(OSError) as raised:
        log.truncate(keep_from=2)
    assert raised.value.errno == getattr(errno, error)
    lostfs.faults([])
    log.close()
    lostfs.cut("drop")
    reopened = WriteLog(path)
    try:  # all four records, or (the rename made, its folder fsync failed) exactly the last two
        kept = [e.item_id for e in reopened.entries]
        assert kept in (["i0", "i1", "i2", "i3"], ["i2", "i3"] if op == "fsyncdir" else None), kept
    finally:
        reopened.close()


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("name", ["index.faiss", "ids.parquet", "vectors.npy", "manifest.json", ".CURRENT.tmp"])
def test_a_failed_publish_names_the_file_and_leaves_the_old_version_serving(lostfs: LostMount, name: str,
                                                                            error: str) -> None:
    root = lostfs.mountpoint / "root"
    x, ids = _vectors(30, 1)
    config = IndexConfig(kind="flat")
    old = publish_index(root, x, ids, config, MODEL, "1").manifest.index_version
    gc.collect()
    lostfs.faults(_errno_rule("write", f"*/{name}", error))
    with pytest.raises(OSError) as raised:
        publish_index(root, x, ids, config, MODEL, "1")
    message = str(raised.value)
    del raised  # its traceback holds the memory maps of the verified new version: the cut needs them closed
    gc.collect()
    assert f"could not write {root}" in message and name in message, message
    lostfs.faults([])
    assert check_root(root) == old
    for _ in range(2):  # a restart, then a power cut: still the old version, nothing half-written listed
        lostfs.cut("drop")
        assert check_root(root) == old
    assert read_current(root) == old


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
def test_a_failed_shard_write_leaves_a_resumable_store(lostfs: LostMount, error: str) -> None:
    store = ShardStore(lostfs.mountpoint / "work", {"model": "1"})
    x, _ = _vectors(4, 2)
    store.write(["a", "b", "c", "d"], ["h"] * 4, [""] * 4, x)
    lostfs.faults(_errno_rule("write", "*/shard-000001.*", error))
    with pytest.raises(OSError) as raised:
        store.write(["e", "f", "g", "h"], ["h"] * 4, [""] * 4, x)
    assert "shard-000001" in str(raised.value), raised.value
    lostfs.faults([])
    lostfs.cut("drop")
    resumed = ShardStore(lostfs.mountpoint / "work", {"model": "1"})
    assert [s.item_ids for s in resumed.shards()] == [["a", "b", "c", "d"]]
    resumed.write(["e", "f", "g", "h"], ["h"] * 4, [""] * 4, x)
    assert len(resumed.shards()) == 2
