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
    """A `tokenizers` tokenizer with the five BERT special tokens; [PAD] must be id 0 (masks test `id != 0`).

    `train` makes the lower-cased byte-level BPE of the unified and stitched encoders, whose special
    tokens are ids 0..4 (the class attributes below). A pretrained vocabulary may place them elsewhere
    (MiniLM's WordPiece: [UNK] [CLS] [SEP] [MASK] = 100..103); each instance reads its own ids.
    """

    # ids of a tokenizer made by `train`; an instance's attributes give its own
    pad_id, unk_id, cls_id, sep_id, mask_id = range(5)

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Raises ValueError when a special token is missing or [PAD] is not id 0."""
        ids = [tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS]
        if ids[0] != 0:
            raise ValueError(f"tokenizer must map {PAD} to id 0, got {ids[0]}")
        missing = [tok for tok, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (i for i in ids if i is not None)
        # `encode_batch` truncates itself and `collate` pads; a pretrained tokenizer.json may pad every text
        # to a fixed length (MiniLM's: 128), which would put [PAD] ids inside the token lists.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer

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
