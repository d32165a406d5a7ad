"""The serving view (`index.live.LiveIndex`): main index + fresh writes + tombstones, checked against an
exact numpy model of the live items."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.config import IndexConfig
from index.errors import ReembedError
from index.ids import IdMap
from index.live import MAX_K, Hit, LiveIndex
from index.log import LogRecord, WriteLog
from index.publish import PublishedIndex, load_version, publish_index

N, DIM = 400, 16
COLOURS = ("red", "green", "blue")


def _attrs(i: int) -> dict[str, str]:
    return {"colour": COLOURS[i % 3], "shop": f"s{i % 40}"}  # a shop holds 10 main items


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _upsert(item_id: str, vector: np.ndarray, attrs: Mapping[str, str] | None = None,
            model_version: str = "1") -> LogRecord:
    return LogRecord(op="upsert", item_id=item_id, model_version=model_version, vector=np.asarray(vector, np.float32),
                     content={"title": item_id, "attributes": dict(attrs or {})},
                     content_hash=_hash(item_id, vector, attrs))


def _hash(item_id: str, vector: np.ndarray, attrs: Mapping[str, str] | None) -> str:
    """Stands in for `Item.content_hash`: new content (here, a new vector or attributes), a new hash."""
    data = np.asarray(vector, np.float32).tobytes() + repr(sorted((attrs or {}).items())).encode()
    return hashlib.sha256(item_id.encode() + data).hexdigest()


class Reference:
    """The live items as a plain dict, searched exactly."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, attrs: Sequence[Mapping[str, str]]) -> None:
        self.items = {i: (v.copy(), dict(a)) for i, v, a in zip(ids, vectors, attrs, strict=True)}

    def upsert(self, records: Sequence[LogRecord]) -> None:
        for r in records:
            assert r.vector is not None
            self.items[r.item_id] = (r.vector.copy(), dict(r.content.get("attributes", {})))

    def delete(self, item_ids: Sequence[str]) -> None:
        for i in item_ids:
            self.items.pop(i, None)

    def search(self, q: np.ndarray, k: int, exclude: Sequence[str] = (),
               attributes_equal: Mapping[str, str] | None = None, min_score: float | None = None,
               own: str | None = None) -> list[tuple[str, float]]:
        hits = [(i, float(v @ q)) for i, (v, a) in self.items.items()
                if i not in exclude and i != own
                and all(a.get(key) == value for key, value in (attributes_equal or {}).items())]
        hits = [h for h in hits if min_score is None or h[1] >= min_score]
        return sorted(hits, key=lambda h: -h[1])[:k]


def _check(got: list[Hit], want: list[tuple[str, float]]) -> None:
    assert [h.item_id for h in got] == [w[0] for w in want]
    np.testing.assert_allclose([h.score for h in got], [w[1] for w in want], atol=1e-5)


@pytest.fixture(scope="module")
def main_data(clustered: Callable[..., np.ndarray]) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    return [f"m{i}" for i in range(N)], clustered(N, DIM, seed=11, clusters=20, spread=0.4), [_attrs(i) for i in range(N)]


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory: pytest.TempPathFactory,
              main_data: tuple[list[str], np.ndarray, list[dict[str, str]]]) -> Path:
    root = tmp_path_factory.mktemp("flat")
    ids, x, attrs = main_data
    publish_index(root, x, IdMap(ids, ids, attrs), IndexConfig(kind="flat"), "m", "1")
    return root


@pytest.fixture
def published(flat_root: Path) -> PublishedIndex:
    return load_version(flat_root)


@pytest.fixture
def reference(main_data: tuple[list[str], np.ndarray, list[dict[str, str]]]) -> Reference:
    return Reference(*main_data)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "writes.log"


@pytest.fixture
def live(published: PublishedIndex, log_path: Path) -> LiveIndex:
    return LiveIndex(published, WriteLog(log_path), "1", IndexConfig(kind="flat"))


