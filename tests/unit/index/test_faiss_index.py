"""Building and searching FAISS indexes (`index.faiss_index`), checked against exact search on seeded data."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import pytest

from index.config import (
    AUTO_FLAT_BELOW,
    AUTO_HNSW_BELOW,
    IVF_CODES,
    MAX_EF_SEARCH,
    MAX_NPROBE,
    IndexConfig,
    SearchParams,
    search_config,
)
from index.faiss_index import (
    MIN_IVFPQ_COUNT,
    as_matrix,
    build_index,
    choose_nlist,
    configure_faiss,
    index_kind,
    rerank,
    resolve_kind,
    search_index,
)

N, DIM, K = 5000, 64, 10
HNSW = IndexConfig(kind="hnsw")
IVFPQ = IndexConfig(kind="ivfpq", pq_m=8, use_opq=False)  # OPQ is covered on a small index below

Exact = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def data(clustered: Callable[..., np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, queries): queries are noisy copies of held rows, so neighbours are not trivial."""
    x = clustered(N, DIM, seed=0)
    rng = np.random.default_rng(1)
    q = x[rng.choice(N, 200, replace=False)] + 0.05 * rng.normal(size=(200, DIM))
    return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(data: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    x, _ = data
    return {"flat": build_index(x, IndexConfig(kind="flat")), "hnsw": build_index(x, HNSW),
            "ivfpq": build_index(x, IVFPQ)}


CONFIGS = {"flat": IndexConfig(kind="flat"), "hnsw": HNSW, "ivfpq": IVFPQ}


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def test_flat_equals_exact(built: dict[str, Any], data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    scores, labels = search_index(built["flat"], q, K, None, None, CONFIGS["flat"])
    all_scores = q @ x.T
    expected = np.argsort(-all_scores, axis=1, kind="stable")[:, :K]
    assert np.array_equal(labels, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(all_scores, expected, 1), atol=1e-5)
    assert scores.dtype == np.float32 and labels.dtype == np.int64


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_reach_recall(built: dict[str, Any], data: tuple[np.ndarray, np.ndarray],
                                        exact_top: Exact, kind: str) -> None:
    x, q = data
    _, truth = exact_top(x, q, K)
    scores, labels = search_index(built[kind], q, K, None, None, CONFIGS[kind], x)
    assert index_kind(built[kind]) == kind
    assert _recall(labels, truth) >= 0.95  # measured: hnsw 1.0, ivfpq 0.96 (pq_m=8; 0.9995 at the default pq_m=32)
    # scores are true inner products of the returned rows (ivfpq re-ranks exactly against `x`)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[labels], q), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_ivfpq_without_refinement_returns_pq_estimates(built: dict[str, Any],
                                                        data: tuple[np.ndarray, np.ndarray], exact_top: Exact) -> None:
    x, q = data
    _, truth = exact_top(x, q, K)
    coarse = IndexConfig(kind="ivfpq", pq_m=8, use_opq=False, refine_factor=1)
    _, rough = search_index(built["ivfpq"], q, K, None, None, coarse, x)
    _, refined = search_index(built["ivfpq"], q, K, None, None, IVFPQ, x)
    assert _recall(rough, truth) < _recall(refined, truth)


def test_search_params_apply_per_call_only(built: dict[str, Any], data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    hnsw, ivf = built["hnsw"], faiss.extract_index_ivf(built["ivfpq"])
    assert (hnsw.hnsw.efSearch, ivf.nprobe) == (HNSW.ef_search, IVFPQ.nprobe)
    _, hnsw_default = search_index(hnsw, q, K, None, None, HNSW)
    _, hnsw_cheap = search_index(hnsw, q, K, None, SearchParams(ef_search=10), HNSW)
    _, ivf_default = search_index(built["ivfpq"], q, K, None, None, IVFPQ, x)
    _, ivf_cheap = search_index(built["ivfpq"], q, K, None, SearchParams(nprobe=1), IVFPQ, x)
    # the overrides took effect ...
    assert not np.array_equal(hnsw_cheap, hnsw_default)
    assert not np.array_equal(ivf_cheap, ivf_default)
    # ... and the shared index kept its settings, so the next default search is unchanged
    assert (hnsw.hnsw.efSearch, ivf.nprobe) == (HNSW.ef_search, IVFPQ.nprobe)
    assert np.array_equal(search_index(hnsw, q, K, None, None, HNSW)[1], hnsw_default)
    assert np.array_equal(search_index(built["ivfpq"], q, K, None, None, IVFPQ, x)[1], ivf_default)


def test_more_effort_per_query_raises_recall(built: dict[str, Any], data: tuple[np.ndarray, np.ndarray],
                                             exact_top: Exact) -> None:
    x, q = data
    _, truth = exact_top(x, q, K)

    def recall(kind: str, params: SearchParams | None) -> float:
        return _recall(search_index(built[kind], q, K, None, params, CONFIGS[kind], x)[1], truth)

    # measured on this data: ef 1 -> 0.55, 16 -> 0.99, default 128 -> 1.0; nprobe 1 -> 0.89, default 32 -> 0.96
    hnsw = [recall("hnsw", SearchParams(ef_search=ef)) for ef in (1, 16)] + [recall("hnsw", None)]
    assert hnsw[0] < 0.8 and hnsw[0] < hnsw[1] <= hnsw[2] and hnsw[2] >= 0.95
    ivf = [recall("ivfpq", SearchParams(nprobe=1)), recall("ivfpq", None)]
    assert ivf[0] < ivf[1] and ivf[1] >= 0.95


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_selector_excludes_labels(built: dict[str, Any], data: tuple[np.ndarray, np.ndarray], kind: str) -> None:
    x, q = data
    _, first = search_index(built[kind], q, K, None, None, CONFIGS[kind], x)
    banned = np.unique(first[:, :3]).astype(np.int64)  # the best hits of every query
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(banned), faiss.swig_ptr(banned)))
    _, labels = search_index(built[kind], q, K, selector, None, CONFIGS[kind], x)
    assert not np.isin(labels, banned).any()
    assert (labels >= 0).all()
    if kind == "flat":
        scores = q @ x.T
        scores[:, banned] = -np.inf
        assert np.array_equal(labels, np.argsort(-scores, axis=1, kind="stable")[:, :K])


