import pytest

from moeray.generation.tokenizer import (IncrementalDetokenizer, Tokenizer, build_tiny_tokenizer, find_stop,
                                         write_tiny_tokenizer)

TEXTS = ["Hello experts", "é日本 🙂 mixture", "a\\nb  c", "The router scores every expert."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 512)
    return Tokenizer.from_dir(directory)


def test_round_trip_exact_vocab_deterministic_and_bos(tok):
    assert tok.vocab_size == 512 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1 and all(0 <= i < 512 for i in ids)
        assert tok.decode(ids) == text
    assert build_tiny_tokenizer(512).to_str() == build_tiny_tokenizer(512).to_str()
    assert build_tiny_tokenizer(2000).get_vocab_size() == 2000


def test_incremental_detokenizer_never_emits_half_characters(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        pieces = []
        for i, token in enumerate(ids):
            pieces.append(detok.push([token]))
            assert "\ufffd" not in detok.text
            assert tok.decode(ids[:i + 1]).startswith(detok.text)
        assert "".join(pieces) == detok.text == text


def test_find_stop():
    assert find_stop("hello world", ["wor"], 0) == 6
    assert find_stop("hello world", ["xyz", "lo", "wor"], 0) == 3
    assert find_stop("abc###", ["###"], 4) == 3  # the stop string straddles the last push
    assert find_stop("abcdef", ["###"], 3) is None and find_stop("abc", [], 0) is None


def test_no_tokenizer_file_means_token_ids_only(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None