def _churn(live: LiveIndex, reference: Reference, seed: int = 0) -> None:
    """New items, updated main items, a re-updated fresh item, deleted main and fresh items."""
    rng = np.random.default_rng(seed)
    fresh = [_upsert(f"f{i}", v, _attrs(i)) for i, v in enumerate(_unit(rng, 30))]
    updates = [_upsert(f"m{i}", v, {"colour": "red", "shop": "s-new"}) for i, v in zip(range(0, 40, 4),
                                                                                     _unit(rng, 10), strict=True)]
    again = [_upsert("f3", _unit(rng, 1)[0], {"colour": "blue"})]
    for batch in (fresh[:12], updates, fresh[12:], again):
        live.upsert(batch)
        reference.upsert(batch)
    gone = [f"m{i}" for i in range(1, 40, 3)] + ["f5", "f6", "m8"]  # m4, m8, m16, ... were updated first
    assert live.delete(gone) == len(gone)
    reference.delete(gone)


def _queries(seed: int, n: int = 25) -> np.ndarray:
    return _unit(np.random.default_rng(seed), n)


def test_fresh_index_starts_empty_and_equals_exact(live: LiveIndex, reference: Reference) -> None:
    assert len(live) == N and live.kind == "flat" and live.index_version
    q = _queries(1)
    for qi, hits in zip(q, live.search(q, 10), strict=True):
        _check(hits, reference.search(qi, 10))


@pytest.mark.parametrize("k", [1, 10, 60])
def test_search_equals_exact_over_main_minus_tombstones_plus_fresh(live: LiveIndex, reference: Reference,
                                                                   k: int) -> None:
    _churn(live, reference)
    assert len(live) == len(reference.items)
    q = np.concatenate([_queries(2), np.stack([reference.items[i][0] for i in ("f0", "m12", "f3")])])
    for qi, hits in zip(q, live.search(q, k), strict=True):
        _check(hits, reference.search(qi, k))


def test_upsert_is_searchable_at_once(live: LiveIndex) -> None:
    v = _unit(np.random.default_rng(3), 1)[0]
    live.upsert([_upsert("new", v)])
    assert len(live) == N + 1
    assert "new" in live and np.array_equal(live.vector("new"), v)
    top = live.search(v[None], 1)[0][0]
    assert top.item_id == "new" and top.score == pytest.approx(1.0, abs=1e-5)


def test_upsert_of_a_main_item_supersedes_it(live: LiveIndex, main_data: tuple[list[str], np.ndarray,
                                                                                list[dict[str, str]]]) -> None:
    _, x, _ = main_data
    old = x[17]
    new = -old  # as far from the old vector as can be
    live.upsert([_upsert("m17", new, {"colour": "red"})])
    assert len(live) == N
    assert np.array_equal(live.vector("m17"), new)
    near_old = live.search(old[None], MAX_K)[0]
    assert len(near_old) == N
    scores = {h.item_id: h.score for h in near_old}
    assert scores["m17"] == pytest.approx(-1.0, abs=1e-5)  # only the new vector is ever scored
    assert [h.item_id for h in near_old].count("m17") == 1
    assert live.search(new[None], 1)[0][0].item_id == "m17"


def test_upserting_a_fresh_item_twice_keeps_the_last(live: LiveIndex) -> None:
    rng = np.random.default_rng(4)
    first, second = _unit(rng, 2)
    live.upsert([_upsert("twice", first)])
    live.upsert([_upsert("twice", second), _upsert("other", first)])
    assert len(live) == N + 2
    hits = live.search(first[None], MAX_K)[0]
    assert [h.item_id for h in hits].count("twice") == 1
    assert {h.item_id: h.score for h in hits}["twice"] == pytest.approx(float(first @ second), abs=1e-5)


