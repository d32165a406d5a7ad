"""Encoder configuration: one frozen dataclass, sizes by name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


def known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """`data` if every key is a field of the dataclass `cls`; else ValueError naming the unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known: {sorted(known)}")
    return data


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the unified encoder; saved as `config.json` beside the weights."""

    image_size: int = 64  # images are resized (and centre-cropped) to this square side
    patch_size: int = 16  # ViLT-style: each patch is linearly projected to `width`
    max_images: int = 2  # per item; each image's patches get an image-index embedding
    vocab_size: int = 4096  # target size for the trained subword tokenizer
    max_text_tokens: int = 48  # text tokens kept after [CLS] (truncated beyond)
    width: int = 128  # D: shared width of word and patch embeddings
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_dim: int = 128  # length of the vector stored in FAISS
    # "mean" over real tokens and patches (trains far faster from scratch), "cls", or "modality": the text
    # mean and the patch mean concatenated (2*width into the head), so text length cannot drown the image
    pool: str = "mean"
    # "unified": one early-fusion transformer (embed/model.py); "stitched": the late-fusion baseline of
    # separate text and image towers with the same parameter budget (embed/stitched.py)
    architecture: str = "unified"
    # Modality-aware mixture of experts (embed/moe.py): 0 = dense FFN; E > 0 routed experts per MoE block.
    moe_experts: int = 0
    moe_shared_experts: int = 1  # always-on experts beside the routed ones (0 for none)
    moe_top_k: int = 1  # routed experts per token
    moe_every: int = 1  # MoE FFN in every n-th block (2: every other block, GShard-style), dense elsewhere
    # "learned": one modality-aware router over all experts; "grouped": text and image tokens each routed
    # within their own half of the experts (MoMa)
    moe_routing: str = "learned"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        for name in ("image_size", "patch_size", "max_images", "vocab_size", "max_text_tokens", "width",
                     "depth", "heads", "embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.pool not in ("mean", "cls", "modality"):
            raise ValueError(f"pool={self.pool!r} must be 'mean', 'cls' or 'modality'")
        if self.architecture not in ("unified", "stitched"):
            raise ValueError(f"architecture={self.architecture!r} must be 'unified' or 'stitched'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.moe_shared_experts < 0 or self.moe_every <= 0:
            raise ValueError(f"moe_shared_experts={self.moe_shared_experts} must be >= 0 and "
                             f"moe_every={self.moe_every} positive")
        if self.moe_routing not in ("learned", "grouped"):
            raise ValueError(f"moe_routing={self.moe_routing!r} must be 'learned' or 'grouped'")
        if self.moe_routing == "grouped" and self.moe_experts % 2:
            raise ValueError(f"moe_experts={self.moe_experts} must be even with moe_routing='grouped'")
        group = self.moe_experts // 2 if self.moe_routing == "grouped" else self.moe_experts
        if self.moe_experts and not 1 <= self.moe_top_k <= group:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in [1, {group}] "
                             f"(moe_experts={self.moe_experts}, moe_routing={self.moe_routing!r})")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise ValueError(
                f"moe_top_k={self.moe_top_k} must be in [1, moe_experts={self.moe_experts}] when experts are on")

    def uses_moe(self, block: int) -> bool:
        """Whether block `block` (0-based) has the mixture-of-experts FFN."""
        return self.moe_experts > 0 and (block + 1) % self.moe_every == 0

    @property
    def grid(self) -> int:
        """Patches per side of one image."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Values in one RGB patch."""
        return 3 * self.patch_size * self.patch_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """Build from a dict, refusing keys this version does not know (a typo is not a default)."""
        return cls(**known_fields(cls, data, "encoder config"))

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        return cls.from_dict(json.loads(text))


# Sizes by name. `tiny` trains in seconds on a laptop CPU; `base` is ViLT-B scale for GPUs.
PRESETS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(image_size=32, patch_size=8, width=64, depth=2, heads=4, embed_dim=64,
                          vocab_size=2048, max_text_tokens=32),
    "demo": EncoderConfig(),
    "small": EncoderConfig(image_size=96, patch_size=16, width=256, depth=6, heads=8, embed_dim=256,
                           vocab_size=8192, max_text_tokens=64, max_images=4),
    "base": EncoderConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12, embed_dim=256,
                          vocab_size=30522, max_text_tokens=64, max_images=4),
}


def preset(name: str, **overrides: Any) -> EncoderConfig:
    """The named size, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder size {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
