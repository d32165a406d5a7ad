"""Encoder throughput: the unified (early-fusion) encoder against a stitched (late-fusion) one.

Forward passes only (what reindexing and `EmbedItems` run), on one fixed padded batch of items with
text and one image, so tokenising and decoding are not in the figure (the reindex benchmark has them).
Variants per size: unified; unified with modality-aware experts; stitched at equal parameters (towers
narrower than the unified width); stitched at about equal FLOPs per item (towers as wide as the
unified model, so about twice its parameters). FLOPs are counted by `torch.utils.flop_counter`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from embed.build import build_encoder
from embed.config import EncoderConfig, preset
from embed.encoder import native_bf16
from embed.model import EncoderInput
from embed.stitched import StitchedEncoder, count_parameters

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

BATCH = 64
TEXT_TOKENS = 24  # a title plus a few attribute words, as in the synthetic catalog
SIZES = ["tiny"] if QUICK else ["tiny", "small"]
SECONDS = 2.0 if QUICK else 6.0  # timed per variant (best of three rounds)


def _batch(config: EncoderConfig, rng: torch.Generator) -> EncoderInput:
    t = min(TEXT_TOKENS, config.max_text_tokens) + 2
    token_ids = torch.randint(5, config.vocab_size, (BATCH, t), generator=rng)
    n = config.grid * config.grid
    patches = torch.rand(BATCH, 1, n, config.patch_dim, generator=rng)
    return EncoderInput(token_ids=token_ids, text_mask=torch.ones(BATCH, t, dtype=torch.bool), patches=patches,
                        image_mask=torch.ones(BATCH, 1, dtype=torch.bool))


def _flops_per_item(model: nn.Module, batch: EncoderInput) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(batch)
    return counter.get_total_flops() / len(batch)


def _items_per_s(model: nn.Module, batch: EncoderInput, bf16: bool = False) -> float:
    rounds = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(2):
            model(batch)  # warm up
        for _ in range(3):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < SECONDS / 3:
                model(batch)
                n += len(batch)
            rounds.append(n / (time.perf_counter() - start))
    return max(rounds)


def _equal_flops_width(config: EncoderConfig, batch: EncoderInput, target: float) -> int:
    """The stitched tower width (a multiple of heads) whose FLOPs per item are closest to `target`."""
    few = EncoderInput(batch.token_ids[:2], batch.text_mask[:2], batch.patches[:2], batch.image_mask[:2])
    widths = range(config.heads, 2 * config.width + 1, config.heads)
    return min(widths, key=lambda w: abs(_flops_per_item(StitchedEncoder(config, width=w).eval(), few) - target))


def _variants(name: str, batch: EncoderInput) -> list[tuple[str, nn.Module, bool]]:
    """(label, model, bf16 autocast) per row; the first row is the unified fp32 baseline."""
    config = preset(name)
    unified = build_encoder(config).eval()
    stitched = build_encoder(dataclasses.replace(config, architecture="stitched")).eval()
    wide = _equal_flops_width(config, batch, _flops_per_item(unified, batch))
    return [
        ("unified", unified, False),
        ("unified+moe(4 experts, top-1)", build_encoder(dataclasses.replace(config, moe_experts=4)).eval(), False),
        ("stitched, equal params", stitched, False),
        (f"stitched, equal FLOPs (towers {wide} wide)", StitchedEncoder(config, width=wide).eval(), False),
        ("unified, bf16 autocast", unified, True),
        ("stitched, equal params, bf16 autocast", stitched, True),
    ]


def test_encoder_throughput() -> None:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    for name in SIZES:
        batch = _batch(preset(name), torch.Generator().manual_seed(0))
        base: float | None = None
        for label, model, bf16 in _variants(name, batch):
            rate = _items_per_s(model, batch, bf16)
            base = base or rate
            rows.append({"size": name, "encoder": label, "params_M": count_parameters(model) / 1e6,
                         "GFLOPs/item": _flops_per_item(model, batch) / 1e9, "items/s": rate,
                         "unified / this": base / rate})
        unified, stitched = (next(r for r in rows if r["size"] == name and r["encoder"] == e)
                             for e in ("unified", "stitched, equal params"))
        assert abs(stitched["params_M"] / unified["params_M"] - 1) < 0.05, "the equal-parameter pair drifted apart"
    write_result("encoder", rows, notes=(
        f"Forward only, batch {BATCH} items (text of {TEXT_TOKENS} tokens + one image), fp32 unless the row says "
        f"bf16 (torch.autocast, what `--precision bf16` runs; CPU bf16 native: {native_bf16(torch.device('cpu'))}), "
        f"{threads} torch threads, best of 3 rounds of {SECONDS / 3:.1f} s. Target: unified >= 0.9x the "
        "stitched encoder's items/s at equal parameters, i.e. `unified / this` >= 0.9 on that row."))
