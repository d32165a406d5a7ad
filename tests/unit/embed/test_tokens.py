"""The catalog-trained subword tokenizer (`embed.tokens`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from embed.tokens import SPECIAL_TOKENS, TextTokenizer

SAMPLES = [
    "Red leather handbag with gold zip",
    "blue cotton shirt, slim fit — size M",
    "a title that the training texts never saw: zebra quokka",
]
ODD_TEXTS = [
    "party 😀👍🏽🇫🇷 time",
    "bell\x07 null\x00 escape\x1b[31m del\x7f",
    "zero\u200bwidth\u200e rtl \u202eevil",
    "中文 עברית العربية 한국어",
    "ﬁnancial ＦＵＬＬＷＩＤＴＨ",
    "\n\t\r  ",
    "lone surrogate \ud800 here",
    "",
]


def test_special_tokens_are_ids_zero_to_four(tokenizer: TextTokenizer) -> None:
    assert SPECIAL_TOKENS == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    inner = Tokenizer.from_str(tokenizer.to_str())
    assert [inner.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        0, 1, 2, 3, 4)


def test_ordinary_text_never_yields_special_ids(tokenizer: TextTokenizer) -> None:
    for ids in tokenizer.encode_batch(SAMPLES + ODD_TEXTS, max_tokens=10_000):
        assert all(i >= len(SPECIAL_TOKENS) for i in ids)
        assert all(i < tokenizer.vocab_size for i in ids)


def test_vocabulary_is_trained_to_at_most_the_target(tokenizer: TextTokenizer) -> None:
    assert 256 + len(SPECIAL_TOKENS) <= tokenizer.vocab_size <= 400
    frequent, rare = tokenizer.encode_batch(["leather cotton", "qzxv jkwp"], 100)
    assert len(frequent) < len(rare)  # merges learnt from the catalog make its words short


def test_tokenizer_refuses_a_vocabulary_without_the_special_ids() -> None:
    bare = Tokenizer(models.BPE(unk_token="[UNK]"))
    bare.add_special_tokens(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    with pytest.raises(ValueError, match=r"\[PAD\] to id 0"):
        TextTokenizer(bare)


def test_save_and_load_round_trip_gives_identical_ids(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    texts = SAMPLES + ODD_TEXTS
    expected = tokenizer.encode_batch(texts, 1000)
    assert TextTokenizer.load(path).encode_batch(texts, 1000) == expected
    assert TextTokenizer.from_str(tokenizer.to_str()).encode_batch(texts, 1000) == expected
    assert TextTokenizer.load(path).vocab_size == tokenizer.vocab_size


def test_any_unicode_encodes_without_error(tokenizer: TextTokenizer) -> None:
    encoded = tokenizer.encode_batch(ODD_TEXTS, 1000)
    assert len(encoded) == len(ODD_TEXTS)
    assert encoded[-1] == []
    emoji = tokenizer.decode(encoded[0])
    assert "😀" in emoji and "🇫🇷" in emoji  # byte-level: no [UNK], the text survives
    assert tokenizer.unk_id not in [i for ids in encoded for i in ids]


def test_control_characters_act_as_spaces(tokenizer: TextTokenizer) -> None:
    with_controls, plain = tokenizer.encode_batch(["red\x00leather\u200bbag", "red leather bag"], 100)
    assert with_controls == plain


def test_normalisation_lowercases_folds_width_and_strips_accents(tokenizer: TextTokenizer) -> None:
    a, b, c = tokenizer.encode_batch(["Crème BRÛLÉE", "creme brulee", "ｃｒｅｍｅ ｂｒｕｌｅｅ"], 100)
    assert a == b == c
    assert tokenizer.decode(a).strip() == "creme brulee"


def test_truncation_keeps_the_prefix(tokenizer: TextTokenizer) -> None:
    text = "red leather handbag with gold zip and a long description " * 5
    full = tokenizer.encode_batch([text], 10_000)[0]
    assert len(full) > 20
    for limit in (1, 7, 20):
        cut = tokenizer.encode_batch([text], limit)[0]
        assert cut == full[:limit]
    assert tokenizer.encode_batch([text], len(full) + 5)[0] == full


def test_batch_equals_one_by_one(tokenizer: TextTokenizer) -> None:
    texts = SAMPLES + ODD_TEXTS
    assert tokenizer.encode_batch(texts, 50) == [tokenizer.encode_batch([t], 50)[0] for t in texts]
