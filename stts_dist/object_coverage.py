"""What a pruning method keeps, measured against where the objects really are.

The moving-digits generator knows every digit's pixels in every frame (``sample["objects"]``), so
a kept-group mask can be scored directly instead of by eye:

- **object recall**: of the groups of frames >= 1 that hold part of an object, the share kept;
- **object precision**: of the kept groups of frames >= 1, the share that hold part of an object;
- **object coverage per frame**: of the (object, frame >= 1) pairs where the object is visible,
  the share with at least one of that object's groups kept;
- **object coverage per clip**: of the objects visible in some frame >= 1, the share with at least
  one kept group in some frame >= 1;
- **frame coverage**: of the frames >= 1, the share that keep at least one group;
- **budget split**: kept groups in the (always kept) first frame vs in frames >= 1.

Frame 0 is left out of the object figures because every method keeps it whole. A group "holds
part of an object" when at least one pixel of the digit's stroke (the generator's mask: sprite
alpha > ``digits.STROKE_ALPHA``) falls in its ``(patch * pool)``-pixel square. Plain numpy; sums add over samples and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np


def object_group_masks(objects: dict[str, Any], num_frames: int, image_size: int, patch_size: int,
                       pool_size: int) -> np.ndarray:
    """``objects``: ``{"masks": bool (n, px, px), "positions": int (n, T, 2) top-left (y, x),
    "visible": bool (n, T)}`` as written by ``stts_dist.data.digits.make_sample``.

    Returns bool ``(n, T, G)``: group j of frame t holds part of object i. Groups follow the
    model's layout: the patch grid ``image_size // patch_size`` padded up to a multiple of
    ``pool_size``, row-major; pixels outside the patch grid belong to no group."""
    masks = np.asarray(objects["masks"], dtype=bool)
    pos = np.asarray(objects["positions"])
    visible = np.asarray(objects["visible"], dtype=bool)
    n = masks.shape[0]
    grid = image_size // patch_size
    gside = -(-grid // pool_size)
    cell = patch_size * pool_size
    covered = grid * patch_size                   # pixels the patch grid sees
    out = np.zeros((n, num_frames, gside * gside), dtype=bool)
    for i in range(n):
        ys, xs = np.nonzero(masks[i])
        for t in range(min(num_frames, pos.shape[1])):
            if not visible[i, t]:
                continue
            py, px = ys + int(pos[i, t, 0]), xs + int(pos[i, t, 1])
            inside = (py < covered) & (px < covered)
            out[i, t, (py[inside] // cell) * gside + px[inside] // cell] = True
    return out


@dataclass
class CoverageCounts:
    """Sums over samples (and ranks); the ratios are properties."""
    object_groups: int = 0          # object-bearing groups, frames >= 1
    object_groups_kept: int = 0     # ... of them kept
    kept_groups: int = 0            # kept groups, frames >= 1
    object_frames: int = 0          # (object, frame >= 1) pairs with the object visible
    object_frames_covered: int = 0  # ... with >= 1 of its groups kept
    objects: int = 0                # objects visible in some frame >= 1
    objects_covered: int = 0        # ... with >= 1 kept group in some frame >= 1
    frames: int = 0                 # frames >= 1
    frames_covered: int = 0         # ... keeping >= 1 group
    first_frame_kept: int = 0       # kept groups of frame 0
    videos: int = 0

    def add(self, other: "CoverageCounts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: list[int]) -> "CoverageCounts":
        return cls(*[int(v) for v in values])

    def metrics(self) -> dict[str, float]:
        """The figures of the module docstring; NaN where nothing was counted."""
        def ratio(a: int, b: int) -> float:
            return a / b if b else float("nan")
        return {
            "obj_recall": ratio(self.object_groups_kept, self.object_groups),
            "obj_precision": ratio(self.object_groups_kept, self.kept_groups),
            "obj_coverage_frame": ratio(self.object_frames_covered, self.object_frames),
            "obj_coverage_clip": ratio(self.objects_covered, self.objects),
            "frame_coverage": ratio(self.frames_covered, self.frames),
            "kept_first_frame": ratio(self.first_frame_kept, self.videos),
            "kept_later_frames": ratio(self.kept_groups, self.videos),
        }


def count_coverage(keep: np.ndarray, object_masks: np.ndarray) -> CoverageCounts:
    """keep: bool ``(T, G)`` kept groups of one video; object_masks: bool ``(n, T, G)``."""
    keep = np.asarray(keep, dtype=bool)
    obj = np.asarray(object_masks, dtype=bool)
    if obj.ndim != 3 or obj.shape[1:] != keep.shape:
        raise ValueError(f"object masks {obj.shape} do not match the keep mask {keep.shape} as (n, T, G)")
    later_keep = keep[1:]                                   # (T-1, G)
    later_obj = obj[:, 1:]                                  # (n, T-1, G)
    any_obj = later_obj.any(axis=0)                         # (T-1, G)
    kept_obj = later_obj & later_keep[None]                 # (n, T-1, G)
    visible = later_obj.any(axis=2)                         # (n, T-1)
    covered = kept_obj.any(axis=2)                          # (n, T-1)
    return CoverageCounts(
        object_groups=int(any_obj.sum()),
        object_groups_kept=int((any_obj & later_keep).sum()),
        kept_groups=int(later_keep.sum()),
        object_frames=int(visible.sum()),
        object_frames_covered=int(covered.sum()),
        objects=int(visible.any(axis=1).sum()),
        objects_covered=int(covered.any(axis=1).sum()),
        frames=int(later_keep.shape[0]),
        frames_covered=int(later_keep.any(axis=1).sum()),
        first_frame_kept=int(keep[0].sum()) if keep.shape[0] else 0,
        videos=1,
    )


def sample_coverage(sample: dict, keep: np.ndarray, image_size: int, patch_size: int,
                    pool_size: int) -> Optional[CoverageCounts]:
    """Counts of one sample, or None when the sample carries no object annotations (any data but
    the generated digits)."""
    objects = sample.get("objects")
    if objects is None:
        return None
    masks = object_group_masks(objects, keep.shape[0], image_size, patch_size, pool_size)
    return count_coverage(keep, masks)