def test_selector_keeping_few_labels_returns_only_those(built: dict[str, Any],
                                                        data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    allowed = np.arange(0, N, 50, dtype=np.int64)  # 100 rows
    selector = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
    _, labels = search_index(built["flat"], q, K, selector, None, CONFIGS["flat"])
    assert np.isin(labels, allowed).all()
    expected = allowed[np.argsort(-(q @ x[allowed].T), axis=1, kind="stable")[:, :K]]
    assert np.array_equal(labels, expected)


def test_fewer_rows_than_k_pads_with_minus_one(clustered: Callable[..., np.ndarray]) -> None:
    x = clustered(5, 8, seed=3)
    index = build_index(x, IndexConfig(kind="flat"))
    _, labels = search_index(index, x[:2], 8, None, None, IndexConfig(kind="flat"))
    assert labels.shape == (2, 8)
    assert sorted(labels[0, :5]) == [0, 1, 2, 3, 4] and (labels[:, 5:] == -1).all()
    assert labels[0, 0] == 0 and labels[1, 0] == 1


def test_rerank_pads_missing_candidates() -> None:
    vectors = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.0, 0.0]], np.float32)
    scores, labels = rerank(queries, np.array([[0, -1, 1, -1]]), vectors, 3)
    assert labels.tolist() == [[1, 0, -1]]
    assert scores[0, :2].tolist() == pytest.approx([0.9, 0.1])
    assert np.isneginf(scores[0, 2])


def test_opq_ivfpq_builds_and_searches(clustered: Callable[..., np.ndarray], exact_top: Exact) -> None:
    x = clustered(MIN_IVFPQ_COUNT, 8, seed=4, clusters=20)
    config = IndexConfig(kind="ivfpq", pq_m=2)  # use_opq defaults to True
    index = build_index(x, config)
    assert isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
    assert index_kind(index) == "ivfpq" and index.ntotal == len(x)
    nprobe = faiss.extract_index_ivf(index).nprobe
    _, truth = exact_top(x, x[:50], 5)
    _, labels = search_index(index, x[:50], 5, None, SearchParams(nprobe=1), config, x)
    assert faiss.extract_index_ivf(index).nprobe == nprobe == config.nprobe
    assert _recall(labels, truth) >= 0.8


