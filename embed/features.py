"""`PretrainedFeatures`: the frozen backbones' outputs for a batch, split per item for a cache and collated back.

The pretrained encoders run in two halves: `extract` (frozen MiniLM + EfficientNet-Lite0, the costly part)
and `fuse` (the trainable part). Training computes `extract` once per catalog item and keeps the per-item
features; `split` trims them to the item's real tokens and images (stored in float16 by default: 2 bytes
a value, so an item with 30 text tokens and one 160 px image holds 30x384 + 25x1280 values, ~87 KB) and
`collate` pads a list of them into a batch again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PretrainedFeatures:
    """Frozen-backbone features of a batch (or, from `split`, of one item with B = 1 and no padding)."""

    text_states: torch.Tensor  # (B, T, 384) MiniLM's last-layer states of [CLS] text [SEP]
    text_mask: torch.Tensor  # (B, T) bool, True = real token; all False for an item without text
    image_tokens: torch.Tensor  # (B, M, G, 1280) Lite0's final grid, G = (image_size / 32)^2 row-major
    image_mask: torch.Tensor  # (B, M) bool, True = image present

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PretrainedFeatures:
        """On `device`; the float tensors also cast to `dtype` when given (masks stay bool)."""
        return PretrainedFeatures(self.text_states.to(device, dtype, non_blocking=True),
                                  self.text_mask.to(device, non_blocking=True),
                                  self.image_tokens.to(device, dtype, non_blocking=True),
                                  self.image_mask.to(device, non_blocking=True))

    def __len__(self) -> int:
        return int(self.text_mask.shape[0])

    @property
    def grid_tokens(self) -> int:
        """G: feature-grid positions per image."""
        return int(self.image_tokens.shape[2])

    def split(self, dtype: torch.dtype = torch.float16) -> list[PretrainedFeatures]:
        """One `PretrainedFeatures` per item, on the CPU in `dtype`, holding only its real tokens and images:
        text (1, T_i, 384) with T_i = 0 for no text, images (1, M_i, G, 1280) with M_i = 0 for none.

        Real positions must be leading (collate pads at the end), so trimming keeps every real one.
        """
        out = []
        cpu = self.to("cpu", dtype)
        for i in range(len(self)):
            t, m = int(cpu.text_mask[i].sum()), int(cpu.image_mask[i].sum())
            if not (bool(cpu.text_mask[i, :t].all()) and bool(cpu.image_mask[i, :m].all())):
                raise ValueError(f"item {i}: real text tokens and images must come before the padding")
            out.append(PretrainedFeatures(cpu.text_states[i: i + 1, :t].clone(),
                                          cpu.text_mask[i: i + 1, :t].clone(),
                                          cpu.image_tokens[i: i + 1, :m].clone(),
                                          cpu.image_mask[i: i + 1, :m].clone()))
        return out

    @staticmethod
    def collate(items: Sequence[PretrainedFeatures], dtype: torch.dtype = torch.float32) -> PretrainedFeatures:
        """Pad per-item (or per-batch) features into one batch in `dtype`: text to the longest T, images to
        the most M; padding is masked out. Every part must share G and the feature widths."""
        if not items:
            raise ValueError("collate needs at least one PretrainedFeatures")
        b = sum(len(f) for f in items)
        t = max(f.text_states.shape[1] for f in items)
        m = max(f.image_tokens.shape[1] for f in items)
        first = items[0]
        _, _, g, c = first.image_tokens.shape
        if any(f.image_tokens.shape[2:] != (g, c) or f.text_states.shape[2] != first.text_states.shape[2]
               for f in items):
            raise ValueError(f"features disagree on grid or widths: first has G={g}, C={c}; "
                             f"got {[tuple(f.image_tokens.shape[2:]) for f in items]}")
        text = first.text_states.new_zeros(b, t, first.text_states.shape[2], dtype=dtype)
        text_mask = torch.zeros(b, t, dtype=torch.bool, device=first.text_mask.device)
        image = first.image_tokens.new_zeros(b, m, g, c, dtype=dtype)
        image_mask = torch.zeros(b, m, dtype=torch.bool, device=first.image_mask.device)
        row = 0
        for f in items:
            n, ti, mi = len(f), f.text_states.shape[1], f.image_tokens.shape[1]
            text[row: row + n, :ti] = f.text_states
            text_mask[row: row + n, :ti] = f.text_mask
            image[row: row + n, :mi] = f.image_tokens
            image_mask[row: row + n, :mi] = f.image_mask
            row += n
        return PretrainedFeatures(text, text_mask, image, image_mask)
