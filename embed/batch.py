"""Turn tokenised text and decoded images into the padded `EncoderInput` the model reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embed.backbones import MINILM_CLS_ID, MINILM_SEP_ID
from embed.config import EncoderConfig
from embed.images import patchify, to_tensor
from embed.model import EncoderInput
from embed.tokens import TextTokenizer


def text_markers(config: EncoderConfig) -> tuple[int, int]:
    """The [CLS] and [SEP] ids of the vocabulary `config.architecture` embeds: MiniLM's WordPiece for the
    pretrained architectures, else the catalog-trained BPE's (`TextTokenizer.train`)."""
    if config.pretrained:
        return MINILM_CLS_ID, MINILM_SEP_ID
    return TextTokenizer.cls_id, TextTokenizer.sep_id


def collate(token_lists: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]],
            config: EncoderConfig) -> EncoderInput:
    """Pad a batch.

    Args:
        token_lists: per item, token ids without special tokens (empty: no text).
        images: per item, decoded uint8 (H, W, 3) arrays at `config.image_size` (empty: no image);
            only the first `config.max_images` are used.

    Text rows are `[CLS] ids [SEP]` (`text_markers`), or `[CLS]` alone for an item without text. Images
    are cut into `config.patch_size` patches; the pretrained architectures set patch_size = image_size,
    so each image is one "patch" holding its whole (3, H, W) pixels, flattened channel-first.
    """
    b = len(token_lists)
    if len(images) != b:
        raise ValueError(f"got {b} token lists but {len(images)} image lists")
    cls_id, sep_id = text_markers(config)
    t = max([len(ids) + 2 if ids else 1 for ids in token_lists] + [1])
    token_ids = torch.zeros(b, t, dtype=torch.long)
    for i, ids in enumerate(token_lists):
        row = [cls_id, *ids, sep_id] if ids else [cls_id]
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