def test_delete_hides_main_and_fresh_items(live: LiveIndex, main_data: tuple[list[str], np.ndarray,
                                                                              list[dict[str, str]]]) -> None:
    _, x, _ = main_data
    v = _unit(np.random.default_rng(5), 1)[0]
    live.upsert([_upsert("fresh", v)])
    assert live.delete(["m3", "fresh", "m3", "unknown"]) == 2
    assert len(live) == N - 1
    assert "m3" not in live and "fresh" not in live and live.vector("m3") is None
    for q in (x[3], v):
        ids = [h.item_id for h in live.search(q[None], MAX_K)[0]]
        assert "m3" not in ids and "fresh" not in ids and len(ids) == N - 1
    assert live.delete(["m3", "fresh"]) == 0
    live.upsert([_upsert("m3", x[3])])  # a deleted item can come back
    assert live.search(x[3][None], 1)[0][0].item_id == "m3" and len(live) == N


@pytest.mark.parametrize("wanted", [{"colour": "green"}, {"shop": "s7"}, {"colour": "red", "shop": "s-new"},
                                    {"colour": "blue"}, {"shop": "none"}])
def test_attribute_filter_over_main_and_fresh(live: LiveIndex, reference: Reference,
                                              wanted: dict[str, str]) -> None:
    _churn(live, reference)
    q = _queries(6, 10)
    for qi, hits in zip(q, live.search(q, 8, attributes_equal=wanted), strict=True):
        want = reference.search(qi, 8, attributes_equal=wanted)
        _check(hits, want)
        assert all(reference.items[h.item_id][1].get(k) == v for h in hits for k, v in wanted.items())


def test_attribute_filter_finds_fresh_items(live: LiveIndex) -> None:
    rng = np.random.default_rng(7)
    live.upsert([_upsert(f"n{i}", v, {"shop": "pop-up"}) for i, v in enumerate(_unit(rng, 12))])
    hits = live.search(_queries(8, 3), 10, attributes_equal={"shop": "pop-up"})
    assert all(len(row) == 10 and all(h.item_id.startswith("n") for h in row) for row in hits)
    assert live.search(_queries(8, 1), 20, attributes_equal={"shop": "pop-up"})[0].__len__() == 12


def test_exclude_and_self_ids(live: LiveIndex, reference: Reference) -> None:
    _churn(live, reference)
    q = np.stack([reference.items[i][0] for i in ("m11", "f0", "m12")])
    exclude = ["f1", "m14", "f2", "not-an-item"]
    got = live.search(q, 10, exclude=exclude, self_ids=["m11", "f0", None])
    for qi, own, hits in zip(q, ["m11", "f0", None], got, strict=True):
        _check(hits, reference.search(qi, 10, exclude=exclude, own=own))
        assert len(hits) == 10
    assert got[2][0].item_id == "m12"  # no self id: the (updated) item finds itself
    with pytest.raises(ValueError, match="2 self ids for 3 queries"):
        live.search(q, 10, self_ids=["a", "b"])


def test_min_score(live: LiveIndex, reference: Reference) -> None:
    _churn(live, reference)
    q = _queries(9, 10)
    for floor in (0.2, 0.5, 0.99):
        for qi, hits in zip(q, live.search(q, 50, min_score=floor), strict=True):
            assert all(h.score >= floor for h in hits)
            _check(hits, reference.search(qi, 50, min_score=floor))


def test_restart_replays_the_log(published: PublishedIndex, flat_root: Path, log_path: Path,
                                 live: LiveIndex, reference: Reference) -> None:
    _churn(live, reference)
    q = _queries(10)
    before = live.search(q, 15, attributes_equal=None)
    filtered = live.search(q, 5, attributes_equal={"colour": "red"})
    assert live.log is not None
    live.log.close()
    again = LiveIndex(load_version(flat_root), WriteLog(log_path), "1", IndexConfig(kind="flat"))
    assert len(again) == len(live) == len(reference.items)
    assert again.search(q, 15) == before
    assert again.search(q, 5, attributes_equal={"colour": "red"}) == filtered
    assert np.array_equal(again.vector("f3"), live.vector("f3"))  # type: ignore[arg-type]


def test_memory_only_live_index(published: PublishedIndex, reference: Reference) -> None:
    live = LiveIndex(published, None, "1", IndexConfig(kind="flat"))
    _churn(live, reference)
    q = _queries(12, 5)
    for qi, hits in zip(q, live.search(q, 10), strict=True):
        _check(hits, reference.search(qi, 10))


