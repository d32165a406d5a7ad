"""The FAISS knobs the serving view sets: OpenMP threads per search, and when exact search uses BLAS.

1. One query at a time (the SimilarItems-by-id shape), flat and HNSW, on 1 vs 2 OpenMP threads.
2. Flat search in batches of 1..256 queries on 1 thread: the per-query scan (FAISS 1.15's default
   for any batch under 128000 / dim queries), BLAS (threshold lowered), and BLAS asked for with an
   ID selector (tombstones), which FAISS always runs as the scan.
Configurations are interleaved round by round and each figure is the median of the rounds, since
the machine is shared. Results: bench-results/faiss_knobs.{json,md}; docs/PERFORMANCE.md quotes them.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import faiss
import numpy as np
import pytest

from index.config import AUTO_FLAT_BELOW

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

N = 50_000 if QUICK else AUTO_FLAT_BELOW  # the largest flat index `auto` builds
DIM = 256  # the small and base presets' embed_dim (EncoderConfig() has 128)
HNSW_N = 20_000
K = 10
ROUNDS = 3
BATCHES = (1, 2, 4, 16, 64, 256)
SCAN, BLAS = 10**9, 1  # thresholds: FAISS 1.15 scans when queries x dim < threshold


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(256, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 256, N + 1024)] + 0.3 * rng.normal(size=(N + 1024, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[:N]), np.ascontiguousarray(x[N:])


def _ms_per_query(index: Any, q: np.ndarray, batch: int, calls: int, params: Any = None) -> float:
    times = []
    for r in range(calls):
        start = (r * batch) % (len(q) - batch)
        t = time.perf_counter()
        index.search(q[start: start + batch], K, params=params)
        times.append((time.perf_counter() - t) * 1000 / batch)
    return statistics.median(times)


def test_faiss_threads_and_blas_threshold() -> None:
    x, q = _data()
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    threads_before = faiss.omp_get_max_threads()
    load = os.getloadavg()[0]
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    faiss.omp_set_num_threads(2)
    hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(x[:HNSW_N])
    hnsw.hnsw.efSearch = 128
    dead = np.arange(0, N, 97, dtype=np.int64)
    with_selector = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(len(dead),
                                                                                         faiss.swig_ptr(dead))))
    found: dict[tuple[str, str, int], list[float]] = {}
    try:
        for _ in range(ROUNDS):
            faiss.cvar.distance_compute_blas_threshold = default_threshold  # the batch rows below change it
            for threads in (1, 2):
                faiss.omp_set_num_threads(threads)
                for name, index, calls in ((f"flat {N:,}", flat, 20), (f"hnsw {HNSW_N:,} ef 128", hnsw, 200)):
                    found.setdefault((f"single query, {name}", f"{threads} thread(s)", 1), []).append(
                        _ms_per_query(index, q, 1, calls))
            faiss.omp_set_num_threads(1)
            for batch in BATCHES:
                calls = max(1, 32 // batch)
                for mode, threshold, params in (("scan (FAISS default)", SCAN, None), ("BLAS", BLAS, None),
                                                ("BLAS asked, with a selector", BLAS, with_selector)):
                    faiss.cvar.distance_compute_blas_threshold = threshold
                    found.setdefault((f"flat {N:,}, 1 thread", mode, batch), []).append(
                        _ms_per_query(flat, q, batch, calls, params))
    finally:
        faiss.cvar.distance_compute_blas_threshold = default_threshold
        faiss.omp_set_num_threads(threads_before)
    rows = [{"case": case, "setting": setting, "batch": batch, "ms_per_query": statistics.median(v),
             "qps": 1000 / statistics.median(v)} for (case, setting, batch), v in found.items()]
    notes = (f"Seeded clustered unit vectors, dim {DIM}, k={K}; flat over {N:,}, HNSW32 (efConstruction 64, "
             f"efSearch 128) over {HNSW_N:,}. Median of {ROUNDS} interleaved rounds, each the median of its calls. "
             f"FAISS {faiss.__version__} default distance_compute_blas_threshold: {default_threshold} "
             f"(compared with queries x dim). 1-minute load average at the start: {load:.1f}.")
    write_result("faiss_knobs", rows, notes)
