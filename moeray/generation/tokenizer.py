"""Text in and out: the checkpoint's `tokenizer.json` (the `tokenizers` package), incremental
detokenization, stop strings, and the built-in tiny model's byte-level BPE tokenizer.

Without a tokenizer.json the runtime works on token ids only (`Tokenizer.from_dir` returns None).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence
# tokens decoded again before the newest ones, so decoders that treat a sequence's first token
# specially (SentencePiece's leading-space strip) see the same context as a full decode
CONTEXT_TOKENS = 5


def _token_text(config: dict, key: str) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict with "content"."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json says about BOS and EOS."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool | None = None):
        self.backend = backend
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else backend.token_to_id(eos_token)
        # None: do what the file's post-processor does; True / False: the config overrides it
        self.add_bos_token = add_bos_token

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory; None when it has no tokenizer.json."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            return None
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        add_bos = config.get("add_bos_token")
        return cls(tokenizers.Tokenizer.from_file(str(path)), _token_text(config, "bos_token"),
                   _token_text(config, "eos_token"), add_bos if isinstance(add_bos, bool) else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids. With special tokens, BOS is added the way the post-processor says, unless
        tokenizer_config.json's add_bos_token says otherwise (transformers lets the config win)."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        ids = list(encoding.ids)
        if not add_special_tokens or self.bos_token_id is None or self.add_bos_token is None:
            return ids
        processor_added_bos = bool(ids) and ids[0] == self.bos_token_id and encoding.special_tokens_mask[0] == 1
        if self.add_bos_token and not processor_added_bos:
            return [self.bos_token_id] + ids
        if not self.add_bos_token and processor_added_bos:
            return ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """The text of a growing id sequence, handed out as deltas.

    A byte-level BPE token may end inside a UTF-8 character; such a tail decodes to U+FFFD and is
    held back until a later token completes it (the complete characters before it are emitted).
    Emitted text never changes afterwards.

    Each push decodes only a window: ids[prefix:read] (fully emitted) and ids[prefix:] (with the
    newer ids); the delta is what the second adds to the first, less the `held` characters of it
    already emitted while an incomplete tail kept `read` from advancing. Invariant: `read` only
    moves to an id boundary whose text was complete, so for byte-level tokenizers window decodes
    agree with a full decode. `prompt_ids` (optional) give the first window its context.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(t) for t in prompt_ids]
        self._prefix = max(0, len(self.ids) - CONTEXT_TOKENS)
        self._read = len(self.ids)
        self._held = 0
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (without the prompt)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete (possibly "")."""
        self.ids.extend(int(t) for t in new_ids)
        decode = self.tokenizer.decode
        emitted_window = decode(self.ids[self._prefix:self._read], self.skip_special_tokens)
        window = decode(self.ids[self._prefix:], self.skip_special_tokens)
        unread = window[len(emitted_window):]
        if window.endswith(REPLACEMENT):  # an incomplete character: emit what precedes it, keep `read`
            complete = unread.rstrip(REPLACEMENT)
            delta = complete[self._held:]
            self._held = max(self._held, len(complete))
        else:  # everything decoded is complete: the newly read ids become the next window's context
            delta = unread[self._held:]
            self._prefix, self._read, self._held = self._read, len(self.ids), 0
        if delta:
            self._chunks.append(delta)
        return delta

    def finish(self) -> str:
        """The output ended: a tail held back for a character that never completed is emitted as
        it decodes (U+FFFD), so the final text equals the decode of every generated id."""
        decode = self.tokenizer.decode
        emitted_window = decode(self.ids[self._prefix:self._read], self.skip_special_tokens)
        window = decode(self.ids[self._prefix:], self.skip_special_tokens)
        delta = window[len(emitted_window):][self._held:]
        self._prefix, self._read, self._held = self._read, len(self.ids), 0
        if delta:
            self._chunks.append(delta)
        return delta


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Where the earliest stop string begins in `text`, or None. Only occurrences that overlap the
    text from `search_from` on are looked for (earlier text was searched when it was new), i.e.
    each stop `s` from `max(0, search_from - len(s) + 1)`. The output is cut at the returned
    index: the stop string itself is not included (vLLM's default)."""
    hits = [i for s in stops if (i := text.find(s, max(0, search_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None


# ---- the built-in tiny tokenizer ------------------------------------------------------------

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; <unk> doubles as the padding token
_BYTE_ALPHABET_SIZE = 256

_CORPUS = """
The river begins as a thin stream high in the hills, where the snow melts slowly in spring. It runs
over stones and under fallen trees, and by the time it reaches the valley it is wide enough to carry
boats. Farmers along its banks have watched it for generations, learning when it will rise and when
it will fall, and they plant their fields by what the water tells them.
In the town at the mouth of the river there is a market every morning. Fishermen bring their catch
before sunrise, bakers open their doors when the first light touches the roofs, and by noon the square
is full of voices. Children run between the stalls, merchants argue about prices, and an old man
plays the violin near the fountain, asking for nothing but a few coins and a little attention.
A good library is a quiet place with a loud purpose. Its shelves hold the questions of people who
lived long ago and the answers they found, some of them right and many of them wrong. Reading them,
we learn not only what they knew but how they thought, and sometimes we notice that our own certainty
is just as fragile as theirs was.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
Numbers and signs appear in ordinary writing: 0 1 2 3 4 5 6 7 8 9, 10, 25, 100, 2024, 3.5 and 99%.
We write (parentheses), [brackets], {braces}, "quotes", 'apostrophes', dashes - and slashes / too.
When the weather turned cold, the travellers gathered around the fire and told stories. One spoke of a
ship that sailed beyond the edge of every map; another described a city built on bridges, where nobody
ever walked on solid ground. The youngest listened without a word, and when morning came she packed
her things and set out to see which of the stories were true.
Learning to cook is mostly learning to wait. Onions need time to soften, bread needs time to rise,
and a soup is better on the second day than on the first. Patience is an ingredient that no recipe
lists, yet every good cook keeps a generous supply of it close at hand.
Some words travel between languages: café, naïve, résumé, déjà vu, Straße, señor, smörgåsbord.
"""


def build_tiny_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` tokens: <unk> 0, <s> 1, </s> 2, the
    256 byte tokens, then merges learnt by `tokenizers`' BPE trainer from the built-in corpus.
    The corpus supports about 970 tokens; larger sizes are filled with `<extra_i>` vocabulary
    entries that no merge produces (so encoding never emits them). Deterministic; the
    post-processor prepends <s>."""
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least {minimum} tokens")
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([line for line in _CORPUS.strip().splitlines() if line], trainer=trainer)
    spec = json.loads(backend.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for extra in range(vocab_size - len(vocab)):  # the corpus ran out of merges
        vocab[f"<extra_{extra}>"] = len(vocab)
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))])
    got = backend.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"built a tokenizer of {got} tokens, wanted {vocab_size}")
    return backend


def write_tiny_tokenizer(directory: str | Path, vocab_size: int) -> Path:
    """Write tokenizer.json and tokenizer_config.json of the tiny tokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_FILE).write_text(build_tiny_tokenizer(vocab_size).to_str(pretty=True))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory
