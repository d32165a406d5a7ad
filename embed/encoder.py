"""`ItemEncoder`: the one inference path used by evaluation, the batch reindex and the service."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from embed.batch import collate, text_markers
from embed.build import Encoder
from embed.config import EncoderConfig
from embed.errors import InvalidItemError
from embed.images import DEFAULT_MAX_PIXELS, decode_image
from embed.items import Item
from embed.model import EncoderInput
from embed.tokens import TextTokenizer

logger = logging.getLogger(__name__)


class Precision(StrEnum):
    """The encoder's arithmetic (a command-line choice)."""

    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"  # bf16 where the device computes it natively, else fp32


PRECISIONS = tuple(p.value for p in Precision)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (x86) or the BF16 extension (arm64). Elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for `precision` ("auto": bf16 where `device` computes it natively).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@dataclass(frozen=True)
class Features:
    """One item ready for collation: token ids (no specials) and decoded images."""

    tokens: list[int]
    images: list[np.ndarray]


class ItemEncoder:
    """Batched, inference-mode embedding of items into unit float32 vectors."""

    def __init__(self, model: Encoder, tokenizer: TextTokenizer, device: str | torch.device = "cpu",
                 batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS, precision: str = "fp32") -> None:
        """`precision`: "fp32", "bf16" (autocast: matmuls in bfloat16, norms and the output in float32;
        vectors within ~1e-3 cosine of fp32) or "auto" (bf16 where the device computes it natively)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if tokenizer.vocab_size > model.config.vocab_size:  # else an IndexError deep in the first forward
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                             f"vocab_size={model.config.vocab_size}; load them from the same encoder directory")
        if (tokenizer.cls_id, tokenizer.sep_id) != text_markers(model.config):  # collate inserts the latter
            raise ValueError(f"tokenizer's [CLS], [SEP] ids are {(tokenizer.cls_id, tokenizer.sep_id)} but "
                             f"architecture={model.config.architecture!r} embeds {text_markers(model.config)}; "
                             "load them from the same encoder directory")
        self.config: EncoderConfig = model.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.precision = resolve_precision(precision, self.device)

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def featurize(self, items: Sequence[Item]) -> list[Features]:
        """Tokenise and decode items (the CPU-heavy, per-request part).

        Raises:
            InvalidItemError: an item has neither text nor images, or an image cannot be decoded;
                `item_index` says which.
        """
        images: list[list[np.ndarray]] = []
        for i, item in enumerate(items):
            if not item.has_text and not item.images:
                raise InvalidItemError("item_empty", "", "has neither text nor images", i)
            try:
                images.append([decode_image(data, self.config.image_size, f"images[{j}]", self.max_pixels)
                               for j, data in enumerate(item.images[: self.config.max_images])])
            except InvalidItemError as e:
                raise e.at(i) from None
        tokens = self.tokenizer.encode_batch([item.text for item in items], self.config.max_text_tokens)
        return [Features(t, imgs) for t, imgs in zip(tokens, images, strict=True)]

    def prepare(self, items: Sequence[Item]) -> EncoderInput:
        """A padded model batch for `items` (see `featurize` for errors)."""
        return self.collate(self.featurize(items))

    def collate(self, features: Sequence[Features]) -> EncoderInput:
        return collate([f.tokens for f in features], [f.images for f in features], self.config)

    @torch.inference_mode()
    def encode_prepared(self, batch: EncoderInput) -> np.ndarray:
        """Vectors for a prepared batch: float32 (B, embed_dim), unit length."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(batch.to(self.device))
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def encode_features(self, features: Sequence[Features]) -> np.ndarray:
        """Vectors for featurized items (several requests' features may be pooled into one batch)."""
        return self.encode_prepared(self.collate(features))

    def encode(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed items in batches of `batch_size`; `progress(n)` after each batch."""
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start: start + self.batch_size]
            try:
                batch = self.prepare(chunk)
            except InvalidItemError as e:
                raise e.at(start + (e.item_index or 0)) from None
            out[start: start + len(chunk)] = self.encode_prepared(batch)
            if progress is not None:
                progress(len(chunk))
        return out
