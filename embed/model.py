"""The unified (early-fusion) encoder: one transformer over `[CLS] text [SEP] image patches`.

Text tokens and ViLT-style linearly projected image patches share one width and one sequence;
modality-type embeddings, 1D text positions and 2D patch positions tell them apart. A missing
modality is simply absent (masked out). The pooled sequence (mean, [CLS], or per-modality means) is
projected and L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embed.config import EncoderConfig
from embed.moe import ModalityMoE

TEXT, IMAGE = 0, 1  # modality-type ids


@dataclass
class EncoderInput:
    """A padded batch. Text rows start with [CLS]; images may be absent per item."""

    token_ids: torch.Tensor  # (B, T) int64, [CLS] first, 0 = [PAD]
    text_mask: torch.Tensor  # (B, T) bool, True = real token
    patches: torch.Tensor  # (B, M, N, 3*P*P) float, M images per item at most
    image_mask: torch.Tensor  # (B, M) bool, True = image present

    def to(self, device: torch.device | str) -> EncoderInput:
        return EncoderInput(*(t.to(device, non_blocking=True) for t in
                              (self.token_ids, self.text_mask, self.patches, self.image_mask)))

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


class Block(nn.Module):
    """Pre-norm transformer block on scaled_dot_product_attention with a key padding mask.

    The FFN is dense, or a `ModalityMoE` when `moe` is given; the MoE FFN needs each position's
    modality id in `forward` (positions without one are routed as text).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float,
                 moe: ModalityMoE | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp: nn.Module = moe if moe is not None else nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, keep: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, Dh)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, S): True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        if isinstance(self.mlp, ModalityMoE):
            kinds = modality if modality is not None else torch.zeros_like(keep, dtype=torch.long)
            return x + self.mlp(self.norm2(x), keep, kinds)
        return x + self.mlp(self.norm2(x))


class UnifiedEncoder(nn.Module):
    """One transformer that reads text tokens and image patches in one sequence."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.token_embed = nn.Embedding(config.vocab_size, d, padding_idx=0)
        self.text_pos = nn.Parameter(torch.zeros(1, config.max_text_tokens + 2, d))  # [CLS] text [SEP]
        self.patch_proj = nn.Linear(config.patch_dim, d)
        self.patch_pos = nn.Parameter(torch.zeros(1, d, config.grid, config.grid))  # 2D grid
        self.image_index = nn.Embedding(config.max_images, d)
        self.type_embed = nn.Embedding(2, d)
        # BERT/ViLT-style LayerNorm over the summed input embeddings: it puts the sequence at unit scale,
        # so early optimiser steps on biases cannot drown the content and collapse every item to one vector.
        self.embed_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio, config.dropout, _moe(config, i)) for i in range(config.depth))
        self.norm = nn.LayerNorm(d)
        # "modality" pooling feeds concat(text mean, image mean): (2D) -> embed_dim, as stitched's head
        self.head = nn.Linear(2 * d if config.pool == "modality" else d, config.embed_dim)
        # Centre and scale each output dimension over the batch before L2 normalisation (running
        # statistics at inference, so it is a fixed affine map there). Without it, in-batch softmax
        # from scratch collapses every item onto one direction within a few dozen steps.
        self.out_norm = nn.BatchNorm1d(config.embed_dim, affine=False)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.text_pos, std=0.02)
        nn.init.trunc_normal_(self.patch_pos, std=0.02)

    def embed_sequence(self, batch: EncoderInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint input sequence and its keep-mask: (B, S, D) and (B, S) with S = T + M*N."""
        b, t = batch.token_ids.shape
        text = self.token_embed(batch.token_ids) + self.text_pos[:, :t] + self.type_embed.weight[TEXT]
        m, n = batch.patches.shape[1], batch.patches.shape[2]
        if m == 0:
            return self.embed_norm(text), batch.text_mask
        patches = self.patch_proj(batch.patches)  # (B, M, N, D)
        patches = patches + self._patch_positions(n)[None, None] + self.type_embed.weight[IMAGE]
        patches = patches + self.image_index.weight[:m][None, :, None, :]
        patch_keep = batch.image_mask[:, :, None].expand(b, m, n).reshape(b, m * n)
        x = torch.cat([text, patches.reshape(b, m * n, -1)], dim=1)  # (B, S, D)
        return self.embed_norm(x), torch.cat([batch.text_mask, patch_keep], dim=1)

    def _patch_positions(self, n: int) -> torch.Tensor:
        """(N, D) 2D positions, interpolated when the grid differs from the trained one."""
        pos: torch.Tensor = self.patch_pos
        side = round(n ** 0.5)
        if side != pos.shape[-1]:
            pos = F.interpolate(pos, size=(side, side), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)[0]

    def hidden_states(self, batch: EncoderInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normalised states (B, S, D) and the keep-mask (B, S)."""
        x, keep = self.embed_sequence(batch)
        t = batch.token_ids.shape[1]
        modality = (torch.arange(x.shape[1], device=x.device) >= t).long().expand_as(keep)  # (B, S): TEXT, IMAGE
        for block in self.blocks:
            x = block(x, keep, modality)
        return self.norm(x), keep

    def pool(self, states: torch.Tensor, keep: torch.Tensor, n_text: int | None = None) -> torch.Tensor:
        """(B, S, D) -> (B, D): the [CLS] state or the mean over real tokens and patches; (B, 2D) for "modality".

        "modality": the mean over the real text positions (the first `n_text`) and the mean over the real
        patches, concatenated, zero where the item lacks the modality (as the stitched model pools), so the
        image keeps its own half however many tokens the text has. Attention still mixes both in every block.
        """
        if self.config.pool == "cls":
            return states[:, 0]
        if self.config.pool != "modality":
            return _masked_mean(states, keep)
        if n_text is None:
            raise ValueError("pool='modality' needs n_text (the text length T) to split text from patches")
        t = n_text
        has_text = keep[:, :t].sum(1) > 1  # more than [CLS]: the item has text
        text = _masked_mean(states[:, :t], keep[:, :t]) * has_text[:, None]
        return torch.cat([text, _masked_mean(states[:, t:], keep[:, t:])], dim=-1)  # (B, 2D)

    def forward(self, batch: EncoderInput) -> torch.Tensor:
        """Unit item vectors (B, embed_dim) from the pooled sequence."""
        states, keep = self.hidden_states(batch)
        return unit_output(self.head(self.pool(states, keep, batch.token_ids.shape[1])), self.out_norm, self.training)


def _masked_mean(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, S, D) -> (B, D): mean over the kept positions; zero for a row with none (or S = 0)."""
    w = keep.unsqueeze(-1).to(states.dtype)  # (B, S, 1)
    return (states * w).sum(1) / w.sum(1).clamp_min(1.0)


def _moe(config: EncoderConfig, block: int) -> ModalityMoE | None:
    if not config.uses_moe(block):
        return None
    return ModalityMoE(config.width, int(config.width * config.mlp_ratio), config.moe_experts,
                       config.moe_shared_experts, config.moe_top_k, config.dropout,
                       grouped=config.moe_routing == "grouped")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def unit_output(h: torch.Tensor, out_norm: nn.BatchNorm1d, training: bool) -> torch.Tensor:
    """Projected pooled states -> unit vectors: the non-affine BatchNorm (its running statistics alone for a
    training batch of one, which batch statistics cannot normalise) then L2. Shared by every encoder."""
    h = h.float()
    if training and h.shape[0] == 1:
        h = F.batch_norm(h, out_norm.running_mean, out_norm.running_var, training=False)
    else:
        h = out_norm(h)
    return F.normalize(h, dim=-1)