def test_log_of_another_model_version_is_reembedded(published: PublishedIndex, flat_root: Path,
                                                    log_path: Path) -> None:
    rng = np.random.default_rng(13)
    old_vectors, new_vectors = _unit(rng, 3), _unit(rng, 3)
    live = LiveIndex(published, WriteLog(log_path), "1", IndexConfig(kind="flat"))
    live.upsert([_upsert(f"r{i}", v) for i, v in enumerate(old_vectors)])
    live.delete(["r1", "m0"])
    assert live.log is not None
    live.log.close()

    with pytest.raises(ReembedError, match="another model version"):
        LiveIndex(load_version(flat_root), WriteLog(log_path), "2", IndexConfig(kind="flat"))

    seen: list[list[str]] = []

    def embed(records: Sequence[LogRecord]) -> np.ndarray:
        seen.append([r.item_id for r in records])
        assert all(r.model_version == "1" and r.content["title"] == r.item_id for r in records)
        return np.stack([new_vectors[int(r.item_id[1:])] for r in records])

    again = LiveIndex(load_version(flat_root), WriteLog(log_path), "2", IndexConfig(kind="flat"), embed_fn=embed)
    assert seen == [["r0", "r2"]]  # only the newest record of each item is read: r1's delete, not its upsert
    assert len(again) == N - 1 + 2  # m0 and r1 stay deleted
    assert "r1" not in again and "m0" not in again
    for i in (0, 2):
        assert np.array_equal(again.vector(f"r{i}"), new_vectors[i])  # type: ignore[arg-type]
        top = again.search(new_vectors[i][None], 1)[0][0]
        assert top.item_id == f"r{i}" and top.score == pytest.approx(1.0, abs=1e-5)

    def wrong_dim(records: Sequence[LogRecord]) -> np.ndarray:
        return np.zeros((len(records), DIM + 1), np.float32)

    with pytest.raises(ValueError, match="re-embedded vectors has dim"):
        LiveIndex(load_version(flat_root), WriteLog(log_path), "2", IndexConfig(kind="flat"), embed_fn=wrong_dim)


