"""A fixed code of *when* a visual token was seen: sinusoids of its frame's index in its video.

Visual tokens reach the LLM packed in (frame, group) order; after pruning a frame keeps a handful
of tokens, so nothing but the count of ``<frame>`` separators (when on) tells the LLM which frame a
token came from. Adding this code to each token states it. It has no parameters, so it holds for
any number of frames (test-time scaling at 2x frames included) and checkpoints without it load.
"""
from __future__ import annotations

import torch

BASE = 100.0    # wavelengths from 2*pi to 2*pi*BASE frames: every pair of dimensions varies over a clip


def frame_time_encoding(frame_index: torch.Tensor, dim: int, base: float = BASE) -> torch.Tensor:
    """frame_index: (K,) integer frame index of each token within its video. Returns (K, dim)
    float32: ``sin(t / base^(2i/dim))`` in the first half of the dimensions, ``cos`` in the second
    (``dim`` odd: the last dimension is zero)."""
    half = dim // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32, device=frame_index.device) / max(half, 1))
    angle = frame_index.to(torch.float32)[:, None] * freq[None, :]
    code = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if code.shape[1] < dim:
        code = torch.nn.functional.pad(code, (0, dim - code.shape[1]))
    return code
