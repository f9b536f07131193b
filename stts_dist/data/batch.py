"""From samples to a model batch: frames concatenated, prompts with exactly the reserved number
of visual placeholders, packed token sequences with answer-only labels.

Prompt layout per sample (``<video>`` repeated ``TokenBudget.prompt_visual_span(T)`` times: the
deterministic visual token count, plus one ``<frame>`` per frame when separators are on):

    <bos> <user> <video>*n question-words <assistant> | answer-words <eos>

and, in training, every follow-up turn of the conversation (a manifest's ``turns``) after it:

    <user> question-words <assistant> | answer-words <eos>

Labels are next-token targets on the answer parts only (every turn's answer and its ``<eos>``).
A sample with its answers is therefore ``SPECIAL_TOKENS + span + TURN_TOKENS * follow-up turns +
the words of every question and answer`` tokens long, which the balancer budgets from metadata.
Generation (``with_answer=False``) asks the first question.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from stts_dist.stts.budget import TokenBudget
from stts_dist.stts.layout import FrameLayout

IGNORE = -100
SPECIAL_TOKENS = 4        # <bos> <user> <assistant> <eos> of the layout above
TURN_TOKENS = 3           # <user> <assistant> <eos> of each follow-up turn


def follow_up_turns(sample: dict) -> list[tuple[str, str]]:
    """The sample's follow-up ``(question, answer)`` turns: a shard record's ``turns`` (dicts) or
    a manifest entry's (pairs); none for a single question."""
    turns = sample.get("turns") or []
    return [(str(t["question"]), str(t["answer"])) if isinstance(t, dict) else (str(t[0]), str(t[1])) for t in turns]


@dataclass
class VideoBatch:
    frames: torch.Tensor              # (F, 3, H, W) float in [-1, 1]
    layout: FrameLayout
    input_ids: torch.Tensor           # (total,) long, packed sequences
    labels: torch.Tensor              # (total,) long, IGNORE except answer targets
    positions: torch.Tensor           # (total,) long, restart at 0 per sequence
    seq_lengths: list[int]            # tokens per sample
    visual_tokens: list[int]          # visual placeholders (excl. separators) per sample
    budget: TokenBudget               # the setting the placeholders were reserved for; the model prunes to it
    ids: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.seq_lengths)

    def to(self, device: torch.device) -> "VideoBatch":
        for name in ("frames", "input_ids", "labels", "positions"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


class SequenceBuilder:
    """Collates sample dicts ``{"frames": uint8 (T,H,W,3) or None, "question", "answer", "id",
    "task"}`` into a :class:`VideoBatch` whose prompts reserve the visual tokens of ``budget``
    (frames of ``image_size`` pixels square). With ``budget.adaptive_strength`` set, each video's
    count is its share of the batch's fixed-rule total by pixel novelty (see stts/adaptive.py)."""

    def __init__(self, tokenizer: Any, budget: TokenBudget, image_size: int):
        self.tok = tokenizer
        self.budget = budget
        self.image_size = image_size

    def _adaptive_pruned(self, samples: Sequence[dict]) -> Optional[list[int]]:
        b = self.budget
        if b.adaptive_strength is None or b.prune_ratio <= 0:
            return None
        from stts_dist.stts.adaptive import adaptive_budgets, pixel_novelty
        frames = [0 if s.get("frames") is None else int(s["frames"].shape[0]) for s in samples]
        novelty = [pixel_novelty(np.asarray(s["frames"])) if t > 1 else 0.0 for s, t in zip(samples, frames)]
        return adaptive_budgets(novelty, frames, b.groups_per_frame, b.prune_ratio, strength=b.adaptive_strength)

    def __call__(self, samples: Sequence[dict], with_answer: bool = True) -> VideoBatch:
        budget = self.budget
        frames, lengths, is_video = [], [], []
        ids, labels, seq_lengths, vis_counts = [], [], [], []
        pruned = self._adaptive_pruned(samples)
        for k, s in enumerate(samples):
            fr = s.get("frames")
            T = 0 if fr is None else int(fr.shape[0])
            if T:
                if fr.ndim != 4 or fr.shape[1] != self.image_size or fr.shape[2] != self.image_size or fr.shape[3] != 3:
                    raise ValueError(f"sample {s.get('id')}: frames have shape {tuple(fr.shape)}, expected "
                                     f"(T, {self.image_size}, {self.image_size}, 3); re-shard at model.vit.image_size")
                frames.append(torch.as_tensor(np.ascontiguousarray(fr)))
            video = T > 1
            lengths.append(T)
            is_video.append(video)
            if not T:
                n_vis = 0
            elif pruned is not None:
                n_vis = budget.groups_per_frame * T - pruned[k]
            else:
                n_vis = budget.llm_visual_tokens(T, video)
            vis_counts.append(n_vis)
            span = n_vis + budget.separator_tokens(T)
            prompt = [self.tok.bos_id, self.tok.user_id] + [self.tok.video_id] * span + \
                self.tok.encode(str(s["question"])) + [self.tok.assistant_id]
            seq = list(prompt)
            answer_spans = []                     # [start, end) of each answer (+ <eos>) in seq
            if with_answer:
                turns = [(None, str(s["answer"]))] + follow_up_turns(s)
                for turn, (question, answer) in enumerate(turns):
                    if turn:
                        seq += [self.tok.user_id] + self.tok.encode(question) + [self.tok.assistant_id]
                    start = len(seq)
                    seq += self.tok.encode(answer) + [self.tok.eos_id]
                    answer_spans.append((start, len(seq)))
            lab = [IGNORE] * len(seq)
            for start, end in answer_spans:
                for i in range(start - 1, end - 1):
                    lab[i] = seq[i + 1]
            ids.append(seq)
            labels.append(lab)
            seq_lengths.append(len(seq))
        fr = torch.cat(frames) if frames else torch.zeros(0, self.image_size, self.image_size, 3, dtype=torch.uint8)
        fr = fr.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return VideoBatch(
            frames=fr, layout=FrameLayout(lengths, is_video, pruned),
            input_ids=torch.tensor([t for seq in ids for t in seq], dtype=torch.long),
            labels=torch.tensor([t for seq in labels for t in seq], dtype=torch.long),
            positions=torch.cat([torch.arange(n) for n in seq_lengths]) if seq_lengths else torch.zeros(0, dtype=torch.long),
            seq_lengths=seq_lengths, visual_tokens=vis_counts, budget=budget,
            ids=[str(s.get("id", i)) for i, s in enumerate(samples)],
            tasks=[str(s.get("task", "")) for s in samples],
            answers=[str(s.get("answer", "")) for s in samples])
