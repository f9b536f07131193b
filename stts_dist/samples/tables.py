"""What the balancer sees of a dataset: one :class:`~stts_dist.balance.SampleTable` row per
dataset row, from metadata alone (no frame is rendered or decoded).

Token counts come from the run's :class:`~stts_dist.stts.budget.TokenBudget`: LLM visual tokens
``G*T - int(G*r*T)`` plus every other token of the packed sequence (the sequence builder's
``SPECIAL_TOKENS``, every question and answer, ``TURN_TOKENS`` per follow-up turn, one separator
per frame when enabled).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from stts_dist.balance import SampleTable
from stts_dist.data.batch import SPECIAL_TOKENS, TURN_TOKENS
from stts_dist.data.digits import ANSWERS, FOLLOW_UPS, QUESTIONS, clip_task
from stts_dist.samples.readers import DigitsDataset
from stts_dist.stts.budget import TokenBudget


def visual_tokens(budget: TokenBudget, frames: np.ndarray) -> np.ndarray:
    """LLM visual tokens per sample, shape ``(n,)``: ``budget.llm_visual_tokens`` itself,
    evaluated once per distinct frame count (so the rounding is exactly the builder's)."""
    frames = np.asarray(frames, dtype=np.int64)
    distinct, inverse = np.unique(frames, return_inverse=True)
    per_t = np.array([budget.llm_visual_tokens(int(t), int(t) > 1) for t in distinct.tolist()], dtype=np.int64)
    return per_t[inverse.reshape(-1)]


def sample_table(budget: TokenBudget, frames: np.ndarray, text_tokens: np.ndarray,
                 turns: Optional[np.ndarray] = None) -> SampleTable:
    """What the planner sees of samples with ``frames`` (n,) frames, ``text_tokens`` (n,) tokens of
    every question and answer (specials excluded) and ``turns`` (n,) follow-up turns (None: none):
    rows ``0..n-1``, the text column counting every non-visual token of the packed sequence
    (specials, each follow-up turn's ``TURN_TOKENS`` and the frame separators included)."""
    frames = np.asarray(frames, dtype=np.int64)
    other = np.asarray(text_tokens, dtype=np.int64) + SPECIAL_TOKENS + budget.separator_tokens(frames)
    if turns is not None:
        other = other + TURN_TOKENS * np.asarray(turns, dtype=np.int64)
    n = len(frames)
    return SampleTable(index=np.arange(n), frames=frames, patches_per_frame=np.full(n, budget.patches_per_frame),
                       groups_per_frame=np.full(n, budget.groups_per_frame),
                       llm_visual_tokens=visual_tokens(budget, frames), text_tokens=other, is_video=frames > 1)


def _digits_tasks(dataset: DigitsDataset) -> list[str]:
    """The task of every sample, without rendering a frame (``stts_dist.data.digits.clip_task``)."""
    return [clip_task(i, dataset.seed, dataset.tasks, dataset.split) for i in range(len(dataset))]


def digits_text_tokens(dataset: DigitsDataset, tokenizer: Any, tasks: Optional[list[str]] = None) -> np.ndarray:
    """Question + answer tokens of every digits sample, follow-up turn included, shape
    ``(len(dataset),)``, without rendering a frame: each task has a fixed question (and follow-up
    question) and one-word answers. ``tasks``: every sample's task when the caller has them. The
    balanced split checks every collated batch against these counts."""
    per_task = {}
    for task in dataset.tasks:
        answer = max(len(tokenizer.encode(a)) for a in ANSWERS[task])
        per_task[task] = len(tokenizer.encode(QUESTIONS[task])) + answer
        if task in dataset.follow_ups:    # answered with a digit as well
            per_task[task] += len(tokenizer.encode(FOLLOW_UPS[task])) + answer
    return np.asarray([per_task[task] for task in tasks or _digits_tasks(dataset)], dtype=np.int64)


def digits_table(budget: TokenBudget, dataset: DigitsDataset, tokenizer: Any) -> SampleTable:
    """:func:`sample_table` of the in-memory digits (frame counts from ``clip_frames``; one
    follow-up turn for the samples whose task is in ``dataset.follow_ups``)."""
    frames = np.fromiter((dataset.frames_for(i) for i in range(len(dataset))), np.int64, len(dataset))
    tasks = _digits_tasks(dataset)
    turns = np.fromiter((task in dataset.follow_ups for task in tasks), np.int64, len(tasks))
    return sample_table(budget, frames, digits_text_tokens(dataset, tokenizer, tasks), turns)
