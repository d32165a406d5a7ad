"""Encoder configuration: one frozen dataclass, sizes by name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("unified", "stitched", "native_pretrained", "stitched_twin")
PRETRAINED = ("native_pretrained", "stitched_twin")  # over frozen MiniLM + EfficientNet-Lite0 features
LATER_DEFAULTS: dict[str, Any] = {"twin_head": "linear", "unfreeze_text": False, "adapter_path": False}  # see `to_json`
# What the frozen parts fix (embed/backbones.py); here so that this module stays free of torch.
MINILM_VOCAB, MINILM_POSITIONS = 30522, 512
IMAGE_STRIDE = 32  # EfficientNet-Lite0's total downsampling: its feature grid is image_size / 32 per side


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
    # separate text and image towers with the same parameter budget (embed/stitched.py);
    # "native_pretrained": frozen MiniLM token states and EfficientNet-Lite0 grid tokens, projected into one
    # trainable fusion transformer (embed/pretrained.py); "stitched_twin": its late-fusion rival over the
    # same frozen features (embed/twin.py). Both pretrained ones read whole images: patch_size == image_size.
    architecture: str = "unified"
    # Modality-aware mixture of experts (embed/moe.py): 0 = dense FFN; E > 0 routed experts per MoE block.
    moe_experts: int = 0
    moe_shared_experts: int = 1  # always-on experts beside the routed ones (0 for none)
    moe_top_k: int = 1  # routed experts per token
    moe_every: int = 1  # MoE FFN in every n-th block (2: every other block, GShard-style), dense elsewhere
    # "learned": one modality-aware router over all experts; "grouped": text and image tokens each routed
    # within their own half of the experts (MoMa)
    moe_routing: str = "learned"
    # stitched_twin's head over concat(text, image): "linear" (additive late fusion) or "mlp" (two layers:
    # late fusion that can still express conjunctions of the pooled parts)
    twin_head: str = "linear"
    # pretrained architectures: train MiniLM's layers too (on a GPU); False keeps both backbones frozen
    unfreeze_text: bool = False
    # native_pretrained: also a linear path from the mean-pooled frozen features (as the adapter baseline)
    # to the output, the fusion transformer's head starting at zero, so early fusion adds to it
    adapter_path: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        for name in ("image_size", "patch_size", "max_images", "vocab_size", "max_text_tokens", "width",
                     "depth", "heads", "embed_dim"):
            if getattr(self, name) <= 0 and not (name == "depth" and self.architecture == "stitched_twin"):
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.depth < 0:  # stitched_twin with depth 0: a linear adapter over the pooled frozen features
            raise ValueError(f"depth={self.depth} must be >= 0")
        if self.pool not in ("mean", "cls", "modality"):
            raise ValueError(f"pool={self.pool!r} must be 'mean', 'cls' or 'modality'")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} must be one of {list(ARCHITECTURES)}")
        if self.twin_head not in ("linear", "mlp"):
            raise ValueError(f"twin_head={self.twin_head!r} must be 'linear' or 'mlp'")
        if self.pretrained:
            self._check_pretrained()
        elif self.unfreeze_text or self.adapter_path:
            flag = "unfreeze_text" if self.unfreeze_text else "adapter_path"
            raise ValueError(f"{flag}=True needs a pretrained architecture {list(PRETRAINED)}, "
                             f"not {self.architecture!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.moe_shared_experts < 0 or self.moe_every <= 0:
            raise ValueError(f"moe_shared_experts={self.moe_shared_experts} must be >= 0 and "
                             f"moe_every={self.moe_every} positive")
        if self.moe_routing not in ("learned", "grouped"):
            raise ValueError(f"moe_routing={self.moe_routing!r} must be 'learned' or 'grouped'")
        if self.moe_experts < 0:
            raise ValueError(f"moe_experts={self.moe_experts} must be >= 0 (0: dense FFN)")
        if self.moe_routing == "grouped" and self.moe_experts % 2:
            raise ValueError(f"moe_experts={self.moe_experts} must be even with moe_routing='grouped'")
        group = self.moe_experts // 2 if self.moe_routing == "grouped" else self.moe_experts
        if self.moe_experts and not 1 <= self.moe_top_k <= group:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in [1, {group}] "
                             f"(moe_experts={self.moe_experts}, moe_routing={self.moe_routing!r})")

    def _check_pretrained(self) -> None:
        """The frozen parts fix the vocabulary, the text length limit and the image geometry."""
        if self.patch_size != self.image_size or self.image_size % IMAGE_STRIDE:
            raise ValueError(f"architecture={self.architecture!r} reads whole images: patch_size={self.patch_size} "
                             f"must equal image_size={self.image_size}, a multiple of {IMAGE_STRIDE}")
        if self.vocab_size != MINILM_VOCAB:
            raise ValueError(f"vocab_size={self.vocab_size} must be MiniLM's {MINILM_VOCAB} for "
                             f"architecture={self.architecture!r}")
        if self.max_text_tokens + 2 > MINILM_POSITIONS:
            raise ValueError(f"max_text_tokens={self.max_text_tokens} must be at most {MINILM_POSITIONS - 2}")
        if self.architecture == "stitched_twin" and self.moe_experts:
            raise ValueError(f"moe_experts={self.moe_experts}: stitched_twin has dense FFNs only; use 0")

    @property
    def pretrained(self) -> bool:
        """Whether the architecture reads frozen MiniLM and EfficientNet-Lite0 features."""
        return self.architecture in PRETRAINED

    @property
    def feature_grid(self) -> int:
        """Side of EfficientNet-Lite0's feature grid for one image (pretrained architectures)."""
        return self.image_size // IMAGE_STRIDE

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
        """The fields as JSON; fields added after the first release are left out at their defaults, so a
        unified or stitched `config.json` is unchanged and older readers still load it."""
        data = dataclasses.asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return json.dumps(data, indent=2, sort_keys=True)

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
    # frozen MiniLM + EfficientNet-Lite0 at 160 px (a 5x5 grid: 2-2.5x the items/s of 224 px on a CPU) under a
    # narrow trainable fusion transformer; `architecture="stitched_twin"` gives its late-fusion rival
    # (width 96: 1.4x the training items/s of 128 on 2 CPU cores, so the conjunction evaluation fits 45 minutes;
    # pool "cls": a learned query token read out after fusion, ahead of mean pooling on two training seeds of
    # the conjunction preset, docs/EVALUATION.md)
    "pretrained": EncoderConfig(architecture="native_pretrained", image_size=160, patch_size=160, max_images=2,
                                vocab_size=30522, max_text_tokens=64, width=96, depth=2, heads=4, embed_dim=256,
                                pool="cls"),
}


def preset(name: str, **overrides: Any) -> EncoderConfig:
    """The named size, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder size {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
