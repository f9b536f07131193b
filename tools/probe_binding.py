#!/usr/bin/env python
"""Does a trained digits model know *which digit is where*? Two measurements on held-out clips.

    .venv/bin/python tools/probe_binding.py --checkpoint runs/default [--clips 200] [--probe-clips 240]

1. **Picking among the clip's digits** (one JSON line per task, unpruned and at the model's own
   STTS setting): every held-out clip of
   the task is asked its question; ``in_clip`` is the share of answers naming a digit of the clip,
   ``acc_given_in_clip`` the share of those that are right. "direction" and "corner" clips show two
   digits and "last" clips three: a model that tells which digits are in a clip but not where or
   when each one is answers right 1/2 and 1/3 of the time it names one of them.
2. **Linear probes on the visual tokens** (one JSON line, unpruned): a softmax regression from the
   tokens the LLM receives (the connector's output, one per 2x2 group) to each token's group row,
   group column and frame, and to the digit the group holds (groups holding part of exactly one
   digit), fitted on 2/3 of the clips and scored on the rest, next to the majority class. A token
   that cannot say where it is or which digit it shows cannot be bound to a position by the LLM.

3. ``--stage0 <folder>`` instead: the same row and digit probes on a stage-0 ViT folder
   (``data/vit_digits_<key>``), block by block (each 2x2 group's mean patch feature), to see where
   in the ViT position and digit identity are lost.

docs/stts.md rows 18-20 use it.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stts_dist.data.batch import SequenceBuilder  # noqa: E402
from stts_dist.data.digits import make_sample  # noqa: E402
from stts_dist.model.generate import generate  # noqa: E402
from stts_dist.object_coverage import object_group_masks  # noqa: E402
from stts_dist.trained_model import open_trained_model  # noqa: E402

FRAMES = 8


def pick_among_shown(model, tok, cfg, clips_per_task: int, batch_size: int, method: str = "none",
                     ratio: float = 0.0) -> list[dict]:
    """One row per task: clips, accuracy, in_clip, acc_given_in_clip, with ``method`` at ``ratio``."""
    size = cfg.model.vit.image_size
    by_task: dict[str, list] = collections.defaultdict(list)
    tasks, index = [t for t in cfg.data.tasks if t != "count"], 0     # count's answer is not a digit of the clip
    while min((len(by_task[t]) for t in tasks), default=clips_per_task) < clips_per_task:
        s = make_sample(index, cfg.data.seed, FRAMES, size, list(cfg.data.tasks), "eval", cfg.data.digit_style)
        index += 1
        if s["task"] in tasks and len(by_task[s["task"]]) < clips_per_task:
            by_task[s["task"]].append(s)
    build = SequenceBuilder(tok, model.budget.with_setting(method, ratio, None), size)
    rows = []
    for task in tasks:
        clips, tally = by_task[task], collections.Counter()
        for k in range(0, len(clips), batch_size):
            chunk = clips[k:k + batch_size]
            with torch.no_grad():
                ids, _ = generate(model, build(chunk, with_answer=False), tok.eos_id)
            for s, out in zip(chunk, ids):
                answer = tok.decode(out).strip()
                in_clip = answer in [str(c) for c in s["objects"]["classes"]]
                tally["in_clip"] += in_clip
                tally["right"] += answer == s["answer"]
                tally["right_in_clip"] += in_clip and answer == s["answer"]
        rows.append({"setting": f"{method}@{ratio:g}", "task": task, "clips": len(clips), "acc": round(tally["right"] / len(clips), 3),
                     "in_clip": round(tally["in_clip"] / len(clips), 3),
                     "acc_given_in_clip": round(tally["right_in_clip"] / max(tally["in_clip"], 1), 3)})
    return rows


def visual_tokens_and_labels(model, tok, cfg, clips: int, batch_size: int):
    """-> (tokens (K, hidden) float32, {name: (K,) int64 labels, -1 = no label}, clip of each token (K,))."""
    size, v, g = cfg.model.vit.image_size, cfg.model.vit, cfg.model.connector.pool_size
    build = SequenceBuilder(tok, model.budget.with_setting("none", 0.0, None), size)
    feats, digit = [], []
    for k in range(0, clips, batch_size):
        samples = [make_sample(i, cfg.data.seed, FRAMES, size, list(cfg.data.tasks), "eval", cfg.data.digit_style)
                   for i in range(k, min(k + batch_size, clips))]
        batch = build(samples, with_answer=False)
        with torch.no_grad():
            tokens, res, _ = model.encode_visual(batch.frames, batch.layout, model.prune_settings(batch.budget))
        feats.append(tokens.float())
        for s in samples:
            masks = object_group_masks(s["objects"], FRAMES, size, v.patch_size, g)      # (n, T, G)
            label = np.full(masks.shape[1:], -1)
            one = masks.sum(0) == 1
            label[one] = s["objects"]["classes"][masks.argmax(0)[one]]
            digit.append(label.reshape(-1))
    G = res.keep.shape[1]
    side = int(round(G ** 0.5))
    X = torch.cat(feats)
    index = torch.arange(X.shape[0])
    group = index % G
    labels = {"row": group // side, "col": group % side, "frame": (index // G) % FRAMES,
              "digit": torch.from_numpy(np.concatenate(digit)).long()}
    return X, labels, index // (G * FRAMES)


def linear_probe(X: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> dict:
    """Softmax regression (L-BFGS, small L2) on standardised features; held-out accuracy."""
    ok = y >= 0
    tr, te = train & ok, ~train & ok
    mean, std = X[tr].mean(0), X[tr].std(0) + 1e-6
    Z = (X - mean) / std
    classes = int(y[ok].max()) + 1
    W = torch.zeros(X.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Z[tr] @ W + b, y[tr]) + 1e-3 * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        acc = ((Z[te] @ W + b).argmax(1) == y[te]).float().mean().item()
    majority = (torch.bincount(y[tr]).argmax() == y[te]).float().mean().item()
    return {"acc": round(acc, 3), "majority": round(majority, 3), "n_test": int(te.sum())}


def stage0_layer_probes(folder: str, clips: int, digit_style: str = "printed") -> dict:
    """Row and digit probes on each block's output of a stage-0 ViT (the default model's geometry:
    64 px frames, 8 px patches, 2x2 groups)."""
    from stts_dist.model.vit import VideoViT
    from stts_dist.ops.groups import group_patches
    from stts_dist.weights.folder import SafetensorsFolder
    from stts_dist.weights.hf_vit import load_hf_vit, vit_config_from_hf
    f = vit_config_from_hf(SafetensorsFolder(folder).config, folder)
    vit = VideoViT(f["image_size"], f["patch_size"], f["width"], f["depth"], f["heads"], f["mlp_dim"],
                   f["in_channels"], f["layer_norm_eps"], "exact" if f["gelu"] == "none" else "tanh").eval()
    load_hf_vit(vit, folder)
    size, grid = vit.grid * vit.patch_size, vit.grid
    per_block: list[list[torch.Tensor]] = [[] for _ in range(len(vit.blocks) + 1)]
    digit = []
    for i in range(clips):
        s = make_sample(i, 0, FRAMES, size, ["count", "last", "direction", "corner"], "eval", digit_style)
        x = torch.from_numpy(s["frames"]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        with torch.no_grad():
            h = vit(x)
            outs = [h]
            for block in vit.blocks:
                h = block(h)
                outs.append(h)
        for k, o in enumerate(outs):
            groups, _ = group_patches(o, grid, 2)
            per_block[k].append(groups.mean(2).reshape(-1, o.shape[-1]))
        masks = object_group_masks(s["objects"], FRAMES, size, vit.patch_size, 2)
        label = np.full(masks.shape[1:], -1)
        one = masks.sum(0) == 1
        label[one] = s["objects"]["classes"][masks.argmax(0)[one]]
        digit.append(label.reshape(-1))
    y = torch.from_numpy(np.concatenate(digit)).long()
    G = per_block[0][0].shape[0] // FRAMES
    index = torch.arange(len(y))
    train = index // (G * FRAMES) < clips * 2 // 3
    row = (index % G) // int(round(G ** 0.5))
    return {"stage0": folder, **{("embed" if k == 0 else f"block{k}"): {"row": linear_probe(torch.cat(f), row, train)["acc"],
                                                                      "digit": linear_probe(torch.cat(f), y, train)["acc"]}
                                 for k, f in enumerate(per_block)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a run folder or checkpoint the trainer wrote")
    which.add_argument("--stage0", help="a stage-0 ViT folder (data/vit_digits_<key>): block-by-block probes")
    p.add_argument("--clips", type=int, default=200, help="held-out clips per task for the picking test")
    p.add_argument("--probe-clips", type=int, default=240, help="held-out clips for the linear probes")
    p.add_argument("--batch-size", type=int, default=20)
    args = p.parse_args(argv)
    if args.stage0:
        print(json.dumps(stage0_layer_probes(args.stage0, args.probe_clips // 2)), flush=True)
        return 0
    cfg, tok, model, _ = open_trained_model(args.checkpoint)
    torch.manual_seed(0)
    own = (model.budget.method, model.budget.prune_ratio)
    for method, ratio in dict.fromkeys([("none", 0.0), own]):
        for row in pick_among_shown(model, tok, cfg, args.clips, args.batch_size, method, ratio):
            print(json.dumps({"checkpoint": args.checkpoint, **row}), flush=True)
    X, labels, clip = visual_tokens_and_labels(model, tok, cfg, args.probe_clips, args.batch_size)
    train = clip < args.probe_clips * 2 // 3
    print(json.dumps({"checkpoint": args.checkpoint, "probe_tokens": int(X.shape[0]),
                      **{name: linear_probe(X, y, train) for name, y in labels.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
