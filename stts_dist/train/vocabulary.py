"""The run's tokenizer, decided by its config and data.

- a pretrained LLM's own tokenizer (``model.pretrained.tokenizer_path``, else ``llm_path``) always wins;
- the built-in digits task (``data.source=digits|digits_mp4``) uses the digits vocabulary;
- a user's data (``manifest`` / ``shards``) uses the word vocabulary learned from its questions and
  answers when the manifest was sharded (``<shard folder>/tokenizer.json``), so the user's words are
  tokens of their own, never ``<unk>``.

The trainer stores the tokenizer in every checkpoint; eval and infer read it from there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from data_pipeline.build_shards import VOCAB_FILE
from stts_dist.config import DIGITS_SOURCES
from stts_dist.tokenizer import Tokenizer, WordTokenizer, default_tokenizer


class VocabularyError(ValueError):
    """The run's data has no vocabulary to train with."""


def build_tokenizer(cfg, shard_dir: Optional[Path] = None) -> Tokenizer:
    """The tokenizer a run trains with; ``shard_dir`` is the run's shard folder (None in memory)."""
    pre = cfg.model.pretrained
    path = pre.tokenizer_path or pre.llm_path
    if path:
        from stts_dist.hf_tokenizer import HFTokenizer
        return HFTokenizer.from_folder(path)
    if cfg.data.source in DIGITS_SOURCES:
        return default_tokenizer()
    if shard_dir is None:
        raise VocabularyError(f"data.source={cfg.data.source}: the vocabulary is learned when the data is sharded; "
                              "prepare the shards first (stts_dist.train.sources.prepare_shards)")
    vocab = Path(shard_dir) / VOCAB_FILE
    if not vocab.is_file():
        raise VocabularyError(
            f"{shard_dir} holds no {VOCAB_FILE}: the shards were written by an older version that did not learn the "
            f"data's vocabulary. Build them again: python -m data_pipeline.build_shards manifest=YOUR.jsonl "
            f"out_dir={shard_dir} (finished shards are reused; only the vocabulary and index are rewritten)")
    return WordTokenizer.from_json(vocab.read_text())