def test_arguments_are_checked(live: LiveIndex) -> None:
    q = _queries(14, 2)
    for k in (0, -1, MAX_K + 1):
        with pytest.raises(ValueError, match=f"k={k} must be in"):
            live.search(q, k)
    with pytest.raises(ValueError, match=f"queries has dim {DIM - 1}"):
        live.search(q[:, 1:], 3)
    assert live.log is not None
    logged = len(live.log)
    bad = _upsert("bad", np.full(DIM, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"records\[1\].vector holds NaN"):
        live.upsert([_upsert("ok", q[0]), bad])
    with pytest.raises(ValueError, match=r"records\[0\].vector has dim"):
        live.upsert([_upsert("short", q[0][:4])])
    with pytest.raises(ValueError, match=r"records\[0\] must be an upsert"):
        live.upsert([LogRecord(op="delete", item_id="m1")])
    assert len(live.log) == logged and "ok" not in live and len(live) == N  # nothing half-applied


@pytest.fixture(scope="module")
def hnsw_world(tmp_path_factory: pytest.TempPathFactory,
               clustered: Callable[..., np.ndarray]) -> tuple[Path, Reference]:
    n = 5000
    x = clustered(n, DIM, seed=15, clusters=50, spread=0.3)
    ids = [f"h{i}" for i in range(n)]
    attrs = [{"colour": COLOURS[i % 3], "shop": f"s{i % 500}"} for i in range(n)]  # a shop holds 10 items
    root = tmp_path_factory.mktemp("hnsw")
    publish_index(root, x, IdMap(ids, ids, attrs), IndexConfig(kind="hnsw"), "m", "1")
    return root, Reference(ids, x, attrs)


@pytest.mark.parametrize("wanted", [{"shop": "s123"}, {"colour": "blue"}, {"colour": "red", "shop": "s3"}])
def test_filter_on_an_approximate_index_still_returns_k(hnsw_world: tuple[Path, Reference],
                                                        wanted: dict[str, str]) -> None:
    root, reference = hnsw_world
    live = LiveIndex(load_version(root), None, "1", IndexConfig(kind="hnsw"))
    live.delete(["h123"])
    reference = Reference([], np.zeros((0, DIM)), [])
    reference.items = dict(hnsw_world[1].items)
    reference.delete(["h123"])
    q = _queries(16, 20)
    k = 8
    matching = len(reference.search(q[0], MAX_K, attributes_equal=wanted))
    for qi, hits in zip(q, live.search(q, k, attributes_equal=wanted), strict=True):
        assert len(hits) == min(k, matching)
        assert all(reference.items[h.item_id][1].get(key) == v for h in hits for key, v in wanted.items())
        assert "h123" not in {h.item_id for h in hits}
        if matching <= 50:  # a narrow filter is searched exactly
            _check(hits, reference.search(qi, k, attributes_equal=wanted))


def test_concurrent_searches_during_writes(published: PublishedIndex, log_path: Path,
                                           main_data: tuple[list[str], np.ndarray, list[dict[str, str]]]) -> None:
    _, x, _ = main_data
    live = LiveIndex(published, WriteLog(log_path), "1", IndexConfig(kind="flat"))
    rng = np.random.default_rng(17)
    new_vectors = _unit(rng, 90)
    deleted: set[str] = set()
    done = threading.Event()
    errors: list[BaseException] = []
    searches = [0]

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not done.is_set():
                gone = set(deleted)  # everything deleted before this search began
                targets = list(gone)[:5]
                q = np.stack([x[r.integers(N)], new_vectors[r.integers(90)],
                              *[x[int(t[1:])] if t.startswith("m") else new_vectors[int(t[1:])] for t in targets]])
                for hits in live.search(q, 20) + live.search(q, 5, attributes_equal={"colour": "red"}):
                    found = {h.item_id for h in hits}
                    assert not found & gone, found & gone
                    assert len(found) == len(hits)
                searches[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        for i, v in enumerate(new_vectors):
            live.upsert([_upsert(f"n{i}", v, {"colour": COLOURS[i % 3]})])
            if i % 3 == 2:
                victims = [f"n{i - 1}", f"m{i}"]
                live.delete(victims)
                deleted.update(victims)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert searches[0] > 0
    assert len(live) == N + 90 - 2 * 30


def test_items_being_rewritten_never_look_missing(published: PublishedIndex,
                                                  main_data: tuple[list[str], np.ndarray, list[dict[str, str]]]) -> None:
    """`vector`/`in` read lock-free while a writer keeps replacing the same fresh and main items."""
    _, x, _ = main_data
    live = LiveIndex(published, None, "1", IndexConfig(kind="flat"))
    live.upsert([_upsert("hot", x[0])])
    done = threading.Event()
    misses: list[str] = []

    def reader() -> None:
        while not done.is_set():
            for item_id in ("hot", "m5"):
                if live.vector(item_id) is None or item_id not in live:
                    misses.append(item_id)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(3000):
            live.upsert([_upsert("hot", x[i % N]), _upsert("m5", x[(i + 1) % N])])
    finally:
        done.set()
        thread.join()
    assert not misses, f"{len(misses)} lookups missed a live item, e.g. {misses[0]}"
    assert np.array_equal(live.vector("hot"), x[2999 % N])  # type: ignore[arg-type]
    assert len(live) == N + 1


def test_the_serving_view_sets_the_measured_faiss_knobs(published: PublishedIndex, reference: Reference) -> None:
    before = (faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold)
    try:
        live = LiveIndex(published, None, "1", IndexConfig(kind="flat"))
        # one OpenMP thread per search; BLAS from IndexConfig.blas_min_batch queries (FAISS counts query floats)
        assert faiss.omp_get_max_threads() == 1
        assert faiss.cvar.distance_compute_blas_threshold == IndexConfig().blas_min_batch * live.dim
        q = _queries(5, n=IndexConfig().blas_min_batch)  # a batch on the BLAS path gives the exact answer
        for got, query in zip(live.search(q, 5), q, strict=True):
            _check(got, reference.search(query, 5))
        LiveIndex(published, None, "1", IndexConfig(kind="flat", threads=2, blas_min_batch=16))
        assert (faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold) == (2, 16 * live.dim)
    finally:
        faiss.omp_set_num_threads(before[0])
        faiss.cvar.distance_compute_blas_threshold = before[1]


@pytest.mark.parametrize("n_queries", [1, IndexConfig().blas_min_batch, 16])
def test_batches_over_tombstones_equal_exact(live: LiveIndex, reference: Reference, n_queries: int,
                                             main_data: tuple[list[str], np.ndarray, list[dict[str, str]]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors, _ = main_data
    _churn(live, reference)
    over_fetched: list[int] = []
    real = LiveIndex._flat_over_fetch
    monkeypatch.setattr(LiveIndex, "_flat_over_fetch",
                        lambda self, *a: over_fetched.append(1) or real(self, *a))  # type: ignore[func-returns-value]
    gone = [f"m{i}" for i in range(1, 40, 3)]  # deleted: each is its own query's best main row
    q = np.stack([vectors[ids.index(g)] for g in gone] * 2)[:n_queries]
    for qi, hits in zip(q, live.search(q, 10, exclude=["m2"]), strict=True):
        _check(hits, reference.search(qi, 10, exclude=["m2"]))
    # batches that FAISS would run on BLAS skip the selector (which forces its scan)
    assert bool(over_fetched) == (n_queries >= IndexConfig().blas_min_batch)


def _same_view(a: LiveIndex, b: LiveIndex, reference: Reference) -> None:
    assert len(a) == len(b) == len(reference.items)
    q = _queries(5)
    for qi, ha, hb in zip(q, a.search(q, 10), b.search(q, 10), strict=True):
        _check(ha, reference.search(qi, 10))
        _check(hb, reference.search(qi, 10))


def test_two_views_of_one_log_follow_each_other(flat_root: Path, log_path: Path, reference: Reference) -> None:
    """Two processes' views (two WriteLogs on one path: flock treats them as two processes)."""
    a = LiveIndex(load_version(flat_root), WriteLog(log_path), "1", IndexConfig(kind="flat"))
    b = LiveIndex(load_version(flat_root), WriteLog(log_path), "1", IndexConfig(kind="flat"))
    rng = np.random.default_rng(21)
    first = [_upsert(f"x{i}", v, _attrs(i)) for i, v in enumerate(_unit(rng, 5))]
    a.upsert(first)
    reference.upsert(first)
    assert b.vector("x0") is None  # not yet looked
    assert b.catch_up() == 5 and b.catch_up() == 0  # nothing new: two stat calls and out
    np.testing.assert_array_equal(b.vector("x3"), first[3].vector)
    assert a.delete(["m7", "x1"]) == 2
    reference.delete(["m7", "x1"])
    later = [_upsert("y0", _unit(rng, 1)[0])]
    b.upsert(later)  # b's write applies a's deletes first, so b never holds a write without those before it
    reference.upsert(later)
    assert b.vector("m7") is None and b.vector("x1") is None
    a.catch_up()
    _same_view(a, b, reference)
    assert b.delete(["x0"]) == 1  # b decides liveness on the latest log
    reference.delete(["x0"])
    again = [_upsert(f"x{i}", v) for i, v in zip((2, 3), _unit(rng, 2), strict=True)]
    a.upsert(again)
    reference.upsert(again)
    assert a.log is not None and b.log is not None
    assert a.log.compact() > 0  # a rewrites the file: b rereads it and applies its newest records again
    assert a.catch_up() == 0  # a's own rewrite: a knows where its view went
    b.catch_up()
    _same_view(a, b, reference)
    for view in (a, b):
        assert view.log is not None
        view.log.close()
