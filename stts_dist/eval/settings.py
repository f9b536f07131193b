"""What ``stts-eval`` evaluates: the settings planned from the command-line options.

- ``none@0``: the unpruned baseline (always first; the speed-up column is relative to it);
- every pruning method at every ratio > 0 (ratio 0 is the baseline for every method);
- test-time scaling (factor k > 1): every pruning method at ``k*T`` frames with the ratio set so
  the LLM sees exactly ``G*T`` visual tokens per video (:func:`ratio_for_budget`);
- adaptive budgets: each sweep setting once more with per-video budgets (kind "adaptive").
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from stts_dist.evaluation import Setting
from stts_dist.heldout import EvalError
from stts_dist.stts.budget import llm_visual_tokens, pruned_groups
from stts_dist.stts.selection import METHODS

DEFAULT_RATIOS = "0,0.3,0.5,0.7,0.8"
DEFAULT_METHODS = "scorer,random,uniform,temporal_diff,none"


def ratio_for_budget(groups: int, frames: int, kept: int) -> float:
    """The prune ratio r for which a ``frames``-frame video keeps exactly ``kept`` LLM tokens
    (``G*F - int(G*r*F) == kept``), computed with the same float expression as the budget."""
    target = groups * frames - kept
    if not 0 <= target <= groups * (frames - 1):
        raise EvalError(f"cannot keep {kept} of {groups * frames} tokens of a {frames}-frame video while keeping "
                        f"its first frame ({groups} tokens) whole")
    r = target / (groups * frames)
    for _ in range(64):
        got = pruned_groups(groups, frames, r) if r > 0 else 0
        if got == target:
            return r
        r = math.nextafter(r, 1.0 if got < target else 0.0)
    raise AssertionError(f"no float ratio gives {target} pruned groups of {groups}x{frames}")  # pragma: no cover


def plan_settings(methods: Sequence[str], ratios: Sequence[float], frames: int, groups: int,
                  tts_factor: float, adaptive: bool = False) -> tuple[list[Setting], list[str]]:
    """(settings in evaluation order, notes on skipped ones). ``adaptive``: each sweep setting
    also once with adaptive per-video budgets (kind "adaptive")."""
    settings = [Setting("none", 0.0, frames, "baseline")]
    notes = []
    pruning = [m for m in methods if m != "none"]
    for m in pruning:
        for r in ratios:
            if r <= 0:
                continue
            try:
                llm_visual_tokens(groups, frames, r, frames > 1)
            except ValueError:
                notes.append(f"{m}@{r:g} skipped: it would prune {int(groups * r * frames)} of {groups * frames} "
                             f"groups of a {frames}-frame video, but the first frame ({groups}) is always kept")
                continue
            settings.append(Setting(m, r, frames, "sweep"))
            if adaptive:
                settings.append(Setting(m, r, frames, "adaptive"))
    if tts_factor and tts_factor > 1 and pruning:
        tts_frames = int(round(tts_factor * frames))
        r = ratio_for_budget(groups, tts_frames, groups * frames)
        settings += [Setting(m, r, tts_frames, "tts") for m in pruning]
    return settings, notes


def plan_for_source(source: Any, methods: Sequence[str], ratios: Sequence[float], groups: int, frames: int,
                    tts_factor: float, adaptive: bool = False,
                    requested_frames: Optional[int] = None) -> tuple[list[Setting], int, float, list[str]]:
    """:func:`plan_settings` for a held-out source (``stts_dist/heldout.py``) at ``frames`` per
    video: shards fix the frames (``--frames`` = ``requested_frames`` and test-time scaling are
    then ignored with a note), and ratios are checked against the source's shortest video.
    Returns (settings, frames per video, test-time scaling factor used, notes)."""
    notes: list[str] = []
    tts = tts_factor
    if source.fixed_frames:
        frames = source.frames
        if requested_frames and requested_frames != frames:
            notes.append(f"--frames {requested_frames} ignored: the shards hold {frames} frames per video (median)")
        if tts and tts > 1:
            notes.append("test-time scaling skipped: shards hold the frames sampled at sharding time; "
                         "evaluate a manifest (manifest:FILE) to sample more frames")
            tts = 0
    check_frames = getattr(source, "min_video_frames", frames)
    settings, skipped = plan_settings(methods, ratios, check_frames, groups, tts, adaptive=adaptive)
    if check_frames != frames:
        settings = [Setting(s.method, s.prune_ratio, frames, s.kind) for s in settings]
    return settings, frames, tts, notes + skipped


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{name} '{text}' must be comma-separated numbers, e.g. {DEFAULT_RATIOS}") from None
    for v in values:
        if not 0.0 <= v < 1.0:
            raise EvalError(f"{name} entry {v} must be in [0, 1) (the fraction of visual tokens pruned)")
    return values


def parse_methods(text: str) -> list[str]:
    methods = [m.strip().replace("-", "_") for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EvalError(f"--methods '{text}': unknown {bad or 'empty list'}; choose from {','.join(METHODS)}")
    return list(dict.fromkeys(methods))
