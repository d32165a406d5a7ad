"""Power cuts of a publication (staging folder, manifest, rename, `CURRENT`) and of the reindex's log
truncate, on the lost-write filesystem. Shared by the CI test and `make chaos`.

The machine "dies" at a random filesystem operation: from the nth change of the disk on, every change
fails with EIO (so nothing after it can become durable), then the power is cut and the filesystem
remounted. This reaches every point of the operation in order, without timing.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.config import IndexConfig
from index.errors import IndexLayerError
from index.ids import IdMap
from index.log import LOG_FILE, WriteLog
from index.publish import (
    VERSIONS,
    list_versions,
    load_version,
    prune_versions,
    publish_index,
    read_current,
    verify_version,
)
from tests.chaos.log_writer import record
from tests.chaos.lostfs import Fault, LostMount

MODEL = "chaos-model"


@dataclass
class CutResult:
    cuts: int = 0
    completed: int = 0  # cuts after the operation returned (acknowledged)
    failures: list[str] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)


def _vectors(n: int, seed: int) -> tuple[np.ndarray, IdMap]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"item-{seed}-{i}" for i in range(n)]
    return x, IdMap(ids, [f"h{i}" for i in range(n)], [{} for _ in ids])


def _count_changes(mount: LostMount, action: Any) -> int:
    mount.faults([Fault(op="*", after=10**9)])
    action()
    seen = int(mount.stats()["faults"][0]["seen"])
    mount.faults([])
    return seen


def _die_at(mount: LostMount, n: int, action: Any) -> bool:
    """Run `action` with every disk change from the nth on failing; True when it completed."""
    mount.faults([Fault(op="*", after=n, times=0)])
    try:
        action()
        done = True
    except (OSError, IndexLayerError, RuntimeError):  # faiss reports a failed write as RuntimeError
        done = False
    mount.faults([])
    gc.collect()  # memory maps of a failed load hold the mount busy
    return done


def check_root(root: Path) -> str:
    """Exactly one verified version serves: CURRENT names a version that loads and verifies, and every
    listed version verifies; returns it."""
    current = read_current(root)
    if current is None:
        raise AssertionError(f"{root}/CURRENT is missing or empty")
    load_version(root, current, mmap=False)
    for version in list_versions(root):
        verify_version(root / VERSIONS / version)
    return current


def run_publish_cuts(mount: LostMount, cuts: int, seed: int) -> CutResult:
    rng = random.Random(seed)
    root = mount.mountpoint / f"pub-{seed}"
    x, ids = _vectors(50, seed)
    config = IndexConfig(kind="flat")
    def publish() -> None:
        publish_index(root, x, ids, config, MODEL, "1")  # the result maps vectors.npy: dropped at once

    publish()  # durable before any cut: publish fsyncs
    total = _count_changes(mount, publish)
    result = CutResult()
    for n in range(cuts):
        note = f"publish cut {n} (seed {seed})"
        before, listed = read_current(root), set(list_versions(root))
        at = rng.randint(0, total + total // 4)  # past the end: it completes, and must stay after the cut
        done = _die_at(mount, at, publish)
        acked = read_current(root) if done else None
        result.reports.append(mount.cut(rng.choice(("drop", "random")), seed=rng.randrange(2**31)))
        result.cuts += 1
        result.completed += done
        try:
            current = check_root(root)
        except (AssertionError, IndexLayerError, OSError, ValueError) as e:
            result.failures.append(f"{note}, died at change {at} of {total}: {type(e).__name__}: {e}")
            return result
        if done and current != acked:
            result.failures.append(f"{note}: publish returned {acked} but CURRENT is {current} after the cut")
        if current != before and current in listed:  # the only other choice: the version in flight
            result.failures.append(f"{note}: CURRENT is {current}, neither {before} nor the version in flight")
        if rng.random() < 0.3:  # prune too, and cut it
            _die_at(mount, rng.randint(0, 20), lambda: prune_versions(root, keep=1))
            result.reports.append(mount.cut("drop"))
            try:
                if check_root(root) != current:
                    result.failures.append(f"{note}: prune moved CURRENT")
            except (AssertionError, IndexLayerError, OSError, ValueError) as e:
                result.failures.append(f"{note}, pruning: {type(e).__name__}: {e}")
                return result
    return result


def run_truncate_cuts(mount: LostMount, cuts: int, seed: int) -> CutResult:
    """A log of acknowledged records, a reindex's `truncate(keep_from)` cut at a random change: after the
    cut the log holds either every record or exactly the records from `keep_from` on, and reopens."""
    rng = random.Random(seed)
    path = mount.mountpoint / f"trunc-{seed}" / LOG_FILE
    result = CutResult()
    for n in range(cuts):
        note = f"truncate cut {n} (seed {seed})"
        log = WriteLog(path)
        for j in range(rng.randint(3, 12)):
            log.append([record(f"item-{rng.randrange(8)}", None if rng.random() < 0.3 else f"{seed}-{n}-{j}")])
        full = [(e.op, e.item_id, e.content_hash) for e in log.entries]
        keep_from = rng.randint(0, len(full))
        at = rng.randint(0, 9)  # a truncate makes ~7 changes (tmp, writes, fsync, rename, folder fsync)
        done = _die_at(mount, at, lambda log=log, k=keep_from: log.truncate(k))
        log.close()
        result.reports.append(mount.cut(rng.choice(("drop", "random")), seed=rng.randrange(2**31)))
        result.cuts += 1
        result.completed += done
        try:
            reopened = WriteLog(path)
            after = [(e.op, e.item_id, e.content_hash) for e in reopened.entries]
            reopened.close()
        except (IndexLayerError, OSError) as e:
            result.failures.append(f"{note}: the log does not reopen: {type(e).__name__}: {e}")
            return result
        allowed = [full[keep_from:]] if done else [full, full[keep_from:]]
        if after not in allowed:
            result.failures.append(f"{note}: {len(after)} records after the cut; expected "
                                   f"{' or '.join(str(len(a)) for a in allowed)} (of {len(full)}, keep_from {keep_from})")
    return result
