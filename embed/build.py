"""One factory from `EncoderConfig.architecture` to the module: training, saving and loading go through it."""

from __future__ import annotations

from embed.config import EncoderConfig
from embed.model import UnifiedEncoder
from embed.stitched import StitchedEncoder

Encoder = UnifiedEncoder | StitchedEncoder  # both read `EncoderInput` and return unit vectors (B, embed_dim)


def build_encoder(config: EncoderConfig) -> Encoder:
    """The encoder `config.architecture` names: "unified" (early fusion) or "stitched" (late fusion)."""
    if config.architecture == "stitched":
        return StitchedEncoder(config)
    return UnifiedEncoder(config)
