"""SIGKILLs of a real `onetower serve` during mixed upserts and deletes, and of a real `onetower reindex` in
each of its phases with a server on the same root: the machinery of `tests/integration/test_crash.py`
(its writer threads, ledger and checks) at the counts of issue 19, over the tiny world of `world.py`."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embed.items import Item
from embed.load import load_encoder
from index.publish import VERSIONS, list_versions, load_version, read_current, verify_version
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from tests.chaos.world import ServeProc, World, fresh_root
from tests.integration import crash_util
from tests.integration.crash_util import PHASES, wait_for
from tests.integration.test_crash import CATALOG, WORDS, Ledger, Titles, Writer, check_ledger, live_items
from training.reindex.job import default_work_dir

WRITERS = 2
OWNED_CAP = 150  # ids per writer: the k=1000 listing of `live_items` must see every item


@dataclass
class KillResult:
    kills: int = 0
    acked: int = 0  # acknowledged write calls (upserts and deletes)
    acked_deletes: int = 0
    in_flight: int = 0  # kills with a write sent and never answered
    lost: list[str] = field(default_factory=list)
    resurrected: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # served twice, wrong content, writer errors, unverified versions
    restart_s: list[float] = field(default_factory=list)
    completed: int = 0  # reindex runs that finished before reaching their pause point (no kill)

    @property
    def failures(self) -> list[str]:
        return self.lost + self.resurrected + self.other

    def record(self, error: AssertionError) -> None:
        text = str(error).splitlines()[0][:400]
        (self.resurrected if "is back" in text else self.lost if "is lost" in text else self.other).append(text)


class CountingLedger(Ledger):
    """The ledger of test_crash.py, counting acknowledged calls."""

    def __init__(self, known: dict[str, str | None]) -> None:
        super().__init__(known=known)
        self.acks = self.delete_acks = 0

    def acknowledge(self, changes: dict[str, str | None]) -> None:
        super().acknowledge(changes)
        with self.lock:
            self.acks += 1
            self.delete_acks += all(v is None for v in changes.values())


class BoundedWriter(Writer):
    """test_crash's writer, drawing new ids only while it owns fewer than OWNED_CAP."""

    def _next_op(self) -> tuple[bool, dict[str, str | None]]:
        if len(self.owned) < OWNED_CAP:
            return super()._next_op()
        with self.ledger.lock:
            present = [i for i in self.owned if self.ledger.known.get(i) is not None]
        chosen = self.rng.sample(self.owned, self.rng.randint(1, 3))
        if self.rng.random() < 0.3 and present:
            return True, dict.fromkeys(self.rng.sample(present, min(len(chosen), len(present))))
        return False, {i: f"{self.rng.choice(WORDS)} {self.rng.randrange(10**6)}" for i in chosen}


class LocalTitles(Titles):
    """Embeddings of titles by the served encoder loaded in this process (no second server)."""

    def __init__(self, world: World, catalog_vectors: dict[str, np.ndarray]) -> None:
        super().__init__(None, catalog_vectors)  # type: ignore[arg-type]
        self.encoder = load_encoder(world.encoder_dir)

    def vector(self, item_id: str, state: str) -> np.ndarray:
        if state == CATALOG:
            return self.catalog[item_id]
        if state not in self._cache:
            self._cache[state] = self.encoder.encode([Item(item_id="probe", title=state)])[0]
        return self._cache[state]


def run_write_kills(world: World, work: Path, kills: int, seed: int, acks: tuple[int, int] = (8, 40)) -> KillResult:
    """`kills` rounds on one data dir: writers -> SIGKILL after a random number of acks -> restart -> check."""
    rng = random.Random(seed)
    server = ServeProc(world, fresh_root(world, work / "index"), work / "serve.log")
    result = KillResult()
    server.start()
    try:
        with Client(server.target) as c:
            catalog = live_items(c)
        ledger = CountingLedger(dict.fromkeys(catalog, CATALOG))
        titles = LocalTitles(world, catalog)
        owned: list[list[str]] = [sorted(catalog)[w::WRITERS * 8] for w in range(WRITERS)]
        for n in range(kills):
            note = f"write kill {n} (seed {seed})"
            acked = threading.Semaphore(0)
            writers = [BoundedWriter(w, server.target, ledger, owned[w], rng.randrange(2**32), acked)
                       for w in range(WRITERS)]
            for w in writers:
                w.start()
            for _ in range(rng.randint(*acks)):
                if not acked.acquire(timeout=60):
                    result.other.append(f"{note}: writers stalled: {[w.error for w in writers]}")
                    return result
            killed_at = time.monotonic()
            crash_util.sigkill(server.proc)  # type: ignore[arg-type]
            result.kills += 1
            for w in writers:
                w.join(timeout=60)
                if w.is_alive() or w.error is not None:
                    result.other.append(f"{note}: {w.name} failed: {w.error!r}"[:400])
            result.in_flight += sum(w.cut_sent_at is not None and w.cut_sent_at < killed_at for w in writers)
            result.restart_s.append(server.start())
            try:
                with Client(server.target) as c:
                    check_ledger(c, ledger, titles, note)
            except AssertionError as e:
                result.record(e)
                return result  # the ledger no longer says what was acknowledged
        result.acked, result.acked_deletes = ledger.acks, ledger.delete_acks
    finally:
        server.stop()
    return result


