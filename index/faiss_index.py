"""Build and search FAISS indexes: inner product on unit vectors, label of row i is i."""

from __future__ import annotations

import importlib
import logging
import math
import threading
from types import ModuleType
from typing import Any

import numpy as np

from index.config import AUTO_FLAT_BELOW, AUTO_HNSW_BELOW, IndexConfig, SearchParams

logger = logging.getLogger(__name__)

FAISS_MISSING = "FAISS is not installed: pip install 'onetower[cpu]' (or [gpu] on a CUDA machine)"
MIN_IVFPQ_COUNT = 4 * 256  # fewer points cannot train 8-bit PQ codebooks (4-bit ones need fewer: kept simple)
TRAIN_POINTS_PER_LIST = 256  # FAISS's own k-means cap; more training points only cost time
ADD_CHUNK = 1 << 20  # rows per add: OPQ would otherwise copy all rows at once (5 GB at 10M x 128)

# OpenMP keeps the thread count per thread: omp_set_num_threads in one thread leaves every other thread
# (gRPC handlers, a thread pool) on the default, all cores. configure_faiss records the count and
# search_index applies it once in each thread that searches.
_search_threads = 0
_applied = threading.local()


def import_faiss() -> ModuleType:
    """Import faiss, or fail with the command that installs it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise RuntimeError(FAISS_MISSING) from exc


def configure_faiss(threads: int, blas_threshold: int | None = None) -> None:
    """Set process-wide FAISS knobs for serving.

    Args:
        threads: OpenMP threads per search (>0 sets them, 0 leaves FAISS's default), in this thread
            now and in any other thread at its first search. Servers that run many searches
            concurrently want 1.
        blas_threshold: `faiss.cvar.distance_compute_blas_threshold`. FAISS 1.15 compares it with
            queries x dim of a call (BLAS at or above it), so `blas_min_batch * dim` uses BLAS
            from `blas_min_batch` queries on; its default (128000) keeps small batches on a scan
            that is 4-13x slower (docs/PERFORMANCE.md). Searches with an ID selector always scan.
    """
    global _search_threads
    faiss = import_faiss()
    if threads < 0:
        raise ValueError(f"threads={threads} must be >= 0")
    if threads > 0:
        faiss.omp_set_num_threads(threads)
        _applied.threads = threads
    _search_threads = threads
    if blas_threshold is not None:
        if blas_threshold < 1:
            raise ValueError(f"blas_threshold={blas_threshold} must be >= 1")
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
    logger.info("faiss configured: threads=%d blas_threshold=%s", threads, blas_threshold)


def resolve_kind(config: IndexConfig, count: int) -> str:
    """The concrete index kind for `count` items (resolves "auto")."""
    if count < 0:
        raise ValueError(f"count={count} must be >= 0")
    if config.kind != "auto":
        return config.kind
    if count < AUTO_FLAT_BELOW:
        return "flat"
    if count < AUTO_HNSW_BELOW:
        return "hnsw"
    return "ivfpq"


def choose_nlist(config: IndexConfig, count: int) -> int:
    """The number of IVF lists: the configured one, else ~4*sqrt(count) with enough points to train."""
    if config.ivf_nlist:
        return config.ivf_nlist
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def as_matrix(vectors: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """`vectors` as a C-contiguous float32 [n, dim] array with finite values."""
    try:
        arr = np.ascontiguousarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be castable to float32: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} has shape {arr.shape}, want 2-D [n, dim]")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dim {arr.shape[1]}, want {dim}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values, want finite")
    return arr


def build_index(vectors: np.ndarray, config: IndexConfig) -> Any:
    """Build a CPU FAISS index over `vectors` (unit rows); the label of row i is i.

    The heavy lifting runs on a GPU when one is present and `config.use_gpu`; the
    returned index is always a CPU copy, ready for `faiss.write_index`.
    """
    faiss = import_faiss()
    x = as_matrix(vectors, "vectors")
    count, dim = x.shape
    if count == 0:
        raise ValueError("vectors has 0 rows, want at least 1")
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    kind = resolve_kind(config, count)
    index = _empty_index(faiss, kind, dim, count, config)
    index = _fill(faiss, index, x, kind, config)
    logger.info("built %s index: %d x %d", kind, count, dim)
    return index


def _empty_index(faiss: ModuleType, kind: str, dim: int, count: int, config: IndexConfig) -> Any:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        if config.hnsw_storage == "flat":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            qtype = faiss.ScalarQuantizer.QT_fp16 if config.hnsw_storage == "fp16" else faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexHNSWSQ(dim, qtype, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
        return index
    pq_m = config.pq_m or max(1, dim // (2 if config.pq_bits == 4 else 4))  # 0: dim/4 bytes a vector
    if dim % pq_m:
        raise ValueError(f"dim {dim} is not divisible by pq_m={pq_m}")
    if count < MIN_IVFPQ_COUNT:
        raise ValueError(f"kind='ivfpq' needs at least {MIN_IVFPQ_COUNT} vectors to train, got {count}")
    nlist = choose_nlist(config, count)
    opq = f"OPQ{pq_m}," if config.use_opq else ""
    code = f"PQ{pq_m}x4fs" if config.pq_bits == 4 else f"PQ{pq_m}x8"
    index = faiss.index_factory(dim, f"{opq}IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.nprobe = config.nprobe
    if config.pq_bits == 8:
        # The factory turns on polysemous training (tens of seconds of annealing per build, whatever the
        # count); it only serves Hamming pre-filtering, which searches here never use.
        ivf.do_polysemous_training = False
    return index


def _fill(faiss: ModuleType, index: Any, x: np.ndarray, kind: str, config: IndexConfig) -> Any:
    """Train (if needed) and add `x`, on a GPU when allowed and possible."""
    target = index
    gpu = config.use_gpu and kind != "hnsw" and _num_gpus(faiss) > 0
    if gpu:
        try:
            target = faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError) as exc:  # e.g. a PQ layout the GPU lacks
            logger.warning("building %s on CPU: GPU copy failed: %s", kind, exc)
            gpu = False
            target = index
    if not target.is_trained:
        target.train(_training_sample(x, kind, config))
    for start in range(0, len(x), ADD_CHUNK):  # OPQ's pre-transform copies what one add gets: bound that copy
        target.add(x[start: start + ADD_CHUNK])
    return faiss.index_gpu_to_cpu(target) if gpu else target


def _num_gpus(faiss: ModuleType) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _training_sample(x: np.ndarray, kind: str, config: IndexConfig) -> np.ndarray:
    """At most the points FAISS would use anyway, seeded, so builds are reproducible and bounded."""
    cap = TRAIN_POINTS_PER_LIST * max(choose_nlist(config, x.shape[0]), 1 << config.pq_bits)
    if kind != "ivfpq" or x.shape[0] <= cap:
        return x
    rows = np.random.default_rng(0).choice(x.shape[0], size=cap, replace=False)
    return x[np.sort(rows)]


def index_kind(index: Any) -> str:
    """"flat", "hnsw" or "ivfpq" for an index built by `build_index` (or read back)."""
    faiss = import_faiss()
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVF):
        return "ivfpq"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    raise ValueError(f"index of type {type(inner).__name__} is not one build_index makes")


def _sq8_graph(index: Any) -> bool:
    """An HNSW graph over 8-bit scalar-quantized vectors (its order needs exact re-ranking)."""
    faiss = import_faiss()
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexHNSW):
        return False
    storage = faiss.downcast_index(inner.storage)
    return isinstance(storage, faiss.IndexScalarQuantizer) and storage.sq.qtype == faiss.ScalarQuantizer.QT_8bit


class IndexShape:
    """What `search_index` needs to know of an index, read once (each FAISS downcast costs microseconds)."""

    def __init__(self, kind: str, reranked: bool) -> None:
        self.kind = kind
        self.reranked = reranked  # ivfpq, or an sq8 HNSW graph: hits re-ranked exactly
        self._defaults: dict[tuple[int, int], Any] = {}

    @classmethod
    def of(cls, index: Any) -> IndexShape:
        kind = index_kind(index)
        return cls(kind, kind == "ivfpq" or _sq8_graph(index))

    def default_parameters(self, config: IndexConfig) -> Any:
        """The search parameters of the index's default effort (no selector), built once per effort."""
        key = (config.ef_search, config.nprobe)
        if key not in self._defaults:
            self._defaults[key] = _search_parameters(self.kind, None, SearchParams(), config)
        return self._defaults[key]


def search_index(
    index: Any,
    queries: np.ndarray,
    k: int,
    selector: Any | None,
    params: SearchParams | None,
    config: IndexConfig,
    vectors: np.ndarray | None = None,
    shape: IndexShape | None = None,
    checked: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Search `index` for the `k` best rows per query.

    Args:
        selector: a faiss.IDSelector restricting the labels searched, or None.
        params: per-call effort overrides (never written to the shared index).
        vectors: the stored rows; for ivfpq and an sq8 HNSW graph, k*refine_factor hits are
            re-ranked exactly against them, so scores are true inner products.
        shape: `IndexShape.of(index)`, kept by a caller that searches one index many times.
        checked: `queries` is already what `as_matrix` returns (the caller checked it): not scanned again.

    Returns:
        (scores float32 [n, k], labels int64 [n, k]); missing hits have label -1.
    """
    q = queries if checked else as_matrix(queries, "queries", index.d)
    if _search_threads and getattr(_applied, "threads", 0) != _search_threads:
        import_faiss().omp_set_num_threads(_search_threads)
        _applied.threads = _search_threads
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    shape = shape or IndexShape.of(index)
    exact = vectors if config.refine_factor > 1 and shape.reranked else None
    fetch = k * config.refine_factor if exact is not None else k
    if selector is None and params is None:
        search_params = shape.default_parameters(config)  # built once: a SWIG object costs ~30 us a call
    else:
        search_params = _search_parameters(shape.kind, selector, params or SearchParams(), config)
    scores, labels = index.search(q, fetch, params=search_params)
    if exact is not None:
        return rerank(q, labels, exact, k)
    return scores, labels


def _search_parameters(kind: str, selector: Any | None, params: SearchParams, config: IndexConfig) -> Any:
    faiss = import_faiss()
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=params.ef_search or config.ef_search, sel=selector)
    if kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=params.nprobe or config.nprobe, sel=selector)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def rerank(queries: np.ndarray, labels: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate labels; the best `k`, -1 padded."""
    valid = labels >= 0
    rows = np.asarray(vectors[np.where(valid, labels, 0).ravel()], dtype=np.float32)
    cand = rows.reshape(labels.shape[0], labels.shape[1], -1)  # (n, fetch, dim)
    scores = np.einsum("nfd,nd->nf", cand, queries)
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_labels = np.where(np.isfinite(top_scores), np.take_along_axis(labels, order, axis=1), -1)
    return top_scores.astype(np.float32), top_labels.astype(np.int64)
