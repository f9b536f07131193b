"""``stts-infer``: answer questions about video files with a trained checkpoint.

    stts-infer --checkpoint runs/digits --video clip.mp4 --question "how many digits are shown ?" \\
               [--prune-ratio 0.5] [--method scorer] [--frames 8] [--visualize kept.png] [--json]

Several ``--video``/``--question`` pairs run as one batch (one question may serve every video).
Frames: T frames spread uniformly over the whole clip (window centres), each scaled to cover and
center-cropped to the model's image size (``data_pipeline.video.read_clip``, the sharding job's
decoder, so inference sees frames prepared exactly like the training shards).
Printed per video: the answer, ViT patches before/after pruning, LLM visual tokens kept; per
batch: the prefill time (ViT + scorer + connector + LLM forward over the prompt, i.e. the time
to the first answer token's logits).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from data_pipeline.errors import VideoReadError
from data_pipeline.video import read_clip
from stts_dist.checkpoint_io import CheckpointLoadError
from stts_dist.console import quiet_known_warnings
from stts_dist.data.batch import SequenceBuilder
from stts_dist.device import DeviceError, resolve_device
from stts_dist.model.generate import generate
from stts_dist.model.vlm import VideoVLM
from stts_dist.ops.groups import ungroup_mask
from stts_dist.stts.selection import METHODS


class InferenceInputError(ValueError):
    """A video or question given to stts-infer is unusable; the message names it."""


# ---------------------------------------------------------------------------------------------
def load_video_frames(path: str | Path, num_frames: int, image_size: int) -> np.ndarray:
    """(T, S, S, 3) uint8: ``num_frames`` frames uniformly over the clip (fewer when the clip is
    shorter), scaled to cover and center-cropped to ``image_size``."""
    if num_frames < 1:
        raise InferenceInputError(f"--frames must be >= 1, got {num_frames}")
    try:
        clip = read_clip(str(path), image_size, fps=0.0, max_frames=num_frames)
    except VideoReadError as e:
        raise InferenceInputError(f"cannot read video {path}: {e}") from None
    return clip.frames


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model: VideoVLM, batch, eos_id: int, max_new_tokens: int,
                   generator: Optional[torch.Generator] = None) -> tuple[list[list[int]], dict, float]:
    """``generate`` (pruning to ``batch.budget``) plus the prefill time in seconds: from the call to
    the end of the LLM's first (whole-prompt) forward, which includes the ViT, scorer, selection
    and connector.

    The first call of ``model.llm.forward_cached`` is the prompt forward; it is wrapped for the
    duration of this call only."""
    llm = model.llm
    device = batch.input_ids.device
    original = llm.forward_cached
    marks: dict[str, float] = {}

    def first_call_timed(*args, **kwargs):
        out = original(*args, **kwargs)
        if "prefill_end" not in marks:
            _sync(device)
            marks["prefill_end"] = time.perf_counter()
        return out

    llm.forward_cached = first_call_timed
    try:
        _sync(device)
        start = time.perf_counter()
        ids, info = generate(model, batch, eos_id, max_new_tokens=max_new_tokens, generator=generator)
    finally:
        del llm.forward_cached  # back to the class method
    return ids, info, marks.get("prefill_end", time.perf_counter()) - start


def vit_patches_per_sample(model: VideoVLM, keep: torch.Tensor, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(patches entering the ViT, patches after the prune point) per sample. keep: (F, G) bool."""
    grid = model.vit.grid
    per_frame = ungroup_mask(keep.to(torch.long), grid, model.cfg.connector.pool_size).sum(1).tolist()
    out, start = [], 0
    for n in lengths:
        out.append((n * grid * grid, int(sum(per_frame[start:start + n]))))
        start += n
    return out


@dataclass
class Answer:
    video: str
    question: str
    answer: str
    frames: int
    method: str
    prune_ratio: float
    vit_patches: int              # entering the ViT
    vit_patches_kept: int         # running through the blocks after the prune point
    llm_tokens_unpruned: int      # G * T
    llm_tokens: int               # G*T - int(G*r*T)
    prefill_s: float              # of the whole batch this video ran in
    batch_size: int
    keep: Any = field(default=None, repr=False)     # (T, G) bool tensor
    scores: Any = field(default=None, repr=False)   # (T, G) float tensor or None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("keep")
        d.pop("scores")
        return d


@torch.no_grad()
def answer_videos(model: VideoVLM, tokenizer, samples: Sequence[dict], method: str, prune_ratio: float,
                  max_new_tokens: int = 8, seed: int = 0) -> list[Answer]:
    """Answer every sample ``{"frames": (T,H,W,3) uint8, "question", "video"}`` in ONE batch, pruned
    by ``method`` at ``prune_ratio`` (fixed budgets; the prompt layout is the model's own)."""
    model.eval()
    device = next(model.parameters()).device
    budget = model.budget.with_setting(method, prune_ratio)
    builder = SequenceBuilder(tokenizer, budget, model.cfg.vit.image_size)
    for s in samples:
        T = int(s["frames"].shape[0])
        try:
            budget.llm_visual_tokens(T, T > 1)
        except ValueError as e:
            raise InferenceInputError(f"{s.get('video', 'video')}: {e}") from None
    batch = builder([dict(s, answer="") for s in samples], with_answer=False).to(device)
    gen = torch.Generator().manual_seed(seed)
    ids, info, prefill = timed_generate(model, batch, tokenizer.eos_id, max_new_tokens, gen)
    lengths = batch.layout.lengths
    patches = vit_patches_per_sample(model, info["keep"], lengths)
    G = budget.groups_per_frame
    out = []
    for i, (s, toks) in enumerate(zip(samples, ids)):
        start, T = batch.layout.starts[i], lengths[i]
        out.append(Answer(
            video=str(s.get("video", "")), question=str(s["question"]), answer=tokenizer.decode(toks), frames=T,
            method=method, prune_ratio=budget.prune_ratio, vit_patches=patches[i][0], vit_patches_kept=patches[i][1],
            llm_tokens_unpruned=G * T, llm_tokens=int(info["llm_visual_tokens"][i]), prefill_s=prefill,
            batch_size=len(samples), keep=info["keep"][start:start + T].cpu(),
            scores=None if info["scores"] is None else info["scores"][start:start + T].detach().cpu()))
    return out


