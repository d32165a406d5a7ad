"""Settings of the FAISS index and of per-query search overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any


class IndexKind(StrEnum):
    """The FAISS index kinds (a command-line choice)."""

    flat = "flat"
    hnsw = "hnsw"
    ivfpq = "ivfpq"
    auto = "auto"


class HnswStorage(StrEnum):
    """What an HNSW graph walks over: fp32 vectors, fp16 codes, or 8-bit codes re-ranked exactly."""

    flat = "flat"
    fp16 = "fp16"
    sq8 = "sq8"


class IvfCode(StrEnum):
    """The IVF-PQ code (a command-line choice): 8-bit codes after an OPQ rotation, or 4-bit fast-scan codes."""

    pq8 = "pq8"
    fastscan = "fastscan"


# The IndexConfig fields each code sets (pq8: the defaults, 32 bytes a vector). fastscan: dim/4 bytes a vector
# too (pq_m 0: dim/2 sub-quantizers), orders coarser (64x re-rank: 16x capped recall at 0.894 on 10M
# encoder-like vectors) but scans ~4x faster, and trains without OPQ (it gained no recall at 2 dimensions a
# sub-quantizer, and its training took minutes instead of seconds)
IVF_CODES: dict[str, dict[str, Any]] = {
    "pq8": {},
    "fastscan": {"pq_m": 0, "pq_bits": 4, "refine_factor": 64, "use_opq": False},
}
KINDS = tuple(k.value for k in IndexKind)
# What an HNSW graph keeps per item to compute distances with: a graph walk is bound by fetching the
# vectors it visits, so smaller codes search faster (docs/PERFORMANCE.md, QPS at recall 0.95 vs flat: sq8
# +52% on 200k x 128 and +15% on 1M x 64, fp16 +33% and -7%); sq8's order is fixed by re-ranking against
# the stored fp32 vectors.
HNSW_STORAGES = tuple(s.value for s in HnswStorage)
# `auto` picks exact search while it is cheap, HNSW while it fits in memory, then IVF-PQ.
AUTO_FLAT_BELOW = 100_000
AUTO_HNSW_BELOW = 2_000_000
# Upper bounds of per-query search effort: past them a query costs about an exact scan (or more).
MAX_EF_SEARCH = 4096
MAX_NPROBE = 65536
PQ_BITS = (8, 4)  # 8: the layout every FAISS backend supports; 4: fast-scan (CPU SIMD)
SEARCH_THREADS = 1  # serving: many searches run at once, and one query is slower on two threads (measured)


def _check_positive(name: str, value: int, minimum: int = 1, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} must be <= {maximum}")


@dataclass(frozen=True)
class IndexConfig:
    """How to build and search the item index."""

    kind: str = "auto"  # "flat" | "hnsw" | "ivfpq" | "auto" (by item count, see AUTO_*_BELOW)
    hnsw_m: int = 32  # graph degree: more is better recall and more memory
    ef_construction: int = 200
    ef_search: int = 128  # recall@10 >= 0.95 on the seeded clustered tests
    hnsw_storage: str = "flat"  # see HNSW_STORAGES
    ivf_nlist: int = 0  # 0: chosen from the count (~4*sqrt(n), at least 39 training points per list)
    pq_m: int = 32  # sub-quantizers; the dim must be divisible by it. 0: dim/4 (8-bit codes), dim/2 (4-bit)
    # bits per sub-quantizer code: 8 (256 centroids) or 4, FAISS's fast-scan layout (SIMD lookups in
    # registers): a code scans ~4x faster but orders coarser, so more hits are re-ranked. At 10M encoder-like
    # vectors PQ64x4fs + 64x re-rank served 1.3x the QPS of OPQ32,PQ32x8 + 4x to one caller and 0.95x to
    # eight, recall 0.935 vs 0.949 (docs/PERFORMANCE.md, "Ten million items"): not the default
    pq_bits: int = 8
    nprobe: int = 32
    use_opq: bool = True  # rotate before PQ (OPQ): better recall for the same code size
    refine_factor: int = 4  # ivfpq, hnsw sq8: re-rank k*refine_factor hits exactly against the stored vectors
    # OpenMP threads, >0: faiss.omp_set_num_threads. 0: builds keep FAISS's default (every core) and the
    # serving view (LiveIndex) uses SEARCH_THREADS: one query ran 2x slower on 2 threads (docs/PERFORMANCE.md).
    threads: int = 0
    # Exact (flat) search uses BLAS for calls of at least this many queries, else a per-query scan:
    # measured 2-10x faster from 4 queries on, 2x slower for 1 (docs/PERFORMANCE.md). FAISS 1.15's own
    # threshold (128000 query floats: 500 queries at dim 256) keeps every realistic batch on the scan.
    blas_min_batch: int = 4
    use_gpu: bool = True  # only takes effect when faiss.get_num_gpus() > 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {', '.join(KINDS)}")
        if self.hnsw_storage not in HNSW_STORAGES:
            raise ValueError(f"hnsw_storage={self.hnsw_storage!r} must be one of {', '.join(HNSW_STORAGES)}")
        _check_positive("hnsw_m", self.hnsw_m, 2)
        _check_positive("ef_construction", self.ef_construction)
        _check_positive("ef_search", self.ef_search, 1, MAX_EF_SEARCH)
        _check_positive("ivf_nlist", self.ivf_nlist, 0)
        _check_positive("pq_m", self.pq_m, 0)
        if self.pq_bits not in PQ_BITS:
            raise ValueError(f"pq_bits={self.pq_bits!r} must be one of {PQ_BITS}")
        _check_positive("nprobe", self.nprobe, 1, MAX_NPROBE)
        _check_positive("refine_factor", self.refine_factor)
        _check_positive("threads", self.threads, 0)
        _check_positive("blas_min_batch", self.blas_min_batch)


@dataclass(frozen=True)
class SearchParams:
    """Per-query overrides of the search effort; never set on the shared index."""

    ef_search: int | None = None
    nprobe: int | None = None

    def __post_init__(self) -> None:
        if self.ef_search is not None:
            _check_positive("ef_search", self.ef_search, 1, MAX_EF_SEARCH)
        if self.nprobe is not None:
            _check_positive("nprobe", self.nprobe, 1, MAX_NPROBE)


def search_config(params: Mapping[str, Any], **overrides: Any) -> IndexConfig:
    """The settings a published index was built with (its manifest's `params`), to search it with its own
    effort and re-rank (`nprobe`, `ef_search`, `refine_factor`); `overrides` (e.g. `threads`) win. Fields
    this version does not know are ignored and missing ones take their defaults, so older manifests load.

    Raises:
        ValueError: a value is out of range (the manifest was written by a faulty writer).
    """
    known = {f.name for f in fields(IndexConfig)}
    return IndexConfig(**{**{k: v for k, v in params.items() if k in known}, **overrides})
