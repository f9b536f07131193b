"""A real (Hugging Face ``tokenizers``) tokenizer behind the :class:`stts_dist.tokenizer.Tokenizer`
interface, with our special tokens appended.

``HFTokenizer.from_folder(path)`` reads ``tokenizer.json`` (+ ``tokenizer_config.json`` for the
bos/eos/pad tokens) of an LLM folder, e.g. one written by ``tools/import_weights.py smollm2``.
``<video>``, ``<frame>``, ``<user>`` and ``<assistant>`` are added as special tokens after the
existing vocabulary (ids ``n, n+1, ...``), so the pretrained ids are unchanged; the LLM's
embedding grows to ``vocab_size`` rows (see :func:`stts_dist.weights.hf_llm.load_hf_llm`).
Needs the ``tokenizers`` package only (transformers is not required).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence



class TokenizerFileError(ValueError):
    """A pretrained tokenizer folder cannot be used; the message names the file and the fix."""

OUR_SPECIALS = ("<video>", "<frame>", "<user>", "<assistant>")


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """``encode`` / ``decode`` with the pretrained tokenizer; ``video_id``, ``frame_id``,
    ``user_id``, ``assistant_id`` are our appended specials; ``pad_id`` / ``bos_id`` / ``eos_id``
    the tokenizer's own (pad falls back to eos, bos to eos when the model has none, as Qwen2)."""

    def __init__(self, tokenizer, bos: Optional[str], eos: Optional[str], pad: Optional[str]):
        from tokenizers import AddedToken
        self._tok = tokenizer
        self._names = {"bos": bos, "eos": eos, "pad": pad}
        existing = {s for s in OUR_SPECIALS if tokenizer.token_to_id(s) is not None}
        tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                      for s in OUR_SPECIALS if s not in existing])
        ids = {s: tokenizer.token_to_id(s) for s in OUR_SPECIALS}
        self.video_id, self.frame_id = ids["<video>"], ids["<frame>"]
        self.user_id, self.assistant_id = ids["<user>"], ids["<assistant>"]
        if eos is None or tokenizer.token_to_id(eos) is None:
            raise TokenizerFileError(f"the tokenizer's eos token {eos!r} is not in its vocabulary; set eos_token in "
                               f"tokenizer_config.json")
        self.eos_id = tokenizer.token_to_id(eos)
        self.bos_id = tokenizer.token_to_id(bos) if bos and tokenizer.token_to_id(bos) is not None else self.eos_id
        self.pad_id = tokenizer.token_to_id(pad) if pad and tokenizer.token_to_id(pad) is not None else self.eos_id
        self.unk_id = self.pad_id

    @classmethod
    def from_folder(cls, path: str | Path) -> "HFTokenizer":
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise TokenizerFileError("a pretrained tokenizer needs the tokenizers package: pip install tokenizers") from e
        folder = Path(path).expanduser()
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerFileError(f"{folder} has no tokenizer.json (a 'fast' Hugging Face tokenizer); save one with "
                               f"transformers' tokenizer.save_pretrained(folder)")
        cfg = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        tok = Tokenizer.from_file(str(tj))
        eos = _token_text(cfg.get("eos_token"))
        if eos is None and (folder / "config.json").is_file():  # fall back to the model config's id
            eid = json.loads((folder / "config.json").read_text()).get("eos_token_id")
            eos = tok.id_to_token(eid[0] if isinstance(eid, list) else eid) if eid is not None else None
        return cls(tok, _token_text(cfg.get("bos_token")), eos, _token_text(cfg.get("pad_token")))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        """The whole tokenizer (with our specials) as one JSON string, for checkpoints."""
        return json.dumps({"type": "hf", "tokenizer": self._tok.to_str(), **self._names})

    @classmethod
    def from_json(cls, blob: str) -> "HFTokenizer":
        from tokenizers import Tokenizer
        data = json.loads(blob)
        if data.get("type") != "hf":
            raise ValueError("tokenizer blob is not an HFTokenizer")
        return cls(Tokenizer.from_str(data["tokenizer"]), data.get("bos"), data.get("eos"), data.get("pad"))
