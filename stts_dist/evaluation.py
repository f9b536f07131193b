"""Exact-match accuracy of a model on QA samples, per task and overall."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Sequence

import torch

from stts_dist.data.batch import SequenceBuilder
from stts_dist.model.generate import generate
from stts_dist.model.vlm import VideoVLM


def normalize_answer(text: str) -> str:
    return " ".join(str(text).lower().split())


@torch.no_grad()
def evaluate(model: VideoVLM, tokenizer, samples: Sequence[dict], method: str, prune_ratio: float,
             batch_size: int = 16, device: Optional[torch.device] = None, seed: int = 0,
             frame_separators: bool = False, adaptive_strength: Optional[float] = None) -> dict[str, float]:
    """Returns ``{"acc": overall, "acc/<task>": per task, "n": count, "llm_visual_tokens": mean}``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ratio = 0.0 if method == "none" else prune_ratio
    builder = SequenceBuilder(tokenizer, model.groups_per_frame, model.cfg.vit.image_size, frame_separators,
                              adaptive_strength)
    gen = torch.Generator().manual_seed(seed)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    vis = 0
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i:i + batch_size])
        batch = builder(chunk, ratio, with_answer=False).to(device)
        outs, info = generate(model, batch, tokenizer.eos_id, max_new_tokens=4, method=method,
                              prune_ratio=ratio, generator=gen)
        vis += sum(info["llm_visual_tokens"])
        for s, ids in zip(chunk, outs):
            task = str(s.get("task", "all"))
            ok = normalize_answer(tokenizer.decode(ids)) == normalize_answer(s["answer"])
            correct[task] += int(ok)
            total[task] += 1
    model.train(was_training)
    n = sum(total.values())
    res = {"acc": sum(correct.values()) / max(n, 1), "n": n, "llm_visual_tokens": vis / max(n, 1)}
    for t in sorted(total):
        res[f"acc/{t}"] = correct[t] / total[t]
    return res
