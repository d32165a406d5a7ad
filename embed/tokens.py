"""Subword tokenizer trained on the catalog with the `tokenizers` library and saved beside the weights."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4 in this order


class TextTokenizer:
    """Lower-cased byte-level BPE tokenizer; ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}, got {tokenizer.token_to_id(tok)}")
        self._tok = tokenizer

    pad_id, unk_id, cls_id, sep_id, mask_id = range(5)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """Train a new vocabulary on `texts` (catalog titles, descriptions, attributes)."""
        # Byte-level BPE: any Unicode text maps to known tokens, so nothing becomes [UNK].
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([
            normalizers.NFKC(),
            normalizers.Replace(Regex(r"[\p{Cc}\p{Cf}]"), " "),  # control and format characters
            normalizers.Lowercase(),
            normalizers.NFD(),  # StripAccents only drops combining marks, which NFKC had composed away
            normalizers.StripAccents(),
            normalizers.NFC(),
        ])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((t for t in texts if t), trainer=trainer)
        logger.info("trained tokenizer: %d tokens", tok.get_vocab_size())
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def to_str(self) -> str:
        return str(self._tok.to_str())

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode_batch(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Token ids per text (no special tokens), truncated to `max_tokens`."""
        # Lone surrogates (e.g. from JSON "\ud800" escapes) are not valid Unicode; the tokenizer would raise.
        clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        encodings = self._tok.encode_batch(clean, add_special_tokens=False)
        return [e.ids[:max_tokens] for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))
