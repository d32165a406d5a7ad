"""`SwapBarrier`: members of a `--processes` group swap to a new pair together (slot files, threads here)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from embed.items import Item
from index.config import IndexConfig
from index.log import LogRecord
from index.publish import load_version, publish_index
from service.config import ServiceConfig
from service.registry import lookup_model
from service.snapshot import SnapshotHolder, Watcher
from service.swap_barrier import SwapBarrier

from .conftest import Served
from .test_reliability import _own_index_root

OLD, NEW, NEWER = ("1", "v1"), ("2", "v2"), ("3", "v3")


def _agree_later(barrier: SwapBarrier, pair: tuple[str, str], after_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after_s), barrier.agree(pair)))
    thread.start()
    return thread


def test_a_staged_pair_waits_for_every_member_then_swaps(tmp_path: Path) -> None:
    a, b = SwapBarrier(tmp_path, 0, 2, wait_s=30), SwapBarrier(tmp_path, 1, 2, wait_s=30)
    a.announce(OLD)
    b.announce(OLD)
    other = _agree_later(b, NEW, 0.5)  # the second member loads the pair half a second later
    started = time.monotonic()
    assert a.agree(NEW)
    assert 0.4 < time.monotonic() - started < 5
    other.join()


def test_a_newer_pair_staged_by_another_member_makes_this_one_give_up(tmp_path: Path) -> None:
    a, b = SwapBarrier(tmp_path, 0, 2, wait_s=30), SwapBarrier(tmp_path, 1, 2, wait_s=30)
    b.announce(OLD)
    other = _agree_later(b, NEWER, 0.3)  # published after NEW: b loaded it first
    assert a.agree(NEW) is False
    assert a.agree(NEWER)  # the next poll loads the newer pair: both agree
    other.join()


def test_a_member_that_never_loads_the_pair_holds_the_others_back_only_so_long(tmp_path: Path) -> None:
    a, b = SwapBarrier(tmp_path, 0, 2, wait_s=0.5), SwapBarrier(tmp_path, 1, 2)
    b.announce(OLD)  # e.g. refused the new index, or restarting
    started = time.monotonic()
    assert a.agree(NEW)
    assert time.monotonic() - started >= 0.5


def test_waiting_stops_when_the_server_stops(tmp_path: Path) -> None:
    a = SwapBarrier(tmp_path, 0, 2, wait_s=30)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert a.agree(NEW, stop.is_set) is False


def test_two_members_swap_together_and_keep_what_was_written_while_one_waited(served: Served,
                                                                               tmp_path: Path) -> None:
    """Two holders on one index root, as the two members of a group: the first to load a new version keeps
    serving the old one (and taking writes) until the second has loaded it; then both serve it, writes included."""
    root = _own_index_root(served, tmp_path / "index")
    holders = [SnapshotHolder(ServiceConfig(model_uri=str(served.encoder_dir), index_root=root, poll_seconds=0,
                                            cache_dir=tmp_path / "cache", swap_dir=tmp_path, swap_slot=slot,
                                            swap_members=2)) for slot in (0, 1)]
    try:
        for h in holders:
            assert h.refresh()
        old = holders[0].current.index.index_version  # type: ignore[union-attr]
        current = load_version(root)
        ref = lookup_model(str(served.encoder_dir))
        new = publish_index(root, np.asarray(current.vectors), current.ids, IndexConfig(kind="flat"), ref.name,
                            ref.version).manifest.index_version
        first = threading.Thread(target=holders[0].refresh)
        first.start()  # loads the new version, then waits for the other member
        time.sleep(1.0)
        assert first.is_alive() and holders[0].current.index.index_version == old  # type: ignore[union-attr]
        written = upsert_record(holders[0], "written-while-waiting")
        assert holders[1].refresh()
        first.join(timeout=30)
        for h in holders:
            snap = h.current
            assert snap is not None and snap.index.index_version == new
            np.testing.assert_array_equal(snap.index.vector("written-while-waiting"), written)
    finally:
        for h in holders:
            h.stopping.set()
            h.close()


def upsert_record(holder: SnapshotHolder, item_id: str) -> np.ndarray:
    """An upsert acknowledged by `holder`'s served snapshot, as the servicer writes one; returns its vector."""
    snap = holder.current
    assert snap is not None
    item = Item(item_id=item_id, title="a lamp written during a swap")
    vector = snap.encoder.encode([item])[0]
    with holder.write_lock:
        snap.index.upsert([LogRecord(op="upsert", item_id=item_id, model_version=snap.model_version, vector=vector,
                                     content=item.to_content(), content_hash=item.content_hash())])
    return vector


