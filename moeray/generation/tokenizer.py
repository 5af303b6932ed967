"""Text in and out: the checkpoint's `tokenizer.json` (the `tokenizers` package), incremental
detokenization, stop strings, and the built-in tiny model's byte-level BPE tokenizer.

Without a tokenizer.json the runtime works on token ids only (`Tokenizer.from_dir` returns None).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


class Tokenizer:
    def __init__(self, backend, bos_token: str | None = None, eos_token: str | None = None):
        self.backend = backend
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer | None:
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            return None
        config = {}
        if (directory / TOKENIZER_CONFIG_FILE).is_file():
            config = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text())

        def token_text(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        return cls(Backend.from_file(str(path)), token_text("bos_token"), token_text("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; the file's post-processor adds BOS where the model expects it."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted as deltas. A byte-level BPE token may end inside a
    UTF-8 character; such a tail decodes to U+FFFD and is held back until a later token completes
    it (text already emitted never changes)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._text = ""  # emitted: complete characters only

    @property
    def text(self) -> str:
        return self._text

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in new_ids)
        full = self.tokenizer.decode(self.ids)
        stable = full.rstrip(REPLACEMENT) if full.endswith(REPLACEMENT) else full
        if not stable.startswith(self._text):  # a decoder that rewrites earlier text: keep what was sent
            stable = self._text + stable[len(self._text):]
        delta = stable[len(self._text):]
        self._text = stable
        return delta


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Where the earliest stop string begins in `text`, looking only where one could overlap the
    text added since `search_from`; the output is cut there (the stop string is not included)."""
    if not stops:
        return None
    start = max(0, search_from - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


_CORPUS = """
A mixture of experts routes each token to a few of many feed-forward networks. The router scores
every expert and keeps the best ones; the chosen experts run, and their outputs are added with the
router's weights. Serving such a model on many devices means sending tokens to the devices that
hold their experts and bringing the results back, layer after layer.
Some experts are popular and others are rarely chosen. When the popular ones sit together on one
device, that device works while the others wait. Balancing the load means copying hot experts,
moving them apart, and doing it while requests keep arriving, without ever changing an answer.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ /.
Once upon a time there was a small model with random weights. It could not write poems, but it
could show how a scheduler admits requests, how a cache grows block by block, and how each worker
keeps its own sequences while the experts are shared by all of them.
"""


def build_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` tokens (<unk> 0, <s> 1, </s> 2, the 256
    bytes, then merges learnt from a small built-in corpus; beyond ~670 tokens the rest are
    placeholders `<extra_i>`), deterministic, prepending <s>."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least {256 + len(specials)}")
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Repeated paragraphs in shifted order give the trainer pairs enough to reach larger sizes.
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    corpus = [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))]
    backend.train_from_iterator(corpus, trainer=trainer)
    got = backend.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:  # the corpus ran out of merges: pad with placeholder tokens text never produces
        backend.add_tokens([f"<extra_{i}>" for i in range(vocab_size - got)])
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return backend


def write_tiny_tokenizer(directory: str | Path, vocab_size: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab_size).save(str(directory / TOKENIZER_FILE))
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return directory
