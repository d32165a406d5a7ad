"""Shared fixtures of the index tests: seeded clustered unit vectors, one FAISS thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import faiss
import numpy as np
import pytest


@pytest.fixture(scope="package", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """Small indexes: with several OpenMP threads on a busy CPU k-means waits on barriers (~3x slower)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered_vectors(n: int, dim: int, seed: int, clusters: int = 100, spread: float = 0.2) -> np.ndarray:
    """Unit float32 rows around `clusters` random centres (the shape real item embeddings have)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def clustered() -> Callable[..., np.ndarray]:
    return clustered_vectors


@pytest.fixture(scope="session")
def exact_top() -> Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Exact inner-product top-k with faiss.IndexFlatIP: (scores, labels)."""

    def top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        scores, labels = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, labels

    return top
