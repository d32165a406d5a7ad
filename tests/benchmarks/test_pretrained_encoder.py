"""Serving cost of the pretrained native encoder beside the tiny from-scratch one, in the paths that serve.

Items from the synthetic catalog (a title, a description, one 64 px PNG) through `ItemEncoder.encode`
(what `EmbedItems` runs: decode, tokenise, forward) and through the reindex job's `embed_pipelined`
(decoding the next batch in a second thread), fp32 and bf16 autocast, batch 32. The ratio column is
items/s over the tiny unified encoder's fp32 rate in the same path. Untrained weights: the cost does not
depend on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from embed.build import build_encoder, build_pretrained
from embed.config import preset
from embed.encoder import ItemEncoder, native_bf16
from embed.items import Item
from embed.tokens import TextTokenizer
from training.data.catalog import iter_items, read_catalog
from training.data.embedding import embed_pipelined
from training.data.synthetic import SynthConfig, generate

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

BATCH = 32
ITEMS = 64 if QUICK else 256


def _encoders(items: list[Item]) -> list[tuple[str, ItemEncoder]]:
    tiny = preset("tiny")
    tokenizer = TextTokenizer.train((it.text for it in items), tiny.vocab_size)
    unified = build_encoder(preset("tiny", vocab_size=tokenizer.vocab_size))
    out = [("unified tiny", ItemEncoder(unified, tokenizer, batch_size=BATCH))]
    for arch in ("native_pretrained", "stitched_twin"):
        model, wordpiece = build_pretrained(preset("pretrained", architecture=arch))
        out.append((f"{arch} (pretrained, 160 px)", ItemEncoder(model, wordpiece, batch_size=BATCH)))
    return out


def _rate(run: Callable[[], object], n: int) -> float:
    run()  # warm up
    best = 0.0
    for _ in range(1 if QUICK else 2):
        start = time.perf_counter()
        run()
        best = max(best, n / (time.perf_counter() - start))
    return best


def test_pretrained_encoder_serving_cost(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", SynthConfig(n_items=ITEMS, n_users=10, seed=0))
    items = list(iter_items(read_catalog(data.catalog), data.catalog.parent))
    rows = []
    precisions = ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]
    baseline: dict[str, float] = {}
    batches = [items[i: i + BATCH] for i in range(0, len(items), BATCH)]
    for label, base in _encoders(items):
        for precision in precisions:
            encoder = ItemEncoder(base.model, base.tokenizer, batch_size=BATCH, precision=precision)
            for path, run in (("EmbedItems (ItemEncoder.encode)", lambda e=encoder: e.encode(items)),
                              ("reindex (embed_pipelined)", lambda e=encoder: embed_pipelined(e, batches))):
                rate = _rate(run, len(items))
                baseline.setdefault(path, rate)
                rows.append({"encoder": label, "precision": precision, "path": path, "items_per_s": rate,
                             "ratio_vs_tiny_fp32": rate / baseline[path]})
    write_result("pretrained_encoder", rows, notes=f"{len(items)} synthetic items, batch {BATCH}, "
                 f"{torch.get_num_threads()} torch threads; bf16 only where the CPU computes it natively")
