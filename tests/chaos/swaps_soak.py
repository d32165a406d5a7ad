"""Hot swaps under load and a soak, against a real `onetower serve` over the tiny world of `world.py`.

Swaps: the server follows a model directory through a symlink (`--model <link>`; a local directory's
version is its resolved path), and two encoders (the world's and a perturbed copy) each have a
published index on the root. Flipping the link is a model *and* index swap, as an alias move is,
without a registry in the loop. Searchers and writers run throughout; every answer is counted by
status code, search latency is compared between the seconds before a flip and the flip until the
new pair serves, and at the end every acknowledged write is served, re-embedded by the final model.

Soak: steady, paced mixed traffic (searches, user recommendations, upserts and deletes cycling over a
bounded set of ids, so the live item count stays bounded) for a given number of minutes, sampling
the server's resident memory and the window's p50/p99 every few seconds.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import torch

from embed.items import Item
from embed.load import load_encoder, load_model, save_encoder
from index.config import IndexConfig
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.registry import lookup_model
from tests.chaos.world import ServeProc, World, fresh_root
from tests.integration.crash_util import wait_for
from training.reindex.job import reindex

WORDS = ("wool hat", "linen shirt", "oak side table", "copper kettle", "trail shoe", "ceramic mug")
FAILURE_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
MATCH_COSINE = 0.999  # a stored vector and a fresh embedding of the same content


@dataclass
class Traffic:
    """Callers against one server: searches by item id, user recommendations, upserts and deletes."""

    target: str
    catalog_ids: list[str]
    searchers: int = 3
    writers: int = 1
    pace_s: float = 0.0  # sleep between one caller's calls (0: as fast as the server answers)
    write_ids: int = 0  # writers cycle over this many ids, deleting as often as upserting (0: new ids)
    calls: list[tuple[str, float, float, grpc.StatusCode, str]] = field(default_factory=list)
    acked: dict[str, str | None] = field(default_factory=dict)  # id -> latest acknowledged title, None: deleted
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._search, args=(n,), daemon=True) for n in range(self.searchers)]
        self.threads += [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(self.writers)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _timed(self, kind: str, call: object) -> bool:
        start = time.monotonic()
        try:
            call()  # type: ignore[operator]
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        with self.lock:
            self.calls.append((kind, start, time.monotonic(), code, details))
        return code == grpc.StatusCode.OK

    def _search(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.target, timeout=30) as c:
            while not self.stop.wait(self.pace_s):
                ids = rng.sample(self.catalog_ids, 3)
                if rng.random() < 0.75:
                    self._timed("search", lambda i=ids[0]: c.similar(item_ids=[i], k=10))
                else:
                    history = [pb.HistoryEvent(item_id=i, weight=1.0) for i in ids]
                    self._timed("recommend", lambda h=history: c.stub.RecommendForUser(
                        pb.RecommendForUserRequest(history=h, k=10), timeout=30))

    def _write(self, number: int) -> None:
        rng = random.Random(1000 + number)
        with Client(self.target, timeout=30) as c:
            for n in range(10**9):
                if self.stop.wait(self.pace_s):
                    return
                item_id = f"w{number}-{rng.randrange(self.write_ids) if self.write_ids else n}"
                with self.lock:
                    present = self.acked.get(item_id) is not None
                if self.write_ids and present and rng.random() < 0.5:
                    if self._timed("delete", lambda i=item_id: c.delete([i])):
                        with self.lock:
                            self.acked[item_id] = None
                    continue
                title = f"{rng.choice(WORDS)} {number}-{n}"
                if self._timed("upsert", lambda i=item_id, t=title: c.upsert([pb.Item(item_id=i, title=t)])):
                    with self.lock:
                        self.acked[item_id] = title

    def latencies(self, kind: str, start: float, end: float) -> list[float]:
        with self.lock:
            return [b - a for k, a, b, code, _ in self.calls
                    if k == kind and code == grpc.StatusCode.OK and start <= a < end]

    def codes(self) -> Counter[str]:
        with self.lock:
            return Counter(code.name for *_, code, _ in self.calls)

    def failures(self) -> list[str]:
        with self.lock:
            return [f"{k}: {code.name}: {details}"[:300] for k, _, _, code, details in self.calls
                    if code in FAILURE_CODES or code == grpc.StatusCode.UNAVAILABLE]


def check_acked(c: Client, acked: dict[str, str | None], encoder_dir: Path) -> list[str]:
    """Every acknowledged upsert is served with the vector `encoder_dir` gives its latest title; every
    acknowledged delete stays deleted."""
    problems: list[str] = []
    present = sorted(i for i, t in acked.items() if t is not None)
    for start in range(0, len(present), 500):
        chunk = present[start:start + 500]
        try:
            stored = c.embeddings(chunk)
        except grpc.RpcError as e:
            problems.append(f"acknowledged items not served: {e.code().name}: {e.details()}"[:300])
            continue
        items = [Item(item_id=i, title=acked[i] or "") for i in chunk]
        fresh = load_encoder(encoder_dir).encode(items)
        got = np.asarray([stored[i] for i in chunk])
        cosine = np.sum(got * fresh, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(fresh, axis=1))
        problems += [f"{i} served with stale content (cosine {s:.4f})" for i, s in zip(chunk, cosine, strict=True)
                     if s < MATCH_COSINE]
    for item_id in (i for i, t in acked.items() if t is None):
        try:
            c.embeddings([item_id])
            problems.append(f"deleted {item_id} is back")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                problems.append(f"{item_id}: {e.code().name}: {e.details()}"[:300])
    return problems


# ---- hot swaps -------------------------------------------------------------------------------------
@dataclass
class SwapResult:
    swaps: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    acked: int = 0
    p99_before_ms: list[float] = field(default_factory=list)
    p99_during_ms: list[float] = field(default_factory=list)
    swap_s: list[float] = field(default_factory=list)  # link flipped -> the new pair answers
    failures: list[str] = field(default_factory=list)


def perturbed_copy(encoder_dir: Path, out: Path, seed: int) -> Path:
    """The encoder with every weight moved by ~5% noise: another model of the same shape."""
    model, tokenizer = load_model(encoder_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return save_encoder(out, model, tokenizer)


def _point(link: Path, target: Path) -> None:
    """Move the symlink atomically (a new link renamed over the old)."""
    staging = link.with_name(link.name + ".new")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    os.replace(staging, link)


def _quantile_ms(values: list[float], q: float) -> float:
    return float(1e3 * np.quantile(values, q)) if values else float("nan")


def run_hot_swaps(world: World, work: Path, swaps: int, seed: int, settle_s: float = 3.0) -> SwapResult:
    """`swaps` model+index swaps (a symlink flip, polled every 0.2 s) under searches, recommendations and
    writes; no answer may be UNKNOWN, INTERNAL or UNAVAILABLE, and every acknowledged write is served."""
    result = SwapResult()
    root = fresh_root(world, work / "index")
    encoders = [world.encoder_dir, perturbed_copy(world.encoder_dir, work / "encoder-b", seed)]
    ref = lookup_model(str(encoders[1]))
    reindex(world.catalog, load_encoder(encoders[1]), ref.name, ref.version, root, IndexConfig(kind="flat"))
    link = work / "model"
    _point(link, encoders[0])
    server = ServeProc(replace(world, encoder_dir=link), root, work / "serve.log", poll_seconds=0.2)
    server.start()
    traffic: Traffic | None = None
    try:
        traffic = Traffic(server.target, _catalog_ids(world), searchers=3, writers=2)
        traffic.start()
        time.sleep(settle_s)
        with Client(server.target) as c:
            for n in range(swaps):
                target = encoders[(n + 1) % 2]
                flipped = time.monotonic()
                _point(link, target)
                expected = f"local:{target.resolve()}"
                wait_for(lambda e=expected: c.info().model_version == e, f"swap {n} to {target.name}",
                         server.proc, server.log, timeout=120, every=0.05)
                served = time.monotonic()
                result.swaps += 1
                result.swap_s.append(served - flipped)
                result.p99_before_ms.append(_quantile_ms(traffic.latencies("search", flipped - settle_s, flipped),
                                                         0.99))
                result.p99_during_ms.append(_quantile_ms(traffic.latencies("search", flipped, served + 1.0), 0.99))
                time.sleep(settle_s)
        traffic.finish()
        result.codes = traffic.codes()
        result.failures += traffic.failures()
        result.acked = sum(1 for t in traffic.acked.values() if t is not None)
        with Client(server.target, timeout=60) as c:
            final = Path(c.info().model_version.removeprefix("local:"))
            result.failures += check_acked(c, traffic.acked, final)
        if not server.alive():
            result.failures.append(f"the server exited with {server.proc.returncode if server.proc else None}")
    finally:
        if traffic is not None:
            traffic.finish()
        server.stop()
    return result


def _catalog_ids(world: World) -> list[str]:
    import polars as pl

    return pl.read_parquet(world.catalog, columns=["item_id"])["item_id"].to_list()


# ---- soak ------------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    seconds: float = 0.0
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)  # t s, RSS MiB, p50, p99 ms
    kinds: list[tuple[float, float]] = field(default_factory=list)  # RssAnon, RssFile MiB (heap vs mapped files)
    codes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def growth_mib_per_hour(self) -> float:
        """Slope of resident memory over the second half of the soak (after warm-up), MiB/hour."""
        half = [s for s in self.samples if s[0] >= self.seconds / 2]
        if len(half) < 3:
            return float("nan")
        t, rss = np.asarray([s[0] for s in half]), np.asarray([s[1] for s in half])
        return float(np.polyfit(t, rss, 1)[0] * 3600)


def run_soak(world: World, work: Path, minutes: float, seed: int, every_s: float = 10.0) -> SoakResult:
    """Steady paced traffic for `minutes`: 3 searchers and 1 writer (upserts and deletes over 300 ids) each
    pausing 20 ms between calls; resident memory and the window's search p50/p99 every `every_s`."""
    result = SoakResult()
    server = ServeProc(world, fresh_root(world, work / "index"), work / "serve.log")
    server.start()
    traffic = Traffic(server.target, _catalog_ids(world), searchers=3, writers=1, pace_s=0.02, write_ids=300)
    started = time.monotonic()
    try:
        traffic.start()
        end = started + 60 * minutes
        while time.monotonic() < end:
            window = time.monotonic()
            time.sleep(every_s)
            now = time.monotonic()
            lat = traffic.latencies("search", window, now)
            result.samples.append((now - started, server.rss_kib() / 1024, _quantile_ms(lat, 0.5),
                                   _quantile_ms(lat, 0.99)))
            result.kinds.append(_rss_kinds(server.pid))
            if not server.alive():
                result.failures.append(f"the server exited with {server.proc.returncode if server.proc else None}")
                break
        traffic.finish()
        result.seconds = time.monotonic() - started
        result.codes = traffic.codes()
        result.failures += traffic.failures()
        with Client(server.target, timeout=60) as c:
            result.failures += check_acked(c, traffic.acked, world.encoder_dir)
    finally:
        traffic.finish()
        server.stop()
    return result


def _rss_kinds(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of a process, MiB: heap growth against pages of mapped files read in."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(RssAnon|RssFile):\s+(\d+) kB", status, re.M)}
    return kib.get("RssAnon", 0) / 1024, kib.get("RssFile", 0) / 1024


def plot_soak(result: SoakResult, out: Path) -> Path:
    """Resident memory and search p50/p99 over the soak, one figure with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray([s[0] for s in result.samples]) / 60
    fig, (mem, lat) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    mem.plot(t, [s[1] for s in result.samples], color="tab:blue")
    mem.set_ylabel("resident memory (MiB)")
    mem.set_title(f"soak: {result.seconds / 60:.0f} min of mixed traffic, memory growth "
                  f"{result.growth_mib_per_hour():+.1f} MiB/h (second half)")
    lat.plot(t, [s[2] for s in result.samples], label="p50", color="tab:green")
    lat.plot(t, [s[3] for s in result.samples], label="p99", color="tab:red")
    lat.set_ylabel("SimilarItems latency (ms)")
    lat.set_xlabel("minutes")
    lat.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