class Querier(threading.Thread):
    """Asks the server what it serves every 0.2 s; every version it meets must verify on disk."""

    def __init__(self, server: ServeProc, query_id: str) -> None:
        super().__init__(name="querier", daemon=True)
        self.server, self.query_id = server, query_id
        self.stopped, self.paused = threading.Event(), threading.Event()
        self.versions: set[str] = set()
        self.calls = 0
        self.failures: list[str] = []

    def run(self) -> None:
        import grpc

        while not self.stopped.wait(0.2):
            if self.paused.is_set():
                continue
            try:
                with Client(self.server.target, timeout=10) as c:
                    version = c.info().index_version
                    hits = c.similar(item_ids=[self.query_id], k=5)[0]
                self.calls += 1
            except grpc.RpcError as e:
                if not self.paused.is_set():
                    self.failures.append(f"query failed: {e.code().name}: {e.details()}"[:300])
                continue
            if len(hits) != 5:
                self.failures.append(f"{len(hits)} neighbours from {version}")
            if version not in self.versions:
                self.versions.add(version)
                try:
                    verify_version(self.server.root / VERSIONS / version)
                except Exception as e:  # noqa: BLE001 (what is counted)
                    self.failures.append(f"served {version}, which does not verify: {e}"[:300])


def _check_root(root: Path) -> str:
    """CURRENT names a version that loads and verifies, and so does every listed version."""
    current = read_current(root)
    if current is None or current not in list_versions(root):
        raise AssertionError(f"CURRENT {current!r} is not a listed version")
    load_version(root)
    for version in list_versions(root):
        verify_version(root / VERSIONS / version)
    return current


def _reindex_job(world: World, root: Path, work: Path, phase: str, marker: Path,
                 log: Path) -> subprocess.Popen[bytes]:
    """`onetower reindex --model <encoder dir>` through crash_util's pause hook (it pauses at `phase`)."""
    cmd = [sys.executable, crash_util.__file__, phase, str(marker), "--", "reindex", "--catalog", str(world.catalog),
           "--index-root", str(root), "--model", str(world.encoder_dir), "--kind", "flat", "--device", "cpu",
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=crash_util.REPO)


def run_reindex_kills(world: World, work: Path, kills: int, seed: int) -> KillResult:
    """`kills` SIGKILLs of `onetower reindex`, phases in turn, with live writes before each run and a server
    (1 s watcher) on the same root queried throughout; after each kill the root holds only verified
    versions, CURRENT is one of them, and the server (after any swap) holds every acknowledged write."""
    rng = random.Random(seed)
    root = fresh_root(world, work / "index")
    server = ServeProc(world, root, work / "serve.log", poll_seconds=1)
    result = KillResult()
    server.start()
    querier: Querier | None = None
    try:
        with Client(server.target) as c:
            catalog = live_items(c)
        ledger = CountingLedger(dict.fromkeys(catalog, CATALOG))
        titles = LocalTitles(world, catalog)
        ids = sorted(catalog)
        querier = Querier(server, ids[0])
        querier.start()
        for n in range(kills * 3):  # attempts: a run that finds nothing to do at its phase completes instead
            if result.kills >= kills:
                break
            phase = PHASES[n % len(PHASES)]
            note = f"reindex kill {result.kills} at {phase} (seed {seed})"
            changes: dict[str, str | None] = {f"re-{n}-{j}": f"{rng.choice(WORDS)} {n}" for j in range(2)}
            victim = rng.choice(ids[1:])
            changes[victim] = None if ledger.known.get(victim) is not None else f"{rng.choice(WORDS)} back {n}"
            with Client(server.target, timeout=60) as c:
                ledger.begin(changes)
                c.upsert([pb.Item(item_id=i, title=t) for i, t in changes.items() if t is not None])
                if changes[victim] is None:
                    c.delete([victim])
                ledger.acknowledge(changes)
            if phase == "embed":  # resumed from earlier runs' shards, a run would finish without embedding
                shutil.rmtree(default_work_dir(root, world.model_version), ignore_errors=True)
            marker, job_log = work / f"{n}.paused", work / "reindex.log"
            job = _reindex_job(world, root, work, phase, marker, job_log)
            try:
                wait_for(lambda m=marker, j=job: m.exists() or j.poll() is not None, f"the reindex to pause at {phase}",
                         timeout=300)
                if not marker.exists():
                    if job.returncode != 0:
                        result.other.append(f"{note}: reindex exited {job.returncode}: {crash_util.tail(job_log, 500)}")
                        return result
                    # a run that finished before its pause point was not killed: counted apart, not as a kill
                    result.completed += 1
                    result.other.append(f"{note}: the run finished before its pause point")
                    return result
                else:
                    crash_util.sigkill(job)
                    result.kills += 1
            finally:
                if job.poll() is None:
                    job.kill()
                    job.wait()
            try:
                current = _check_root(root)
                with Client(server.target) as c:
                    wait_for(lambda v=current: c.info().index_version == v, "the server to serve CURRENT", timeout=60)
                    check_ledger(c, ledger, titles, note)
            except Exception as e:  # noqa: BLE001 (what is counted)
                result.record(e if isinstance(e, AssertionError) else AssertionError(f"{note}: {e!r}"))
                result.acked, result.acked_deletes = ledger.acks, ledger.delete_acks
                return result
        querier.paused.set()
        crash_util.sigkill(server.proc)  # type: ignore[arg-type]
        result.restart_s.append(server.start())  # the whole log replayed over an index that folded part of it
        querier.paused.clear()
        try:
            with Client(server.target) as c:
                check_ledger(c, ledger, titles, "reindex kills, after a restart")
        except AssertionError as e:
            result.record(e)
        result.acked, result.acked_deletes = ledger.acks, ledger.delete_acks
    finally:
        if querier is not None:
            querier.stopped.set()
            querier.join(timeout=30)
            result.other += querier.failures
        server.stop()
    return result