def test_fast_scan_ivfpq_with_its_re_rank_finds_the_neighbours_and_honours_tombstones(
        data: tuple[np.ndarray, np.ndarray], exact_top: Exact) -> None:
    """4-bit (fast-scan) codes: coarse alone, near exact once 16x their k is re-ranked against the vectors;
    a tombstone selector (the live index's deletes) keeps the dead rows out."""
    x, q = data
    config = IndexConfig(kind="ivfpq", pq_m=16, pq_bits=4, refine_factor=16, nprobe=16)
    index = build_index(x, config)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan) and index_kind(index) == "ivfpq"
    _, truth = exact_top(x, q, K)
    _, labels = search_index(index, q, K, None, None, config, x)
    assert _recall(labels, truth) >= 0.9
    dead = np.unique(truth[:, 0])
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(dead)))
    _, labels = search_index(index, q, K, selector, None, config, x)
    assert not np.isin(labels, dead).any() and (labels >= 0).all()
    with pytest.raises(ValueError, match="pq_bits=6 must be one of"):
        IndexConfig(pq_bits=6)


def test_the_fastscan_code_takes_half_the_dim_in_sub_quantizers_and_no_rotation(
        clustered: Callable[..., np.ndarray]) -> None:
    """`reindex --ivf-code fastscan`: dim/2 four-bit sub-quantizers (dim/4 bytes, as the 8-bit default at dim
    128), no OPQ, a 64x re-rank recorded for the service."""
    config = IndexConfig(kind="ivfpq", **IVF_CODES["fastscan"])
    index = build_index(clustered(MIN_IVFPQ_COUNT, 24, seed=2, clusters=20), config)
    ivf = faiss.downcast_index(index)
    assert isinstance(ivf, faiss.IndexIVFPQFastScan)  # no pre-transform: no OPQ
    assert (ivf.pq.M, ivf.pq.nbits, ivf.code_size, config.refine_factor) == (12, 4, 6, 64)


def test_search_config_takes_the_published_settings(data: tuple[np.ndarray, np.ndarray]) -> None:
    """A published index is searched with the effort and re-rank it was built with, not today's defaults;
    a field this version does not know is ignored, one it lacks takes its default, overrides win."""
    published = {**dataclasses.asdict(IndexConfig(kind="ivfpq", nprobe=7, refine_factor=16, pq_bits=4)),
                 "a_later_field": 1}
    del published["ef_search"]
    config = search_config(published, threads=1)
    assert (config.nprobe, config.refine_factor, config.pq_bits, config.threads) == (7, 16, 4, 1)
    assert config.ef_search == IndexConfig().ef_search
    with pytest.raises(ValueError, match="nprobe=0"):
        search_config({"nprobe": 0})


def test_resolve_kind_and_nlist() -> None:
    auto = IndexConfig()
    assert resolve_kind(auto, 0) == "flat"
    assert resolve_kind(auto, AUTO_FLAT_BELOW - 1) == "flat"
    assert resolve_kind(auto, AUTO_FLAT_BELOW) == "hnsw"
    assert resolve_kind(auto, AUTO_HNSW_BELOW) == "ivfpq"
    assert resolve_kind(IndexConfig(kind="hnsw"), 3) == "hnsw"
    with pytest.raises(ValueError, match="count=-1"):
        resolve_kind(auto, -1)
    assert choose_nlist(auto, 5000) == 5000 // 39  # enough points per list to train
    assert choose_nlist(auto, 1_000_000) == 4000
    assert choose_nlist(IndexConfig(ivf_nlist=77), 5000) == 77


