"""The stitched twin: late fusion over the same frozen pretrained features as `PretrainedNativeEncoder`.

The fair rival of the native encoder (DESIGN.md section 2): the same frozen MiniLM and EfficientNet-Lite0
features, but a text tower (projector + `depth` blocks over text tokens only) and an image tower (projector
+ `depth` blocks over the grid tokens of all the item's images) that never see each other's tokens. The
pooled towers are concatenated (zeros for a missing modality) and mapped to `embed_dim` by the
`config.twin_head`: "linear" (the item vector is a text part plus an image part: additive late fusion) or
"mlp" (two layers, so it can still express conjunctions of the pooled parts). The towers' width is the
multiple of `heads` (at most `width`) that gives as many trainable parameters as the native encoder of the
same config (`twin_width`). Same `extract`/`fuse` split, so the same feature cache trains both.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from embed.backbones import IMAGE_DIM, TEXT_DIM
from embed.config import EncoderConfig
from embed.features import PretrainedFeatures
from embed.model import Block, _init_weights, _masked_mean, unit_output
from embed.pretrained import (
    FrozenBackbones,
    PretrainedHalves,
    PretrainedNativeEncoder,
    TokenProjector,
    grid_positions,
)
from embed.stitched import closest_width, count_parameters


class _Tower(nn.Module):
    """Frozen tokens of one modality -> projector + positions -> `depth` blocks -> final norm."""

    def __init__(self, dim: int, width: int, config: EncoderConfig) -> None:
        super().__init__()
        self.cls = config.pool == "cls"
        self.width = width
        self.proj = TokenProjector(dim, width)
        self.query = nn.Parameter(torch.zeros(1, 1, width))  # pool="cls": a learned first token
        self.embed_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, S, dim), positions broadcastable to (B, S, W), keep (B, S) -> states (B, S', W) and their
        keep-mask (B, S'); S' = 1 + S with pool="cls", the query first, kept where the item has the modality."""
        present = keep.any(1, keepdim=True)  # (B, 1)
        x = self.proj(tokens) + pos  # (B, S, W)
        if self.cls:
            x, keep = torch.cat([self.query.expand(len(x), 1, -1).to(x.dtype), x], 1), torch.cat([present, keep], 1)
        if x.shape[1] == 0:
            return x, keep
        x = self.embed_norm(x)
        attend = keep | ~keep.any(1, keepdim=True)  # a row with nothing real attends everywhere: no NaN
        for block in self.blocks:
            x = block(x, attend)
        return self.norm(x), keep

    def pool(self, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, S', W) -> (B, W): the query's state or the mean over real tokens; zero where the item lacks the
        modality (no real token)."""
        if states.shape[1] == 0:
            return states.new_zeros(states.shape[0], self.width)
        return states[:, 0] * keep[:, :1] if self.cls else _masked_mean(states, keep)


class StitchedTwinEncoder(PretrainedHalves):
    """Separate text and image towers over the frozen pretrained features; pooled, concatenated, head."""

    def __init__(self, config: EncoderConfig, width: int | None = None) -> None:
        """`width`: the towers' width; by default the one that matches the native encoder's trainable parameters."""
        super().__init__()
        if config.pool == "modality":
            raise ValueError("pool='modality' is not supported by stitched_twin; use 'mean' or 'cls'")
        self.config = config
        # depth 0 (no tower blocks) is a linear adapter over the pooled frozen features: nothing to match
        w = self.width = width or (config.width if config.depth == 0 else twin_width(config))
        self.text = _Tower(TEXT_DIM, w, config)
        self.image = _Tower(IMAGE_DIM, w, config)
        self.text_pos = nn.Parameter(torch.zeros(1, config.max_text_tokens + 2, w))  # [CLS] text [SEP]
        self.grid_pos = nn.Parameter(torch.zeros(1, w, config.feature_grid, config.feature_grid))
        self.image_index = nn.Embedding(config.max_images, w)
        self.head_hidden, self.head = _head(config, w)
        self.out_norm = nn.BatchNorm1d(config.embed_dim, affine=False)  # as UnifiedEncoder: no collapse
        self.apply(_init_weights)
        for p in (self.text_pos, self.grid_pos, self.text.query, self.image.query):
            nn.init.trunc_normal_(p, std=0.02)
        self.backbone = FrozenBackbones(config)  # after `apply`: its weights come from the pretrained files

    def fuse(self, features: PretrainedFeatures) -> torch.Tensor:
        """Unit item vectors (B, embed_dim): head(concat(pooled text tower, pooled image tower))."""
        states, keep = self.fused_states(features)
        pooled = self.pool(states, keep, features.text_mask.shape[1])
        return unit_output(self.head(self.head_hidden(pooled)), self.out_norm, self.training)

    def fused_states(self, f: PretrainedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tower states then image tower states, (B, S, W) with S = T + M*G (+2 with pool="cls")."""
        b, m = f.image_mask.shape
        g = f.grid_tokens
        text, text_keep = self.text(f.text_states, self.text_pos[:, : f.text_mask.shape[1]], f.text_mask)
        pos = grid_positions(self.grid_pos, g)[None] + self.image_index.weight[:m, None]  # (M, G, W)
        keep = f.image_mask[:, :, None].expand(b, m, g).reshape(b, m * g)
        image, image_keep = self.image(f.image_tokens.reshape(b, m * g, IMAGE_DIM),
                                       pos.reshape(1, m * g, self.width), keep)
        return torch.cat([text, image], dim=1), torch.cat([text_keep, image_keep], dim=1)

    def pool(self, states: torch.Tensor, keep: torch.Tensor, n_text: int | None = None) -> torch.Tensor:
        """(B, S, W) -> (B, 2W): each tower pooled on its own part, zeros where the item lacks the modality.

        `n_text`: T, the text token count of the batch (the split between the towers' states).
        """
        if n_text is None:
            raise ValueError("StitchedTwinEncoder.pool needs n_text (the text length T): its towers pool apart")
        t = n_text + int(self.config.pool == "cls")  # the text tower's query sits before its tokens
        return torch.cat([self.text.pool(states[:, :t], keep[:, :t]), self.image.pool(states[:, t:], keep[:, t:])],
                         dim=-1)


def _head(config: EncoderConfig, width: int) -> tuple[nn.Module, nn.Linear]:
    """(hidden part, final Linear) of the head over concat(text, image) (B, 2W)."""
    if config.twin_head == "mlp":  # non-additive: a hidden layer mixes the text and image parts
        return nn.Sequential(nn.Linear(2 * width, 2 * width), nn.GELU()), nn.Linear(2 * width, config.embed_dim)
    return nn.Identity(), nn.Linear(2 * width, config.embed_dim)  # additive: W_text @ text + W_image @ image


def trainable_parameters(module: nn.Module) -> int:
    """Parameters outside the frozen backbones (MiniLM counted too when it is unfrozen)."""
    return sum(p.numel() for name, p in module.named_parameters()
               if not name.startswith("backbone.") or p.requires_grad)


@functools.lru_cache(maxsize=64)
def twin_width(config: EncoderConfig) -> int:
    """The tower width (a multiple of `heads`, at most `width`) whose twin has the trainable parameter count
    closest to the native encoder's of the same config. Counted on the meta device: no memory, no time."""
    native = dataclasses.replace(config, architecture="native_pretrained", moe_experts=0, unfreeze_text=False)
    with torch.device("meta"):
        target = trainable_parameters(PretrainedNativeEncoder(native))
        return closest_width(config, target, lambda width: _twin_count(config, width))


def _twin_count(config: EncoderConfig, width: int) -> int:
    towers = count_parameters(_Tower(TEXT_DIM, width, config)) + count_parameters(_Tower(IMAGE_DIM, width, config))
    positions = (config.max_text_tokens + 2 + config.feature_grid ** 2 + config.max_images) * width
    hidden, head = _head(config, width)
    return towers + positions + count_parameters(hidden) + count_parameters(head)
