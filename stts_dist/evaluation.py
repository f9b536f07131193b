"""Exact-match accuracy of a model on QA samples, per task and overall: the engine shared by the
trainer's evaluation and ``stts-eval`` (one setting = a method at a ratio and frame count, run
over this rank's samples into a :class:`Tally`; tallies summed over data-parallel ranks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from stts_dist.data.batch import SequenceBuilder
from stts_dist.heldout import EvalError
from stts_dist.infer import timed_generate, vit_patches_per_sample
from stts_dist.model.vlm import VideoVLM
from stts_dist.object_coverage import CoverageCounts, sample_coverage


@dataclass(frozen=True)
class Setting:
    method: str
    prune_ratio: float
    frames: int
    kind: str                     # baseline | sweep | tts | adaptive

    @property
    def label(self) -> str:
        if self.kind == "adaptive":
            return f"{self.method}@{self.prune_ratio:g} adaptive"
        if self.kind == "tts":
            return f"{self.method}@{self.prune_ratio:.4g} tts {self.frames}f"
        return f"{self.method}@{self.prune_ratio:g}"


# ---------------------------------------------------------------------------------------------
# Where the samples come from. Every source gives this rank's share of the samples as dicts
# {"frames": (T,H,W,3) uint8, "question", "answer", "id", "task"} and the global task list.
def task_of(sample: dict) -> str:
    return str(sample.get("task") or "all")


# ---------------------------------------------------------------------------------------------
# Running one setting on this rank's samples
@dataclass
class Tally:
    """Sums of one setting on one rank (summed over ranks afterwards)."""
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    llm_tokens: int = 0
    llm_tokens_unpruned: int = 0
    vit_patches: int = 0
    vit_patches_kept: int = 0
    frames: int = 0
    prefill_s: list[float] = field(default_factory=list)
    coverage: CoverageCounts = field(default_factory=CoverageCounts)   # samples with object annotations


def _answer_tokens(tokenizer, samples: Sequence[dict]) -> int:
    # The longest reference answer plus one (for eos): a longer output cannot match anyway.
    return max(len(tokenizer.encode(str(s["answer"]))) for s in samples) + 1


@torch.no_grad()
def run_setting(model, tokenizer, samples: Sequence[dict], setting: Setting, batch_size: int, seed: int,
                max_new_tokens: int = 0, autocast: Any = None, adaptive_strength: Optional[float] = None) -> Tally:
    """One setting over ``samples``: the model's budget (geometry, prompt layout) at the setting's
    method and ratio, with adaptive per-video budgets when ``adaptive_strength`` is given."""
    budget = model.budget.with_setting(setting.method, setting.prune_ratio, adaptive_strength)
    builder = SequenceBuilder(tokenizer, budget, model.cfg.vit.image_size)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    tally = Tally()
    G = budget.groups_per_frame
    image_size, patch, pool = model.cfg.vit.image_size, model.cfg.vit.patch_size, model.cfg.connector.pool_size
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i:i + batch_size])
        try:
            batch = builder(chunk, with_answer=False).to(device)
        except ValueError as e:
            raise EvalError(f"{setting.label}: samples {[s.get('id') for s in chunk][:4]}...: {e}") from None
        new = max_new_tokens or _answer_tokens(tokenizer, chunk)
        if autocast is not None:
            with autocast:
                ids, info, seconds = timed_generate(model, batch, tokenizer.eos_id, new, gen)
        else:
            ids, info, seconds = timed_generate(model, batch, tokenizer.eos_id, new, gen)
        tally.prefill_s.append(seconds)
        patches = vit_patches_per_sample(model, info["keep"], batch.layout.lengths)
        keep = info["keep"].cpu().numpy()
        for s, start, T in zip(chunk, batch.layout.starts, batch.layout.lengths):
            counts = sample_coverage(s, keep[start:start + T], image_size, patch, pool)
            if counts is not None:
                tally.coverage.add(counts)
        for s, out, (before, after), n_vis, T in zip(chunk, ids, patches, info["llm_visual_tokens"],
                                                     batch.layout.lengths):
            task = task_of(s)
            ok = normalize_answer(tokenizer.decode(out)) == normalize_answer(s["answer"])
            tally.correct[task] = tally.correct.get(task, 0) + int(ok)
            tally.total[task] = tally.total.get(task, 0) + 1
            tally.llm_tokens += int(n_vis)
            tally.llm_tokens_unpruned += G * T
            tally.vit_patches += before
            tally.vit_patches_kept += after
            tally.frames += T
    return tally


def reduce_tallies(tallies: list[Tally], tasks: list[str], world: int) -> list[Tally]:
    """Sum every rank's tallies (gloo all_reduce) and gather their batch timings."""
    if world <= 1:
        return tallies
    import torch.distributed as dist
    counts = torch.tensor([[t.correct.get(k, 0) for k in tasks] + [t.total.get(k, 0) for k in tasks] +
                           [t.llm_tokens, t.llm_tokens_unpruned, t.vit_patches, t.vit_patches_kept, t.frames]
                           + t.coverage.as_list() for t in tallies], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    times: list[Any] = [None] * world
    dist.all_gather_object(times, [t.prefill_s for t in tallies])
    out = []
    n = len(tasks)
    for j, row in enumerate(counts.round().long().tolist()):
        out.append(Tally({k: row[i] for i, k in enumerate(tasks)}, {k: row[n + i] for i, k in enumerate(tasks)},
                         row[2 * n], row[2 * n + 1], row[2 * n + 2], row[2 * n + 3], row[2 * n + 4],
                         [s for rank_times in times for s in rank_times[j]], CoverageCounts.from_list(row[2 * n + 5:])))
    return out


def normalize_answer(text: str) -> str:
    return " ".join(str(text).lower().split())


def evaluate(model: VideoVLM, tokenizer, samples: Sequence[dict], method: str, prune_ratio: float,
             batch_size: int = 16, seed: int = 0, adaptive_strength: Optional[float] = None, rank: int = 0,
             world: int = 1) -> dict[str, float]:
    """Returns ``{"acc": overall, "acc/<task>": per task, "n": count, "llm_visual_tokens": mean}``
    and, where objects are annotated, the coverage figures (``object_coverage``): the training
    loop's summary of one ``stts-eval`` setting, on the model's device.

    ``world > 1``: this rank evaluates ``samples[rank::world]`` and the counts are summed over the
    default process group (every rank must call this with the same samples; ``len(samples)``
    must be a multiple of ``world`` so every rank runs the same number of batches)."""
    if world > 1:
        if len(samples) % world:
            raise ValueError(f"{len(samples)} eval samples cannot be split evenly over {world} ranks")
        tasks = sorted({task_of(s) for s in samples})
        samples = list(samples)[rank::world]
    was_training = model.training
    model.eval()
    frames = max((int(s["frames"].shape[0]) for s in samples if s.get("frames") is not None), default=0)
    try:
        tally = run_setting(model, tokenizer, samples, Setting(method, prune_ratio, frames, "sweep"), batch_size, seed,
                            max_new_tokens=4, adaptive_strength=adaptive_strength)
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