def test_a_member_whose_poll_is_far_off_polls_when_another_stages_a_pair(served: Served, tmp_path: Path) -> None:
    """One member polls every 0.3 s, the other every 10 minutes: the second polls as soon as the first has
    staged the new version, so both swap to it about one load later, not 10 minutes (or 120 s) later."""
    root = _own_index_root(served, tmp_path / "index")
    holders = [SnapshotHolder(ServiceConfig(model_uri=str(served.encoder_dir), index_root=root, poll_seconds=0,
                                            cache_dir=tmp_path / "cache", swap_dir=tmp_path, swap_slot=slot,
                                            swap_members=2)) for slot in (0, 1)]
    watchers = [Watcher(h, poll) for h, poll in zip(holders, (0.3, 600.0), strict=True)]
    try:
        for h in holders:
            assert h.refresh()
        for w in watchers:
            w.start()
        current = load_version(root)
        ref = lookup_model(str(served.encoder_dir))
        new = publish_index(root, np.asarray(current.vectors), current.ids, IndexConfig(kind="flat"), ref.name,
                            ref.version).manifest.index_version
        deadline = time.monotonic() + 60
        while {h.served_pair() for h in holders} != {(ref.version, new)}:
            assert time.monotonic() < deadline, [h.served_pair() for h in holders]
            time.sleep(0.05)
    finally:
        for w in watchers:
            w.stop()
        for h in holders:
            h.close()


def test_a_member_restarted_into_a_running_group_joins_its_pair_and_waits_for_it_to_load_a_newer_one(
        served: Served, tmp_path: Path) -> None:
    """A restarted member comes up at once on the pair the group serves; if a newer pair was published while
    it was down, it does not serve that pair ahead of the others: it waits (not listening yet) until they
    have loaded it too, and the group swaps together. (Watchers are not started: each poll is called here.)"""
    root = _own_index_root(served, tmp_path / "index")

    def member(slot: int) -> SnapshotHolder:
        return SnapshotHolder(ServiceConfig(model_uri=str(served.encoder_dir), index_root=root,
                                            poll_seconds=600, cache_dir=tmp_path / "cache", swap_dir=tmp_path,
                                            swap_slot=slot, swap_members=2))

    def start(holder: SnapshotHolder) -> threading.Thread:
        thread = threading.Thread(target=holder.refresh)
        thread.start()
        return thread

    holders = [member(0), member(1)]
    try:
        for h in holders:
            assert h.refresh()
        old = holders[0].served_pair()
        holders[1].close()
        holders[1] = member(1)  # restarted, nothing new published: the group's pair, no wait
        start(holders[1]).join(timeout=60)
        assert holders[1].served_pair() == old
        holders[1].close()
        current = load_version(root)
        ref = lookup_model(str(served.encoder_dir))
        new = publish_index(root, np.asarray(current.vectors), current.ids, IndexConfig(kind="flat"), ref.name,
                            ref.version).manifest.index_version
        holders[1] = member(1)  # restarted after the publication
        restarted = start(holders[1])
        time.sleep(1.0)
        assert restarted.is_alive() and holders[1].current is None  # loaded, staged, not serving yet
        assert holders[0].served_pair() == old
        assert holders[0].refresh()  # the other member's poll: it loads the new pair, and both swap
        restarted.join(timeout=60)
        assert [h.served_pair() for h in holders] == [(ref.version, new)] * 2
    finally:
        for h in holders:
            h.stopping.set()
            h.close()

