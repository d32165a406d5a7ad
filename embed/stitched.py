"""The stitched (late-fusion) baseline: a text transformer and an image transformer, pooled outputs combined.

The comparison the product has to win (DESIGN.md section 3): the two towers never see each other's
tokens; each is mean- (or [CLS]-) pooled, the pooled vectors are concatenated and linearly projected,
so the item vector is a sum of a text part and an image part (a missing modality contributes zero).
Each tower has `config.depth` blocks; their width is chosen so that the whole model has as many
parameters as the `UnifiedEncoder` of the same config (`tower_width`). It reads the same
`EncoderInput` and returns the same unit vectors, so training stages, `ItemEncoder`, saving and
loading treat it like the unified encoder.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn

from embed.config import EncoderConfig
from embed.model import Block, EncoderInput, UnifiedEncoder, _init_weights, _masked_mean, unit_output


class _TextTower(nn.Module):
    """Token embeddings + 1D positions -> `depth` blocks -> final norm."""

    def __init__(self, config: EncoderConfig, width: int) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(config.vocab_size, width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, config.max_text_tokens + 2, width))  # [CLS] text [SEP]
        self.embed_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, token_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.token_embed(token_ids) + self.pos[:, : token_ids.shape[1]])  # (B, T, W)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)


class _ImageTower(nn.Module):
    """ViLT-style linear patch embeddings + 2D positions + image index -> `depth` blocks -> final norm."""

    def __init__(self, config: EncoderConfig, width: int) -> None:
        super().__init__()
        self.patch_proj = nn.Linear(config.patch_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, config.grid * config.grid, width))
        self.image_index = nn.Embedding(config.max_images, width)
        self.embed_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, m, n, _ = patches.shape
        x = self.patch_proj(patches) + self.pos[:, None, :n] + self.image_index.weight[:m][None, :, None, :]
        x = self.embed_norm(x.reshape(b, m * n, -1))  # (B, M*N, W)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)


class StitchedEncoder(nn.Module):
    """Separate text and image transformers; pooled outputs concatenated and projected (late fusion)."""

    def __init__(self, config: EncoderConfig, width: int | None = None) -> None:
        """`width`: the towers' width; by default the one that matches the unified encoder's parameters."""
        super().__init__()
        if config.moe_experts > 0:
            raise ValueError(f"moe_experts={config.moe_experts}: the stitched baseline has dense FFNs only; use 0")
        self.config = config
        self.width = width or tower_width(config)
        self.text = _TextTower(config, self.width)
        self.image = _ImageTower(config, self.width)
        self.head = nn.Linear(2 * self.width, config.embed_dim)  # concat(text, image) -> embed_dim
        self.out_norm = nn.BatchNorm1d(config.embed_dim, affine=False)  # as UnifiedEncoder: no collapse
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.text.pos, std=0.02)
        nn.init.trunc_normal_(self.image.pos, std=0.02)

    def hidden_states(self, batch: EncoderInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' final states side by side, (B, S, W) with S = T + M*N, and the keep-mask (B, S)."""
        b, m, n = batch.patches.shape[:3]
        text = self.text(batch.token_ids, batch.text_mask)
        if m == 0:
            return text, batch.text_mask
        patch_keep = batch.image_mask[:, :, None].expand(b, m, n).reshape(b, m * n)
        image = self.image(batch.patches, patch_keep)
        return torch.cat([text, image], dim=1), torch.cat([batch.text_mask, patch_keep], dim=1)

    def pool(self, states: torch.Tensor, keep: torch.Tensor, n_text: int | None = None) -> torch.Tensor:
        """(B, S, W) -> (B, 2W): each tower pooled on its own part, zero where the item lacks the modality."""
        if n_text is None:
            raise ValueError("StitchedEncoder.pool needs n_text (the text length T): its towers pool separately")
        t = n_text
        text, image = self._pool_one(states[:, :t], keep[:, :t]), self._pool_one(states[:, t:], keep[:, t:])
        has_text = keep[:, :t].sum(1) > 1  # more than [CLS]: the item has text
        return torch.cat([text * has_text[:, None], image], dim=-1)

    def _pool_one(self, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if states.shape[1] == 0:
            return states.new_zeros(states.shape[0], self.width)
        if self.config.pool == "cls":
            return states[:, 0] * keep[:, :1]
        return _masked_mean(states, keep)

    def forward(self, batch: EncoderInput) -> torch.Tensor:
        """Unit item vectors (B, embed_dim): head(concat(pooled text, pooled image))."""
        states, keep = self.hidden_states(batch)
        return unit_output(self.head(self.pool(states, keep, batch.token_ids.shape[1])), self.out_norm, self.training)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=64)
def tower_width(config: EncoderConfig) -> int:
    """The tower width (a multiple of `heads`, at most `width`) whose stitched model's parameter count is
    closest to the unified encoder's of the same config. Counted on the meta device: no memory, no time."""
    with torch.device("meta"):
        target = count_parameters(UnifiedEncoder(dataclasses.replace(config, moe_experts=0)))
        return closest_width(config, target, lambda width: _stitched_count(config, width))


def closest_width(config: EncoderConfig, target: int, count: Callable[[int], int]) -> int:
    """The multiple of `config.heads` up to `config.width` whose `count(width)` is closest to `target`
    (the smallest such width on a tie)."""
    return min(range(config.heads, config.width + 1, config.heads), key=lambda width: abs(count(width) - target))


def _stitched_count(config: EncoderConfig, width: int) -> int:
    towers = count_parameters(_TextTower(config, width)) + count_parameters(_ImageTower(config, width))
    return towers + 2 * width * config.embed_dim + config.embed_dim  # + the head
