"""Tokenizers that need no download.

``Tokenizer`` is the interface the model and data code use; ``WordTokenizer`` is a word-level
vocabulary built from the task's words (plus specials); a real BPE tokenizer (e.g. the one
shipped with an imported LLM) can implement the same interface.
"""
from __future__ import annotations

import json
from typing import Protocol, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<video>", "<frame>", "<user>", "<assistant>")


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    video_id: int      # the placeholder id that visual tokens replace
    frame_id: int      # per-frame separator id
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary; unknown words map to ``<unk>``."""

    def __init__(self, words: Sequence[str]):
        vocab = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.video_id, self.frame_id = self.stoi["<video>"], self.stoi["<frame>"]
        self.user_id, self.assistant_id = self.stoi["<user>"], self.stoi["<assistant>"]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in text.lower().split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id))

    def to_json(self) -> str:
        return json.dumps({"type": "word", "vocab": self.itos})

    @classmethod
    def from_json(cls, blob: str) -> "WordTokenizer":
        data = json.loads(blob)
        if data.get("type") != "word" or not isinstance(data.get("vocab"), list):
            raise ValueError("tokenizer blob is not a WordTokenizer vocabulary")
        return cls([w for w in data["vocab"] if w not in SPECIALS])


def default_tokenizer() -> WordTokenizer:
    """The tokenizer of the built-in moving-digits task (plus digits/words users commonly need)."""
    from stts_dist.data.digits import vocabulary
    extra = [str(i) for i in range(10)] + "yes no left right up down top bottom the a is what which how many".split()
    return WordTokenizer(vocabulary() + extra)


def build_tokenizer(cfg) -> "Tokenizer":
    """The run's tokenizer: a pretrained LLM's own (``model.pretrained.tokenizer_path``, else
    ``llm_path``) when one is configured, else the word vocabulary of the built-in task."""
    pre = cfg.model.pretrained
    path = pre.tokenizer_path or pre.llm_path
    if path:
        from stts_dist.weights.hf_tokenizer import HFTokenizer
        return HFTokenizer.from_folder(path)
    return default_tokenizer()


def tokenizer_from_json(blob: str) -> "Tokenizer":
    """Inverse of ``tokenizer.to_json()`` for every tokenizer type this project writes."""
    kind = json.loads(blob).get("type")
    if kind == "hf":
        from stts_dist.weights.hf_tokenizer import HFTokenizer
        return HFTokenizer.from_json(blob)
    return WordTokenizer.from_json(blob)
