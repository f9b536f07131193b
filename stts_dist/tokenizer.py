"""Tokenizers that need no download.

``Tokenizer`` is the interface the model and data code use. ``WordTokenizer`` is a word-level
vocabulary on the ``tokenizers`` library (NFKC + lower-case normalizer; whitespace, then
punctuation split off as its own token, so ``move?`` is ``move ?``): the built-in digits task's
fixed vocabulary (:func:`default_tokenizer`), or one learned from a user's own questions and
answers (:meth:`WordTokenizer.from_texts`, done once when a manifest is sharded). A pretrained
LLM's tokenizer (``stts_dist.hf_tokenizer``) implements the same interface.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Iterable, Protocol, Sequence

from tokenizers import Tokenizer as _Pipeline
from tokenizers import normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from stts_dist.data.digits import follow_up_vocabulary, vocabulary

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<video>", "<frame>", "<user>", "<assistant>")
# Names the text splitting; stored with shard plans so token counts made by another splitting never mix.
WORD_SPLIT_NAME = "stts_dist.tokenizer.word_pieces/v2"


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    video_id: int      # the placeholder id that visual tokens replace
    frame_id: int      # per-frame separator id
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def _pipeline(vocab: dict[str, int]) -> _Pipeline:
    tok = _Pipeline(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    return tok


_SPLITTER = _pipeline({"<unk>": 0})


def word_pieces(text: str) -> list[str]:
    """The words ``text`` splits into (what each becomes one token of): ``"Move?" -> ["move", "?"]``."""
    normalized = _SPLITTER.normalizer.normalize_str(text)
    return [piece for piece, _ in _SPLITTER.pre_tokenizer.pre_tokenize_str(normalized)]


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary; words outside it map to ``<unk>``.
    Ids: the specials first (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ...), then ``words``."""

    def __init__(self, words: Sequence[str]):
        vocab = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}
        self._tok = _pipeline(self.stoi)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.video_id, self.frame_id = self.stoi["<video>"], self.stoi["<frame>"]
        self.user_id, self.assistant_id = self.stoi["<user>"], self.stoi["<assistant>"]

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        """The vocabulary of ``texts`` (every question and answer of a dataset): each word seen at
        least ``min_count`` times, most frequent first, ties in alphabetical order, so every
        process that reads the same texts builds the same ids."""
        counts = Counter(piece for text in texts for piece in word_pieces(text))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id))

    def unknown_words(self, texts: Iterable[str]) -> Counter:
        """How often each word of ``texts`` outside the vocabulary occurs (they encode as ``<unk>``)."""
        return Counter(piece for text in texts for piece in word_pieces(text) if piece not in self.stoi)

    def to_json(self) -> str:
        return json.dumps({"type": "word", "vocab": self.itos})

    @classmethod
    def from_json(cls, blob: str) -> "WordTokenizer":
        data = json.loads(blob)
        if data.get("type") != "word" or not isinstance(data.get("vocab"), list):
            raise ValueError("tokenizer blob is not a WordTokenizer vocabulary")
        return cls([w for w in data["vocab"] if w not in SPECIALS])

    def __reduce__(self):           # pickled into loader workers: the vocabulary is enough
        return (WordTokenizer, ([w for w in self.itos if w not in SPECIALS],))


def default_tokenizer() -> WordTokenizer:
    """The tokenizer of the built-in moving-digits task (plus digits/words users commonly need).
    Words added later (the follow-up questions' ``first``) come last, so earlier ids never move."""
    extra = [str(i) for i in range(10)] + "yes no left right up down top bottom the a is what which how many".split()
    return WordTokenizer(vocabulary() + extra + follow_up_vocabulary())


def tokenizer_from_json(blob: str) -> "Tokenizer":
    """Inverse of ``tokenizer.to_json()`` for every tokenizer type this project writes."""
    kind = json.loads(blob).get("type")
    if kind == "hf":
        from stts_dist.hf_tokenizer import HFTokenizer
        return HFTokenizer.from_json(blob)
    return WordTokenizer.from_json(blob)
