"""Where each frame of a batch belongs. Frames of all videos of a batch are concatenated along
one axis (videos of different lengths side by side); pairing and budgets must never cross a
video boundary (the reference code pairs across videos in a packed batch; we do not)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class FrameLayout:
    lengths: list[int]            # frames per sample (0 = text-only sample)
    is_video: list[bool]          # False: a still image (never pruned) or no visual input
    # groups to prune per sample when set (adaptive budgets); None: the fixed int(G*r*T)
    pruned: Optional[list[int]] = None

    @property
    def num_frames(self) -> int:
        return int(sum(self.lengths))

    @property
    def starts(self) -> list[int]:
        out, s = [], 0
        for n in self.lengths:
            out.append(s)
            s += n
        return out

    def first_frame_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """(F,) True on each sample's first frame."""
        m = torch.zeros(self.num_frames, dtype=torch.bool)
        for s, n in zip(self.starts, self.lengths):
            if n:
                m[s] = True
        return m.to(device)

    def frame_in_video(self, device: torch.device | None = None) -> torch.Tensor:
        """(F,) each frame's index within its own video (0 for first frames and images)."""
        idx = torch.arange(self.num_frames)
        for s, n in zip(self.starts, self.lengths):
            idx[s:s + n] -= s
        return idx.to(device)

    def prev_frame_index(self, device: torch.device | None = None) -> torch.Tensor:
        """(F,) index of the previous frame of the SAME video, -1 for first frames."""
        idx = torch.arange(self.num_frames) - 1
        idx[self.first_frame_mask()] = -1
        return idx.to(device)
