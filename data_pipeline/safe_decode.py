"""Allow-list decoding of shard members.

WebDataset's generic ``.decode()`` unpickles ``.pyd``/``.pickle`` members, so a crafted shard
could run code in every loader worker. This module decodes only what the project writes --
``NNN.jpg``/``NNN.jpeg``/``NNN.png`` frames (PIL, format pinned), ``NNN.npy`` frames
(``allow_pickle=False``), ``.json`` and ``.txt`` -- and rejects any other member by name before
reading it. :func:`decode_sample` also works as a stage of a stock WebDataset pipeline:
``wds.DataPipeline(..., wds.tarfile_to_samples(), wds.map(decode_sample))``.
"""
from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from data_pipeline.errors import ShardFormatError, UnsafeMemberError

# "<key>.<ext>" with ext = json | txt | NNN.(jpg|jpeg|png|npy). Keys: no dots, no path separators.
MEMBER_RE = re.compile(r"^(?P<key>[A-Za-z0-9_\-]+)\.(?P<ext>json|txt|\d{3}\.(?:jpg|jpeg|png|npy))$")
_IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}


def check_member_name(shard: str, name: str) -> tuple[str, str]:
    """``(key, ext)`` of an allowed member; :class:`UnsafeMemberError` naming shard and member otherwise."""
    m = MEMBER_RE.match(name)
    if m is None:
        raise UnsafeMemberError(
            f"shard {shard}: member '{name}' is not a type this project writes (allowed: <key>.json, <key>.txt, "
            "<key>.NNN.jpg|jpeg|png|npy); refusing to load the shard. Pickled members (.pyd, .pickle, .pth) "
            "can execute code when decoded; rebuild the shard with python -m data_pipeline.build_shards")
    return m.group("key"), m.group("ext")


def decode_member(shard: str, name: str, ext: str, data: bytes) -> Any:
    """Decode one allowed member. Frames -> (H, W, 3) uint8; json -> object; txt -> str."""
    try:
        if ext == "json":
            return json.loads(data.decode("utf-8"))
        if ext == "txt":
            return data.decode("utf-8")
        suffix = ext.rsplit(".", 1)[1]
        if suffix == "npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"expected a (H, W, 3) uint8 frame, got {arr.dtype} {arr.shape}")
            return arr
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=[_IMAGE_FORMATS[suffix]]) as img:
            return np.asarray(img.convert("RGB"))
    except UnsafeMemberError:
        raise
    except Exception as e:
        raise ShardFormatError(f"shard {shard}: member '{name}' is corrupt ({type(e).__name__}: {e}); "
                               "rebuild the shard") from None


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """WebDataset-style raw sample (``__key__``, ``__url__``, ``<ext>: bytes``) -> decoded dict with
    ``frames`` (T, H, W, 3) uint8 in member order, plus ``json``/``txt`` when present. Every member
    name is checked before any member is decoded."""
    shard = str(sample.get("__url__", "?"))
    key = str(sample.get("__key__", "?"))
    exts = [k for k in sample if not k.startswith("__")]
    for ext in exts:
        check_member_name(shard, f"{key}.{ext}")
    out: dict[str, Any] = {"__key__": key, "__url__": shard}
    frame_exts = sorted(e for e in exts if e not in ("json", "txt"))
    frames = [decode_member(shard, f"{key}.{e}", e, sample[e]) for e in frame_exts]
    if frames:
        if len({f.shape for f in frames}) != 1:
            raise ShardFormatError(f"shard {shard}: sample '{key}' has frames of different sizes")
        out["frames"] = np.stack(frames)
    for ext in ("json", "txt"):
        if ext in sample:
            out[ext] = decode_member(shard, f"{key}.{ext}", ext, sample[ext])
    return out
