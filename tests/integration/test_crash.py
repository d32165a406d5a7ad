"""SIGKILL of real processes and damaged index files (issue 9).

- `onetower serve` killed at a random moment of a stream of upserts and deletes, several rounds on
  one data dir: every acknowledged write is there after the restart, no acknowledged delete comes
  back, no item twice.
- `onetower reindex` killed in each phase of embed -> build -> write -> CURRENT rename -> log trim,
  with a server on the same root answering throughout: only verified versions are ever served, and a
  rerun publishes.
- Truncated, bit-flipped and swapped `index.faiss` / `ids.parquet` refused before `faiss.read_index`
  while a live server keeps serving the previous index.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from index.config import IndexConfig
from index.errors import IndexVerificationError
from index.faiss_index import import_faiss
from index.ids import IdMap
from index.publish import (
    IDS_FILE,
    INDEX_FILE,
    VERSIONS,
    list_versions,
    load_version,
    publish_index,
    read_current,
    set_current,
    verify_version,
)
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.config import ServiceConfig
from service.server import start_server
from training.lifecycle.register import MODEL_NAME

from .conftest import Trained, free_port
from .crash_util import PHASES, copy_index_root, reindex_process, serve_process, sigkill, tail, wait_for

ROUNDS = 3  # server kills during writes
WRITERS = 2  # client threads, each writing its own ids, one request at a time
MATCH_COSINE = 0.999  # a stored vector and a fresh embedding of the same content (batch padding moves ~1e-6)
CATALOG = "<catalog>"  # the state of a catalog item nobody wrote yet
WORDS = ("Ostrel wool hat", "linen shirt", "oak side table", "copper kettle", "trail running shoe",
         "ceramic mug", "leather wallet", "desk lamp", "rain jacket", "cast iron pan", "yoga mat", "cotton scarf")


def _copy_root(trained: Trained, tmp_path: Path) -> Path:
    """A private copy of the trained index root (published versions only: no live writes of other tests)."""
    return copy_index_root(trained.index_root, tmp_path / "index")


@dataclass
class Server:
    """`onetower serve` on `root` as a real process, restartable on a new port."""

    trained: Trained
    root: Path
    log: Path
    poll_seconds: float = 0
    proc: subprocess.Popen[bytes] | None = None
    target: str = ""

    def start(self) -> None:
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.proc = serve_process(self.root, self.trained.tracking_uri, port, self.trained.workdir / "crash-cache",
                                  self.log, self.poll_seconds)
        with Client(self.target, timeout=2) as c:
            wait_for(lambda: _serving(c), "SERVING", self.proc, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        sigkill(self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _serving(c: Client) -> bool:
    try:
        return c.health_status() == "SERVING"
    except grpc.RpcError:
        return False


@pytest.fixture()
def embedder(trained: Trained) -> Iterator[Client]:
    """An in-process server on the trained model: embeds titles for checking what a crashed server stored."""
    running = start_server(ServiceConfig(model_uri=f"models:/{MODEL_NAME}@champion", index_root=trained.index_root,
                                         tracking_uri=trained.tracking_uri, port=0, poll_seconds=0,
                                         cache_dir=trained.workdir / "crash-cache"))
    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            yield c
    finally:
        running.stop(grace=1)


# ---- what the client knows ----------------------------------------------------------------------
@dataclass
class Ledger:
    """Per item id: the acknowledged state (a title, CATALOG, or None for deleted), or, for a write the
    kill cut off, the states it may have left (before or after)."""

    known: dict[str, str | None]
    unsettled: dict[str, set[str | None]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, changes: dict[str, str | None]) -> None:
        with self.lock:
            for item_id, new in changes.items():
                self.unsettled[item_id] = {self.known.get(item_id), new}

    def acknowledge(self, changes: dict[str, str | None]) -> None:
        with self.lock:
            for item_id, new in changes.items():
                self.known[item_id] = new
                del self.unsettled[item_id]


class Titles:
    """Embeddings of titles (cached) and of the catalog items as first served, to identify stored vectors."""

    def __init__(self, embedder: Client, catalog_vectors: dict[str, np.ndarray]) -> None:
        self.embedder, self.catalog = embedder, catalog_vectors
        self._cache: dict[str, np.ndarray] = {}

    def vector(self, item_id: str, state: str) -> np.ndarray:
        if state == CATALOG:
            return self.catalog[item_id]
        if state not in self._cache:
            resp = self.embedder.embed([pb.Item(item_id="probe", title=state)])
            self._cache[state] = np.asarray(resp.embeddings[0].vector.values, np.float32)
        return self._cache[state]

    def matches(self, item_id: str, stored: np.ndarray, state: str) -> bool:
        return float(stored @ self.vector(item_id, state)) > MATCH_COSINE


def live_items(c: Client) -> dict[str, np.ndarray]:
    """Every live item and its stored vector, checking that no id is served twice."""
    info = c.info()
    probe = np.zeros(info.dim, np.float32)
    probe[0] = 1.0
    hits = c.similar(vectors=[probe.tolist()], k=1000)[0]  # flat index: exact, so k past the count lists them all
    ids = [h.item_id for h in hits]
    assert len(ids) < 1000, "too many items to list them in one query"
    assert len(ids) == len(set(ids)), f"served twice: {sorted({i for i in ids if ids.count(i) > 1})}"
    assert len(ids) == info.item_count, f"{len(ids)} items searchable but GetInfo counts {info.item_count}"
    vectors = c.embeddings(ids) if ids else {}
    return {i: np.asarray(v, np.float32) for i, v in vectors.items()}


def check_ledger(c: Client, ledger: Ledger, titles: Titles, note: str) -> None:
    """Acknowledged upserts are served with their content, acknowledged deletes are gone, nothing
    unknown is served; a cut-off write is found in one of its two states and settled to it."""
    live = live_items(c)
    with ledger.lock:
        unknown = set(live) - set(ledger.known) - set(ledger.unsettled)
        assert not unknown, f"{note}: served items nobody wrote: {sorted(unknown)[:5]}"
        for item_id, state in ledger.known.items():
            if item_id in ledger.unsettled:
                continue
            if state is None:
                assert item_id not in live, f"{note}: {item_id} was deleted (acknowledged) but is back"
            else:
                assert item_id in live, f"{note}: {item_id} was acknowledged ({state!r}) but is lost"
                assert titles.matches(item_id, live[item_id], state), f"{note}: {item_id} is not {state!r}"
        for item_id, options in ledger.unsettled.items():
            found = [s for s in options if (s is None and item_id not in live) or
                     (s is not None and item_id in live and titles.matches(item_id, live[item_id], s))]
            assert found, f"{note}: {item_id} (cut off) is neither of {options}"
            ledger.known[item_id] = found[0]
        ledger.unsettled.clear()


# ---- 1. SIGKILL during a stream of writes ---------------------------------------------------------
class Writer(threading.Thread):
    """Upserts new ids, re-upserts and deletes ids it owns, one request at a time, until the server dies."""

    def __init__(self, number: int, target: str, ledger: Ledger, owned: list[str], seed: int,
                 acked: threading.Semaphore) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.number, self.target, self.ledger, self.owned = number, target, ledger, owned
        self.rng, self.acked = random.Random(seed), acked
        self.cut_sent_at: float | None = None  # when the request the server never answered was sent
        self.error: Exception | None = None

    def run(self) -> None:
        with Client(self.target, timeout=20) as c:
            while True:
                deletes, changes = self._next_op()
                self.ledger.begin(changes)
                sent_at = time.monotonic()
                try:
                    if deletes:
                        assert c.delete(list(changes)) == len(changes)
                    else:
                        items = [pb.Item(item_id=i, title=t) for i, t in changes.items()]
                        assert c.upsert(items).upserted == len(items)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:  # anything but "the server is gone" is a failure
                        self.error = e
                    self.cut_sent_at = sent_at
                    return
                except AssertionError as e:  # the server answered, but not what was asked
                    self.error = e
                    return
                self.ledger.acknowledge(changes)
                self.acked.release()

    def _next_op(self) -> tuple[bool, dict[str, str | None]]:
        with self.ledger.lock:
            present = [i for i in self.owned if self.ledger.known.get(i) is not None]
            absent = [i for i in self.owned if i in self.ledger.known and self.ledger.known[i] is None]
        roll, n = self.rng.random(), self.rng.randint(1, 3)
        if roll < 0.3 and present:
            return True, dict.fromkeys(self.rng.sample(present, min(n, len(present))))
        if roll < 0.5 and present:  # new content for items that exist
            chosen = self.rng.sample(present, min(n, len(present)))
        elif roll < 0.6 and absent:  # bring deleted items back
            chosen = self.rng.sample(absent, min(n, len(absent)))
        else:
            chosen = [f"crash-w{self.number}-{len(self.owned) + j}" for j in range(n)]
            self.owned.extend(chosen)
        return False, {i: f"{self.rng.choice(WORDS)} {self.rng.randrange(10**6)}" for i in chosen}


def test_sigkill_during_writes_keeps_every_acknowledged_write(trained: Trained, embedder: Client,
                                                                tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**32)  # the training fixture seeds `random`
    rng = random.Random(seed)
    server = Server(trained, _copy_root(trained, tmp_path), tmp_path / "serve.log")
    server.start()
    try:
        with Client(server.target) as c:
            catalog = live_items(c)
        ledger = Ledger(known=dict.fromkeys(catalog, CATALOG))
        titles = Titles(embedder, catalog)
        owned = [sorted(catalog)[w::WRITERS * 8] for w in range(WRITERS)]  # some catalog items per writer
        cut_off = 0
        for round_ in range(ROUNDS):
            note = f"round {round_} (seed {seed})"
            acked = threading.Semaphore(0)
            writers = [Writer(w, server.target, ledger, owned[w], rng.randrange(2**32), acked) for w in range(WRITERS)]
            for w in writers:
                w.start()
            for _ in range(rng.randint(8, 40)):  # the random moment: after this many acknowledged writes
                assert acked.acquire(timeout=60), f"{note}: writers stalled: {[w.error for w in writers]}"
            killed_at = time.monotonic()
            server.kill()
            for w in writers:
                w.join(timeout=60)
                assert not w.is_alive() and w.error is None, f"{note}: {w.name} failed: {w.error}"
            cut_off += sum(w.cut_sent_at is not None and w.cut_sent_at < killed_at for w in writers)
            server.start()
            with Client(server.target) as c:
                check_ledger(c, ledger, titles, note)
        assert cut_off > 0, f"no write was in flight at any of the {ROUNDS} kills (seed {seed})"
        assert sum(s is None for s in ledger.known.values()) > 0, "no delete was acknowledged"
        assert sum(s not in (None, CATALOG) for s in ledger.known.values()) > 0, "no upsert was acknowledged"
    finally:
        server.stop()


# ---- 2. SIGKILL in each phase of a reindex --------------------------------------------------------
class Querier(threading.Thread):
    """Asks the server what it serves and for neighbours, every 0.2 s; each version it meets is verified
    on disk at once (a half-written one would fail), and every failure is recorded."""

    def __init__(self, server: Server, query_id: str) -> None:
        super().__init__(name="querier", daemon=True)
        self.server, self.query_id = server, query_id
        self.stopped = threading.Event()
        self.paused = threading.Event()  # set while the test restarts the server on purpose
        self.versions: list[str] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            if self.paused.is_set():
                continue
            try:
                with Client(self.server.target, timeout=10) as c:
                    info = c.info()
                    hits = c.similar(item_ids=[self.query_id], k=5)[0]
            except grpc.RpcError as e:
                if not self.paused.is_set():
                    self.failures.append(f"{e.code().name}: {e.details()}")
                continue
            if len(hits) != 5:
                self.failures.append(f"{len(hits)} neighbours from {info.index_version}")
            if info.index_version not in self.versions:
                try:
                    verify_version(self.server.root / VERSIONS / info.index_version)
                except IndexVerificationError as e:
                    self.failures.append(f"served {info.index_version}, which does not verify: {e}")
            self.versions.append(info.index_version)


def _check_root(root: Path) -> str:
    """CURRENT names a version that loads and verifies, and so does every version listed; returns CURRENT."""
    current = read_current(root)
    assert current is not None and current in list_versions(root)
    load_version(root)
    for version in list_versions(root):
        verify_version(root / VERSIONS / version)
    return current


def _paused_state(phase: str, root: Path, old: str) -> str | None:
    """Assert what is on disk while the job waits in `phase`; returns the new version once it exists."""
    staging = sorted((root / VERSIONS).glob(".*.tmp"))
    if phase == "embed":
        assert list((root / ".reindex").glob("*/shard-*.parquet")), "no shard written before the pause"
    if phase in ("embed", "build"):
        assert not staging, staging
    if phase == "write":
        assert len(staging) == 1 and (staging[0] / INDEX_FILE).is_file() and not (staging[0] / IDS_FILE).exists()
    if phase in ("embed", "build", "write"):
        assert read_current(root) == old and list_versions(root) == [old]
        return None
    new = list_versions(root)[-1]
    assert new != old
    verify_version(root / VERSIONS / new)
    if phase == "current":
        assert read_current(root) == old and (root / ".CURRENT.tmp").read_text().strip() == new
    else:
        assert read_current(root) == new and (root / "live.tmp").is_file()
    return new


def test_sigkill_in_each_reindex_phase_keeps_one_verified_version(trained: Trained, embedder: Client,
                                                                   tmp_path: Path) -> None:
    root = _copy_root(trained, tmp_path)
    old = read_current(root)
    assert old is not None
    server = Server(trained, root, tmp_path / "serve.log", poll_seconds=1)  # the watcher follows CURRENT
    server.start()
    with Client(server.target) as c:
        catalog = live_items(c)
    ledger = Ledger(known=dict.fromkeys(catalog, CATALOG))
    titles = Titles(embedder, catalog)
    catalog_ids = sorted(catalog)
    querier = Querier(server, catalog_ids[0])
    querier.start()
    served: list[str] = [old]  # versions CURRENT named, in order: the only ones that may be served
    try:
        for n, phase in enumerate(PHASES):
            changes: dict[str, str | None] = {f"{phase}-{j}": f"{WORDS[n + j]} {phase}" for j in range(2)}
            with Client(server.target) as c:  # live writes for the job to fold in
                assert c.upsert([pb.Item(item_id=i, title=t) for i, t in changes.items()]).upserted == 2
                assert c.delete([catalog_ids[n + 1]]) == 1
            ledger.known.update(changes)
            ledger.known[catalog_ids[n + 1]] = None
            marker, job_log = tmp_path / f"{phase}.paused", tmp_path / f"reindex-{phase}.log"
            job = reindex_process(trained.dataset.catalog, root, trained.tracking_uri, job_log, phase, marker)
            try:
                wait_for(marker.exists, f"the reindex to pause at {phase}", job, job_log)
                new = _paused_state(phase, root, served[-1])
                late: list[object] = []
                if phase == "truncate":  # the job holds the log's flock: this upsert waits for the kill
                    write = threading.Thread(target=_upsert_into, args=(server.target, "late-1", late))
                    write.start()
                with Client(server.target) as c:  # the watcher may already follow CURRENT in the last phase
                    assert c.info().index_version in {served[-1], new}
            finally:
                sigkill(job)
            current = _check_root(root)
            if phase != "truncate":
                assert current == served[-1], f"{phase}: CURRENT moved to {current}"
                with Client(server.target) as c:
                    assert c.info().index_version == served[-1]
                continue
            assert current == new
            served.append(current)
            write.join(timeout=60)
            assert late == ["ok"], f"the upsert waiting on the job's lock: {late}"
            ledger.known["late-1"] = "linen shirt late"
            with Client(server.target) as c:
                wait_for(lambda v=current: c.info().index_version == v, "the server to swap to the new version")
                check_ledger(c, ledger, titles, f"{phase}, swapped")
            querier.paused.set()
            server.kill()
            server.start()
            querier.paused.clear()
            with Client(server.target) as c:
                assert c.info().index_version == current
                check_ledger(c, ledger, titles, f"{phase}, restarted")
        job_log = tmp_path / "reindex-rerun.log"
        rerun = reindex_process(trained.dataset.catalog, root, trained.tracking_uri, job_log)
        assert rerun.wait(timeout=300) == 0, tail(job_log)
        resumed = re.search(r"(\d+)\s+resumed", job_log.read_text())
        assert resumed and int(resumed.group(1)) > 0, f"the shards of the killed runs were not reused:\n{tail(job_log)}"
        current = _check_root(root)
        assert current not in served
        served.append(current)
        assert not list((root / VERSIONS).glob(".*.tmp")), "staging folders of killed runs are left behind"
        with Client(server.target) as c:  # (a restart was tried above; each costs a process start)
            wait_for(lambda: c.info().index_version == current, "the server to swap to the rerun's version")
            check_ledger(c, ledger, titles, "after the rerun")
    finally:
        querier.stopped.set()
        querier.join(timeout=30)
        server.stop()
    assert not querier.failures, querier.failures[:5]
    assert querier.versions and set(querier.versions) <= set(served), (set(querier.versions), served)


def _upsert_into(target: str, item_id: str, out: list[object]) -> None:
    try:
        with Client(target, timeout=120) as c:
            c.upsert([pb.Item(item_id=item_id, title="linen shirt late")])
        out.append("ok")
    except grpc.RpcError as e:
        out.append(e)


# ---- 3. damaged index files, refused before FAISS reads them -------------------------------------
def _truncate(path: Path, donor: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bit(path: Path, donor: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _swap(path: Path, donor: Path) -> None:
    shutil.copyfile(donor / path.name, path)  # the same file of another published version


@pytest.mark.parametrize("damage", [_truncate, _flip_bit, _swap], ids=["truncated", "bit-flipped", "swapped"])
@pytest.mark.parametrize("name", [INDEX_FILE, IDS_FILE])
def test_damaged_version_is_refused_before_read_index(trained: Trained, tmp_path: Path, name: str, damage: object,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_root(trained, tmp_path)
    good = load_version(root)
    manifest = good.manifest
    config = IndexConfig(kind="flat")
    # another version over fewer items: its files are valid, just not this version's
    donor = publish_index(root, np.asarray(good.vectors[:300]), IdMap(good.ids.item_ids[:300],
                          good.ids.content_hashes[:300], good.ids.attributes[:300]), config,
                          manifest.model_name, manifest.model_version, make_current=False)
    damaged = publish_index(root, np.asarray(good.vectors), good.ids, config, manifest.model_name,
                            manifest.model_version, make_current=False)
    running = start_server(ServiceConfig(model_uri=f"models:/{MODEL_NAME}@champion", index_root=root,
                                         tracking_uri=trained.tracking_uri, port=0, poll_seconds=0,
                                         cache_dir=trained.workdir / "crash-cache"))
    faiss = import_faiss()
    read_index, calls = faiss.read_index, []

    def recording_read_index(*args: object) -> object:
        calls.append(args[0])
        return read_index(*args)

    monkeypatch.setattr(faiss, "read_index", recording_read_index)
    try:
        assert damage is not None
        damage(damaged.path / name, donor.path)  # type: ignore[operator]
        set_current(root, damaged.manifest.index_version)
        with pytest.raises(IndexVerificationError, match=f"{name} does not match its sha256"):
            running.holder.refresh()  # what the watcher does on its next poll
        assert calls == [], f"faiss.read_index reached for {calls}"
        with Client(f"127.0.0.1:{running.port}") as c:
            assert c.health_status() == "SERVING"
            assert c.info().index_version == manifest.index_version
            assert len(c.similar(item_ids=[good.ids.item_ids[0]], k=5)[0]) == 5
        set_current(root, donor.manifest.index_version)  # a sound version is read (the recorder works) and served
        assert running.holder.refresh()
        assert calls == [str(donor.path / INDEX_FILE)]
        with Client(f"127.0.0.1:{running.port}") as c:
            assert c.info().index_version == donor.manifest.index_version
    finally:
        running.stop(grace=1)
