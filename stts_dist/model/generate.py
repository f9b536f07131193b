"""Greedy decoding with a KV cache for a batch of prompts of different lengths (left padded)."""
from __future__ import annotations

from typing import Optional

import torch

from stts_dist.data.batch import VideoBatch
from stts_dist.model.vlm import VideoVLM


@torch.no_grad()
def generate(model: VideoVLM, batch: VideoBatch, eos_id: int, max_new_tokens: int = 8,
             generator: Optional[torch.Generator] = None) -> tuple[list[list[int]], dict]:
    """``batch`` holds prompts only (``SequenceBuilder(..., with_answer=False)``), pruned to
    ``batch.budget``. Returns (generated token ids per sample without eos, info with kept-token
    counts per sample and the ``keep`` (F, G) / ``scores`` (F, G) tensors)."""
    settings = model.prune_settings(batch.budget)
    visual, res, dummy = model.encode_visual(batch.frames, batch.layout, settings, generator)
    embeds, sep = model.embed_prompt(batch)
    if not dummy:
        embeds = model.merge_visual(batch, embeds, visual, res.keep, sep)
    B, L = batch.size, max(batch.seq_lengths)
    dev = embeds.device
    padded = embeds.new_zeros(B, L, embeds.shape[-1])
    valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
    positions = torch.zeros(B, L, dtype=torch.long, device=dev)
    for i, chunk in enumerate(torch.split(embeds, batch.seq_lengths)):
        n = chunk.shape[0]
        padded[i, L - n:] = chunk
        valid[i, L - n:] = True
        positions[i, L - n:] = torch.arange(n, device=dev)
    cache = [{"valid": valid} for _ in model.llm.layers]
    logits = model.llm.forward_cached(padded, positions, cache)
    next_pos = positions[:, -1] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for i in range(B):
            if not done[i] and int(nxt[i]) != eos_id:
                out[i].append(int(nxt[i]))
        done |= nxt == eos_id
        # Under ZeRO-3 every rank must run the same number of forwards: never stop early there.
        if bool(done.all()) and not torch.distributed.is_initialized():
            break
        step_valid = torch.cat([cache[0]["valid"], torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        for c in cache:
            c["valid"] = step_valid
        logits = model.llm.forward_cached(model.llm.embed_tokens(nxt[:, None]), next_pos[:, None], cache)
        next_pos = next_pos + 1
    per_frame = res.keep.sum(1)
    info = {"vit_tokens_before": 0 if dummy else res.tokens_before, "vit_tokens_after": 0 if dummy else res.tokens_after,
            "llm_visual_tokens": [int(per_frame[s:s + n].sum()) for s, n in zip(batch.layout.starts, batch.layout.lengths)],
            "keep": res.keep, "scores": res.scores}
    return out, info
