"""The embedded model's tokenizer is the real CLIP BPE tokenizer, in SD's folder layout."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from embedded_model.tokenizer import (
    BOS, EOS, VOCAB_SIZE, bytes_to_unicode, fetch_bpe_file, vocab_and_merges,
)
from tests.conftest import EMBEDDED_MODEL

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # SD's tokenizer on "a photo of a cat"


def test_bytes_to_unicode_is_a_bijection_on_bytes() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_committed_tokenizer_matches_sd_ids() -> None:
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    padded = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id == 49407


def test_committed_tokenizer_has_sd_files() -> None:
    folder = EMBEDDED_MODEL / "tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file(), name
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE and vocab[BOS] == 49406 and vocab[EOS] == 49407
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894


@pytest.mark.slow
def test_build_from_open_clip_bpe_equals_committed() -> None:
    """Rebuilding from the open_clip wheel (downloaded into .cache/ once) gives the same files."""
    vocab, merges = vocab_and_merges(fetch_bpe_file())
    committed = json.loads((EMBEDDED_MODEL / "tokenizer" / "vocab.json").read_text("utf-8"))
    assert vocab == committed
    assert merges == (EMBEDDED_MODEL / "tokenizer" / "merges.txt").read_text(
        "utf-8").splitlines()[1:]
    pairs = [tuple(merge.split()) for merge in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