# ---------------------------------------------------------------------------------------------
def _pair_inputs(videos: Sequence[str], questions: Sequence[str]) -> list[tuple[str, str]]:
    if not videos:
        raise InferenceInputError("give at least one --video FILE")
    if not questions:
        raise InferenceInputError("give a --question \"...\" (one for all videos, or one per --video)")
    if len(questions) == 1:
        questions = list(questions) * len(videos)
    if len(questions) != len(videos):
        raise InferenceInputError(f"{len(videos)} --video but {len(questions)} --question: give one question for "
                                  f"all videos or exactly one per video, in the same order")
    for v, q in zip(videos, questions):
        if not q.strip():
            raise InferenceInputError(f"the question for {v} is empty; pass --question \"how many digits are shown ?\"")
    return list(zip(videos, questions))


def visualize_answers(model: VideoVLM, answers: Sequence[Answer], frames: Sequence[np.ndarray], out: str | Path,
                      gif: bool = False) -> list[Path]:
    """One picture per video: ``out`` itself for one video, ``out_<i>.png`` for several."""
    from stts_dist.visualize import kept_tokens_from_result, render_gif, render_kept_tokens

    out = Path(out)
    paths = []
    for i, (a, fr) in enumerate(zip(answers, frames)):
        path = out if len(answers) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
        kept = kept_tokens_from_result(model, a.keep, a.scores)
        title = f"{Path(a.video).name}  method={a.method} prune_ratio={a.prune_ratio:g}  Q: {a.question}  A: {a.answer}"
        paths.append(render_kept_tokens(fr, kept, path, title))
        if gif:
            paths.append(render_gif(fr, kept, path.with_suffix(".gif")))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stts-infer", description="Answer questions about videos with a trained "
                                "stts-dist checkpoint and report the tokens STTS kept.")
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, one step_* folder (1 process, ZeRO or TP x DP) or a consolidated .safetensors")
    p.add_argument("--video", action="append", default=[], help="video file (repeat for a batch)")
    p.add_argument("--question", action="append", default=[], help="question (one for all videos, or one per --video)")
    p.add_argument("--prune-ratio", type=float, default=None, help="fraction of groups pruned (default: the model's)")
    p.add_argument("--method", choices=METHODS, default=None, help="pruning method (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled per video (default: data.num_frames)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the 'random' method")
    p.add_argument("--visualize", default=None, metavar="OUT.png", help="write kept-token pictures")
    p.add_argument("--gif", action="store_true", help="with --visualize: also an animated GIF per video")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint checksum verification")
    return p


def run(argv: Optional[Sequence[str]] = None) -> list[Answer]:
    """The command without exit handling (raises InferenceInputError / CheckpointLoadError)."""
    from stts_dist.trained_model import open_trained_model

    args = build_parser().parse_args(argv)
    pairs = _pair_inputs(args.video, args.question)
    if args.prune_ratio is not None and not 0.0 <= args.prune_ratio < 1.0:
        raise InferenceInputError(f"--prune-ratio {args.prune_ratio} must be in [0, 1) (the fraction pruned)")
    device = resolve_device(args.device, "--device")
    cfg, tokenizer, model, _ = open_trained_model(args.checkpoint, device=device, verify=not args.no_verify)
    T = args.frames or cfg.data.num_frames
    method = args.method or cfg.model.stts.method
    ratio = cfg.model.stts.prune_ratio if args.prune_ratio is None else args.prune_ratio
    frames = [load_video_frames(v, T, cfg.model.vit.image_size) for v, _ in pairs]
    samples = [{"frames": f, "question": q, "video": v, "id": Path(v).stem} for (v, q), f in zip(pairs, frames)]
    answers = answer_videos(model, tokenizer, samples, method, ratio, args.max_new_tokens, args.seed)
    pictures = visualize_answers(model, answers, frames, args.visualize, args.gif) if args.visualize else []
    if args.json:
        print(json.dumps({"answers": [a.to_json() for a in answers], "pictures": [str(p) for p in pictures]}, indent=1))
    else:
        for i, (a, f) in enumerate(zip(answers, frames)):
            short = f" (clip has only {a.frames} frames)" if a.frames < T else ""
            print(f"[{i + 1}/{len(answers)}] {a.video}{short}\n  Q: {a.question}\n  A: {a.answer}\n"
                  f"  frames {a.frames} | ViT patches {a.vit_patches} -> {a.vit_patches_kept} | "
                  f"LLM visual tokens {a.llm_tokens_unpruned} -> {a.llm_tokens} "
                  f"(method {a.method}, prune ratio {a.prune_ratio:g})")
        print(f"prefill {answers[0].prefill_s * 1e3:.1f} ms for a batch of {len(answers)} on {device.type} "
              f"(ViT + scorer + connector + LLM prompt forward)")
        for p in pictures:
            print(f"picture: {p}")
    return answers


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_known_warnings()

    try:
        run(argv)
    except (InferenceInputError, DeviceError, CheckpointLoadError) as e:
        raise SystemExit(f"stts-infer: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
