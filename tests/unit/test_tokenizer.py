"""Tokenizer wrapper, the tiny byte-level BPE tokenizer, incremental detokenization, stop strings."""

import json

import pytest

from moeray.generation.tokenizer import (
    REPLACEMENT,
    IncrementalDetokenizer,
    Tokenizer,
    build_tiny_tokenizer,
    find_stop,
    write_tiny_tokenizer,
)

TEXTS = [
    "Hello, world!",
    "The river begins as a thin stream.",
    "café au lait, naïve résumé",
    "日本語のテキスト and 日本",
    "party 🎉🎉 time 👩‍👩‍👧 done",
    "  leading spaces\nnew lines\ttabs  ",
    "",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tiny"), 512)
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer is not None
    return tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny, text):
    ids = tiny.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]  # <s> prepended once by the post-processor
    assert tiny.decode(ids) == text
    assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text
    assert tiny.encode(text, add_special_tokens=False) == ids[1:]


def test_special_ids_and_vocab(tiny):
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.vocab_size) == (1, 2, 512)
    backend = tiny.backend
    assert [backend.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tiny.decode([1, *tiny.encode("hi", add_special_tokens=False), 2], skip_special_tokens=False) == "<s>hi</s>"


@pytest.mark.parametrize("vocab_size", [259, 300, 512, 1500])
def test_vocab_size_is_exact_and_any_text_encodes(vocab_size):
    tokenizer = build_tiny_tokenizer(vocab_size)
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    ids = tokenizer.encode("ünïcödé ✓ <extra_0> 日本").ids
    assert max(ids) < vocab_size and 0 not in ids  # byte-level: never <unk>
    assert tokenizer.decode(ids) == "ünïcödé ✓ <extra_0> 日本"


def test_too_small_vocab_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=258"):
        build_tiny_tokenizer(258)


def test_deterministic(tmp_path):
    assert build_tiny_tokenizer(512).to_str() == build_tiny_tokenizer(512).to_str()
    first, second = write_tiny_tokenizer(tmp_path / "a", 512), write_tiny_tokenizer(tmp_path / "b", 512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    config = json.loads((first / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)


def test_from_dir_without_tokenizer_json_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_add_bos_token_in_the_config_overrides_the_post_processor(tmp_path):
    write_tiny_tokenizer(tmp_path, 300)
    plain = Tokenizer.from_dir(tmp_path).encode("abc", add_special_tokens=False)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path).encode("abc") == plain
    # a file without the BOS post-processor, config asking for BOS: added exactly once
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config_path.write_text(json.dumps({**config, "bos_token": {"content": "<s>"}, "add_bos_token": True}))
    assert Tokenizer.from_dir(tmp_path).encode("abc") == [1, *plain]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_matches_full_decode(tiny, text, chunk):
    ids = tiny.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny)
    deltas = []
    for end in range(chunk, len(ids) + chunk, chunk):
        deltas.append(detok.push(ids[end - chunk:end]))
        full = tiny.decode(ids[:end])
        # complete characters only: the prefix's decode without its incomplete tail
        assert detok.text == full.rstrip(REPLACEMENT)
        assert REPLACEMENT not in deltas[-1]
    assert "".join(deltas) == detok.text == text


def test_the_detokenizer_test_sees_split_characters(tiny):
    # guards the test above: with 512 tokens some non-ASCII character spans several tokens
    ids = tiny.encode("日本 🎉", add_special_tokens=False)
    assert any(tiny.decode(ids[:n]).endswith(REPLACEMENT) for n in range(1, len(ids)))


def test_incremental_detokenizer_with_prompt_context_and_specials(tiny):
    prompt = tiny.encode("Say 日本:")
    output = tiny.encode(" 日本 is Japan 🎉", add_special_tokens=False) + [2]
    detok = IncrementalDetokenizer(tiny, prompt_ids=prompt)
    text = "".join(detok.push([t]) for t in output)
    assert text == detok.text == " 日本 is Japan 🎉"  # </s> skipped


@pytest.mark.parametrize("text, stops, search_from, want", [
    ("hello world", ["world"], 0, 6),
    ("hello wor", ["world"], 0, None),
    ("hello world", ["world"], 8, 6),  # the stop began before the new text ("rld" is new)
    ("hello world", ["world"], 11, None),  # nothing new: an old occurrence was already handled
    ("a STOP b END c", ["END", "STOP"], 0, 2),  # the earliest of several
    ("a STOP b END c", ["END", "STOP"], 7, 9),  # STOP lies wholly before the new text
    ("abc", [], 0, None),
    ("xxEND", ["END", "ND"], 3, 2),
    ("ab", ["abc"], 0, None),
])
def test_find_stop(text, stops, search_from, want):
    assert find_stop(text, stops, search_from) == want


def test_find_stop_across_push_boundaries(tiny):
    ids = tiny.encode("one two STOP three", add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny)
    hit = None
    for t in ids:
        before = len(detok.text)
        detok.push([t])
        hit = find_stop(detok.text, ["STOP"], before)
        if hit is not None:
            break
    assert hit == len("one two ") and detok.text[:hit] == "one two "


def test_finish_emits_a_tail_that_never_completed(tmp_path):
    from moeray.generation.tokenizer import IncrementalDetokenizer, Tokenizer, write_tiny_tokenizer

    tok = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path, 512))
    ids = tok.encode("日", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    detok.push(tok.encode("ab", add_special_tokens=False))
    # a byte-level id sequence cut inside a character: held back until finish()
    partial = ids[:-1] if len(ids) > 1 else [tok.backend.token_to_id("æ")]
    detok.push(partial)
    held = detok.text
    assert "\ufffd" not in held
    detok.finish()
    assert detok.text == tok.decode(tok.encode("ab", add_special_tokens=False) + partial)
