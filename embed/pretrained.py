"""The pretrained native encoder: frozen MiniLM and EfficientNet-Lite0 tokens in one trainable transformer.

The recipe of Llama 4 and MM-1 (a pretrained vision encoder's tokens and text tokens in one backbone) and
ItemSage (pretrained features fused by one transformer), at CPU scale: MiniLM's per-token states (384)
and Lite0's final feature grid (1280 per position, 5x5 at 160 px) are each projected to the trunk width,
tagged with modality-type, 1D text / 2D grid positions and an image-index embedding, and read together
by a few pre-norm `Block`s (dense or `ModalityMoE`). A missing modality is absent (masked). Pooled ->
head -> `unit_output`. `forward(batch) == fuse(extract(batch))`: training caches `extract`'s output.
"""

from __future__ import annotations

import torch
from torch import nn

from embed.backbones import IMAGE_DIM, TEXT_DIM, EfficientNetLite0, MiniLM
from embed.config import EncoderConfig
from embed.features import PretrainedFeatures
from embed.model import IMAGE, TEXT, Block, EncoderInput, _init_weights, _masked_mean, _moe, unit_output


class FrozenBackbones(nn.Module):
    """MiniLM and EfficientNet-Lite0, always in eval mode (Lite0's BatchNorm keeps its ImageNet statistics).

    Their parameters do not require grad, except MiniLM's with `config.unfreeze_text` (fine-tuning on a GPU;
    without the checkpoint's 0.1 dropout, which this MiniLM does not apply).
    The skeleton's weights are random until `load_state_dict` (a saved encoder) or
    `embed.backbones.load_pretrained_weights` (a fresh one, `embed.build.build_pretrained`) fills them.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.text = MiniLM()
        self.image = EfficientNetLite0()
        self.text.requires_grad_(config.unfreeze_text)
        self.image.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBackbones:
        """Stays in eval mode whatever `mode` (`model.train()` must not start updating BatchNorm statistics)."""
        return super().train(False)

    def forward(self, batch: EncoderInput) -> PretrainedFeatures:
        """Features of a collated batch (whole images: patch_size == image_size, so N = 1)."""
        has_text = batch.text_mask.sum(1) > 1  # more than [CLS]: the item has text
        with torch.set_grad_enabled(self.config.unfreeze_text and torch.is_grad_enabled()):
            states = self.text(batch.token_ids, batch.text_mask)  # (B, T, 384)
        text_mask = batch.text_mask & has_text[:, None]
        b, m = batch.image_mask.shape
        g, s = self.config.feature_grid, self.config.image_size
        tokens = states.new_zeros(b, m, g * g, IMAGE_DIM)
        if bool(batch.image_mask.any()):
            pixels = batch.patches[batch.image_mask].reshape(-1, 3, s, s)  # (K, 3, S, S): real images only
            with torch.no_grad():
                grid = self.image(pixels)  # (K, 1280, g, g)
            tokens[batch.image_mask] = grid.flatten(2).transpose(1, 2).to(tokens.dtype)  # (K, G, 1280)
        return PretrainedFeatures(states, text_mask, tokens, batch.image_mask)


class TokenProjector(nn.Module):
    """Pretrained features -> trunk width: LayerNorm (Lite0's ReLU6 outputs are not centred) then Linear."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x.to(self.proj.weight.dtype)))  # cached features may be float16


def grid_positions(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1, D, g, g) learned 2D positions -> (G, D), checking that the features have G = g*g grid tokens."""
    side = pos.shape[-1]
    if tokens != side * side:
        raise ValueError(f"features have {tokens} grid tokens per image; the model was built for a {side}x{side} "
                         "grid (extract them at the config's image_size)")
    return pos.flatten(2).transpose(1, 2)[0]


class PretrainedHalves(nn.Module):
    """The split every pretrained architecture shares: `extract` (the frozen backbones, cached by training)
    then `fuse` (the trainable part); `forward` and `hidden_states` run both halves."""

    backbone: FrozenBackbones

    def extract(self, batch: EncoderInput) -> PretrainedFeatures:
        """The frozen backbones' features (the part training caches per item)."""
        return self.backbone(batch)

    def fuse(self, features: PretrainedFeatures) -> torch.Tensor:
        raise NotImplementedError

    def fused_states(self, features: PretrainedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: EncoderInput) -> torch.Tensor:
        return self.fuse(self.extract(batch))

    def hidden_states(self, batch: EncoderInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable part's final states (B, S, D) and keep-mask (B, S) for a collated batch."""
        return self.fused_states(self.extract(batch))


class PretrainedNativeEncoder(PretrainedHalves):
    """Frozen pretrained tokens of both modalities, one trainable fusion transformer over all of them."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        d, g = config.width, config.feature_grid
        self.text_proj = TokenProjector(TEXT_DIM, d)
        self.image_proj = TokenProjector(IMAGE_DIM, d)
        self.text_pos = nn.Parameter(torch.zeros(1, config.max_text_tokens + 2, d))  # [CLS] text [SEP]
        self.grid_pos = nn.Parameter(torch.zeros(1, d, g, g))
        self.image_index = nn.Embedding(config.max_images, d)
        self.type_embed = nn.Embedding(2, d)
        self.query = nn.Parameter(torch.zeros(1, 1, d))  # pool="cls": a learned first token, always kept
        self.embed_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio, config.dropout, _moe(config, i)) for i in range(config.depth))
        self.norm = nn.LayerNorm(d)
        # pool="modality": the text positions' mean and the grid positions' mean side by side (zero for a
        # missing modality), after attending across both, so neither modality's token count drowns the other
        self.head = nn.Linear(2 * d if config.pool == "modality" else d, config.embed_dim)
        self.out_norm = nn.BatchNorm1d(config.embed_dim, affine=False)  # as UnifiedEncoder: no collapse
        # adapter_path: the adapter baseline's linear map of the pooled frozen features, beside the fusion
        self.adapter = (nn.ModuleList([TokenProjector(TEXT_DIM, config.embed_dim),
                                       TokenProjector(IMAGE_DIM, config.embed_dim)]) if config.adapter_path else None)
        self.apply(_init_weights)
        if self.adapter is not None:  # start as the adapter: the fusion's contribution grows from zero
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        for p in (self.text_pos, self.grid_pos, self.query):
            nn.init.trunc_normal_(p, std=0.02)
        self.backbone = FrozenBackbones(config)  # after `apply`: its weights come from the pretrained files

    def fuse(self, features: PretrainedFeatures) -> torch.Tensor:
        """Unit item vectors (B, embed_dim) from the features: the trainable part."""
        states, keep = self.fused_states(features)
        out = self.head(self.pool(states, keep, features.text_mask.shape[1]))  # (B, embed_dim)
        if self.adapter is not None:
            text = _masked_mean(self.adapter[0](features.text_states), features.text_mask)
            grid = features.image_mask[:, :, None].expand(-1, -1, features.grid_tokens).flatten(1)
            image = _masked_mean(self.adapter[1](features.image_tokens.flatten(1, 2)), grid)
            out = out + text + image  # zero for a missing modality, as the adapter's concat
        return unit_output(out, self.out_norm, self.training)

    def fused_states(self, features: PretrainedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The fusion transformer's final normalised states (B, S, D) and keep-mask (B, S)."""
        x, keep, modality = self.sequence(features)
        attend = keep | ~keep.any(1, keepdim=True)  # a row with nothing real attends everywhere: no NaN
        for block in self.blocks:
            x = block(x, attend, modality)
        return self.norm(x), keep

    def pool(self, states: torch.Tensor, keep: torch.Tensor, n_text: int | None = None) -> torch.Tensor:
        """(B, S, D) -> (B, D): the learned query's state ("cls") or the mean over real tokens; with
        pool="modality" (B, 2D): the mean over the first `n_text` (text) positions next to the mean over the
        rest (the grid tokens), each zero where the item lacks that modality."""
        if self.config.pool == "cls":
            return states[:, 0]
        if self.config.pool == "modality":
            if n_text is None:
                raise ValueError("pool='modality' needs n_text, the number of text positions")
            text, grid = (states[:, :n_text], keep[:, :n_text]), (states[:, n_text:], keep[:, n_text:])
            return torch.cat([_masked_mean(*text), _masked_mean(*grid)], dim=-1)  # (B, 2D)
        return _masked_mean(states, keep)

    def sequence(self, f: PretrainedFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Joint input (B, S, D), keep-mask (B, S) and modality ids (B, S); S = [1 query +] T + M*G."""
        b, t = f.text_mask.shape
        m, g = f.image_tokens.shape[1], f.grid_tokens
        text = self.text_proj(f.text_states) + self.text_pos[:, :t] + self.type_embed.weight[TEXT]  # (B, T, D)
        image = self.image_proj(f.image_tokens) + grid_positions(self.grid_pos, g)  # (B, M, G, D)
        image = image + self.image_index.weight[:m][None, :, None] + self.type_embed.weight[IMAGE]
        parts = [text, image.reshape(b, m * g, image.shape[-1])]
        keep = [f.text_mask, f.image_mask[:, :, None].expand(b, m, g).reshape(b, m * g)]
        kinds = [torch.full((t,), TEXT), torch.full((m * g,), IMAGE)]
        if self.config.pool == "cls":
            parts.insert(0, self.query.expand(b, 1, -1).to(text.dtype))
            keep.insert(0, torch.ones(b, 1, dtype=torch.bool, device=text.device))
            kinds.insert(0, torch.full((1,), TEXT))  # routed as text by a MoE FFN
        modality = torch.cat(kinds).to(text.device).expand(b, -1)
        return self.embed_norm(torch.cat(parts, dim=1)), torch.cat(keep, dim=1), modality
