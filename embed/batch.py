"""Turn tokenised text and decoded images into the padded `EncoderInput` the model reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embed.config import EncoderConfig
from embed.images import patchify, to_tensor
from embed.model import EncoderInput
from embed.tokens import TextTokenizer


def collate(token_lists: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]],
            config: EncoderConfig) -> EncoderInput:
    """Pad a batch.

    Args:
        token_lists: per item, token ids without special tokens (empty: no text).
        images: per item, decoded uint8 (H, W, 3) arrays at `config.image_size` (empty: no image);
            only the first `config.max_images` are used.
    """
    b = len(token_lists)
    if len(images) != b:
        raise ValueError(f"got {b} token lists but {len(images)} image lists")
    t = max([len(ids) + 2 if ids else 1 for ids in token_lists] + [1])
    token_ids = torch.zeros(b, t, dtype=torch.long)
    for i, ids in enumerate(token_lists):
        row = [TextTokenizer.cls_id, *ids, TextTokenizer.sep_id] if ids else [TextTokenizer.cls_id]
        token_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    m = max([min(len(imgs), config.max_images) for imgs in images] + [0])
    patches = torch.zeros(b, m, config.grid * config.grid, config.patch_dim)
    image_mask = torch.zeros(b, m, dtype=torch.bool)
    flat = [(i, j, px) for i, imgs in enumerate(images) for j, px in enumerate(imgs[: config.max_images])]
    if flat:
        stacked = to_tensor(np.stack([px for _, _, px in flat]))  # (K, 3, H, W)
        tiles = patchify(stacked, config.patch_size)  # (K, N, 3*P*P)
        rows = torch.tensor([i for i, _, _ in flat])
        cols = torch.tensor([j for _, j, _ in flat])
        patches[rows, cols] = tiles
        image_mask[rows, cols] = True
    return EncoderInput(token_ids=token_ids, text_mask=token_ids != 0, patches=patches, image_mask=image_mask)
