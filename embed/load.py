"""Save and load an encoder as `config.json` + `weights.safetensors` + `tokenizer.json` (no pickle)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embed.build import Encoder, build_encoder
from embed.config import EncoderConfig
from embed.encoder import ItemEncoder
from embed.tokens import TextTokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "weights.safetensors", "tokenizer.json"
ENCODER_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)


def save_encoder(directory: Path, model: Encoder, tokenizer: TextTokenizer) -> Path:
    """Write the three encoder files into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(model.config.to_json())
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(directory / TOKENIZER_FILE)
    return directory


def find_encoder_dir(root: Path) -> Path:
    """The directory under `root` (itself or below) holding `config.json` and the weights."""
    if (root / WEIGHTS_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(WEIGHTS_FILE))
    if not found:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} under {root}")
    return found[0]


def load_model(directory: Path) -> tuple[Encoder, TextTokenizer]:
    """Rebuild the module and tokenizer from the files; refuses missing or mismatched tensors."""
    directory = find_encoder_dir(directory)
    missing = [f for f in ENCODER_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"encoder directory {directory} lacks {missing}")
    config = EncoderConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    model = build_encoder(config)  # config.json names the architecture
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model, TextTokenizer.load(directory / TOKENIZER_FILE)


def load_encoder(directory: Path, device: str | torch.device = "cpu", batch_size: int = 64,
                 precision: str = "fp32") -> ItemEncoder:
    """An `ItemEncoder` ready for inference from a saved encoder directory (`precision`: see `ItemEncoder`)."""
    model, tokenizer = load_model(directory)
    encoder = ItemEncoder(model, tokenizer, device=device, batch_size=batch_size, precision=precision)
    logger.info("loaded encoder from %s (%d parameters, %s on %s)", directory,
                sum(p.numel() for p in model.parameters()), encoder.precision, encoder.device)
    return encoder
