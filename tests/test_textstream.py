"""Incremental detokenization (compute_server/textstream.py) with the real SmolLM2 tokenizer, whose
byte-level BPE splits a kana's UTF-8 bytes over two tokens."""

from __future__ import annotations

import pytest

from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model.loading import load_model
from contiguouskv.compute_server.textstream import REPLACEMENT, TextStream

# "メニュ": three kana, each split over two tokens
KANA = [11100, 111, 11100, 229, 11100, 115]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    tok = load_model("smollm2-135m-instruct", cache_dir=default_cache_dir()).tokenizer
    assert tok is not None
    return tok


def test_split_characters_arrive_whole(tokenizer) -> None:  # type: ignore[no-untyped-def]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert decode(KANA) == "メニュ"
    assert REPLACEMENT in decode(KANA[:1])  # what decoding a token alone gave the stream before
    stream = TextStream(decode)
    pieces = [stream.push(t) for t in KANA]
    assert pieces == ["", "メ", "", "ニ", "", "ュ"]
    assert "".join(pieces) == decode(KANA)


def test_ascii_and_mixed_text_join_into_the_sequence(tokenizer) -> None:  # type: ignore[no-untyped-def]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = tokenizer.encode("The code is 4921. ") + KANA + tokenizer.encode(" 🔐 done<|im_end|>")
    stream = TextStream(decode)
    pieces = [stream.push(t) for t in ids]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == decode(ids) == "The code is 4921. メニュ 🔐 done"  # the end-of-turn token skipped