def test_build_refuses_what_it_cannot_build(clustered: Callable[..., np.ndarray]) -> None:
    with pytest.raises(ValueError, match="0 rows"):
        build_index(np.zeros((0, 8), np.float32), IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match="not divisible by pq_m=8"):
        build_index(clustered(MIN_IVFPQ_COUNT, 12, seed=0), IndexConfig(kind="ivfpq", pq_m=8))
    with pytest.raises(ValueError, match=f"at least {MIN_IVFPQ_COUNT} vectors"):
        build_index(clustered(100, 16, seed=0), IndexConfig(kind="ivfpq", pq_m=8))
    with pytest.raises(ValueError, match="kind='annoy'"):
        IndexConfig(kind="annoy")
    with pytest.raises(ValueError, match="nprobe=0"):
        SearchParams(nprobe=0)
    with pytest.raises(ValueError, match=f"ef_search={MAX_EF_SEARCH + 1} must be <= {MAX_EF_SEARCH}"):
        SearchParams(ef_search=MAX_EF_SEARCH + 1)
    with pytest.raises(ValueError, match=f"nprobe={MAX_NPROBE + 1} must be <= {MAX_NPROBE}"):
        IndexConfig(nprobe=MAX_NPROBE + 1)


def test_search_checks_queries_and_k(built: dict[str, Any], data: tuple[np.ndarray, np.ndarray]) -> None:
    _, q = data
    with pytest.raises(ValueError, match="k=0"):
        search_index(built["flat"], q, 0, None, None, CONFIGS["flat"])
    with pytest.raises(ValueError, match=f"queries has dim 63, want {DIM}"):
        search_index(built["flat"], q[:, :63], K, None, None, CONFIGS["flat"])


def test_as_matrix_accepts_castable_finite_matrices() -> None:
    out = as_matrix(np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::-1], "v", 3)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert out.tolist() == [[2, 1, 0], [5, 4, 3]]
    assert as_matrix([[1, 2]], "v").shape == (1, 2)


@pytest.mark.parametrize("bad, message", [
    (np.array([[0.0, np.nan]]), "NaN or infinite"),
    (np.array([[np.inf, 0.0]]), "NaN or infinite"),
    (np.array([[-np.inf, 0.0]]), "NaN or infinite"),
    (np.array([[1e39, 0.0]]), "NaN or infinite"),  # finite in float64, infinite once float32
    (np.zeros((2, 3)), "has dim 3, want 2"),
    (np.zeros(2), r"shape \(2,\), want 2-D"),
    (np.zeros((1, 2, 2)), "want 2-D"),
    (np.array([["a", "b"]]), "castable to float32"),
])
def test_as_matrix_rejects(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message), np.errstate(over="ignore"):
        as_matrix(bad, "vectors", 2)


def test_configured_threads_apply_in_every_searching_thread(built: dict[str, Any],
                                                            data: tuple[np.ndarray, np.ndarray]) -> None:
    """OpenMP keeps the thread count per thread; a gRPC handler thread must search with the configured one."""
    seen: dict[str, int] = {}

    def search_then_read() -> None:
        search_index(built["hnsw"], data[1][:1], K, None, None, HNSW)
        seen["searching"] = faiss.omp_get_max_threads()

    def read_only() -> None:
        seen["idle"] = faiss.omp_get_max_threads()

    configure_faiss(1)
    try:
        for target in (search_then_read, read_only):
            t = threading.Thread(target=target)
            t.start()
            t.join()
    finally:
        configure_faiss(0)
    assert seen["searching"] == 1
    if (os.cpu_count() or 1) > 1 and "OMP_NUM_THREADS" not in os.environ:  # the default a thread starts with: why the fix is needed
        assert seen["idle"] > 1


@pytest.mark.parametrize("storage", ["fp16", "sq8"])
def test_hnsw_over_compressed_vectors_reaches_recall(data: tuple[np.ndarray, np.ndarray], exact_top: Exact,
                                                     storage: str) -> None:
    x, q = data
    _, truth = exact_top(x, q, K)
    config = IndexConfig(kind="hnsw", hnsw_storage=storage)
    index = faiss.deserialize_index(faiss.serialize_index(build_index(x, config)))  # as published and read back
    assert index_kind(index) == "hnsw"
    scores, labels = search_index(index, q, K, None, None, config, x)
    assert _recall(labels, truth) >= 0.95
    exact = np.einsum("qkd,qd->qk", x[labels], q)
    # sq8 re-ranks its candidates against the fp32 rows: true inner products; fp16 codes are within ~1e-3
    np.testing.assert_allclose(scores, exact, atol=1e-5 if storage == "sq8" else 5e-3)
    with pytest.raises(ValueError, match="hnsw_storage='pq' must be one of"):
        IndexConfig(kind="hnsw", hnsw_storage="pq")
