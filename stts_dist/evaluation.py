"""Exact-match accuracy of a model on QA samples, per task and overall."""
from __future__ import annotations

from typing import Optional, Sequence

from stts_dist.model.vlm import VideoVLM


def normalize_answer(text: str) -> str:
    return " ".join(str(text).lower().split())


def evaluate(model: VideoVLM, tokenizer, samples: Sequence[dict], method: str, prune_ratio: float,
             batch_size: int = 16, seed: int = 0, frame_separators: Optional[bool] = None,
             adaptive_strength: Optional[float] = None, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Returns ``{"acc": overall, "acc/<task>": per task, "n": count, "llm_visual_tokens": mean}``
    and, where objects are annotated, the coverage figures (``object_coverage``): the training
    loop's summary of one ``stts-eval`` setting, on the model's device.

    ``world > 1``: this rank evaluates ``samples[rank::world]`` and the counts are summed over the
    default process group (every rank must call this with the same samples; ``len(samples)``
    must be a multiple of ``world`` so every rank runs the same number of batches)."""
    from stts_dist.eval import Setting, reduce_tallies, run_setting, task_of
    if world > 1:
        if len(samples) % world:
            raise ValueError(f"{len(samples)} eval samples cannot be split evenly over {world} ranks")
        tasks = sorted({task_of(s) for s in samples})
        samples = list(samples)[rank::world]
    was_training = model.training
    model.eval()
    ratio = 0.0 if method == "none" else prune_ratio
    frames = max((int(s["frames"].shape[0]) for s in samples if s.get("frames") is not None), default=0)
    try:
        tally = run_setting(model, tokenizer, samples, Setting(method, ratio, frames, "sweep"), batch_size, seed,
                            frame_separators, max_new_tokens=4, adaptive_strength=adaptive_strength)
    finally:
        model.train(was_training)
    if world > 1:
        tally = reduce_tallies([tally], tasks, world)[0]
    n = sum(tally.total.values())
    res = {"acc": sum(tally.correct.values()) / max(n, 1), "n": n, "llm_visual_tokens": tally.llm_tokens / max(n, 1)}
    for t in sorted(tally.total):
        res[f"acc/{t}"] = tally.correct[t] / tally.total[t]
    if tally.coverage.videos:   # where the objects are known (the digits task): what the method kept
        res.update(tally.coverage.metrics())
    return res
