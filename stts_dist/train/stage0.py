"""Stage 0 as part of a run: the digit-reading ViT pre-training, cached like the generated clips.

Real STTS models start from a pre-trained vision tower; the embedded digits job gets the same
start from :mod:`stts_dist.train.vit_pretrain` (``digits_vit_objective``: "frame", one digit per
frame named by a pooled head, or "dense", the digit under every patch named, the digits jobs' choice).
With ``model.pretrained.digits_vit_steps > 0`` and no ``vit_path``, a run trains that ViT once
into ``<data.work_dir>/vit_digits_<key>/`` (``key`` hashes everything that changes the weights:
the ViT geometry, steps, batch, LR, seed and digit style), and every later run with the same
settings reuses it. Under torchrun rank 0 trains while the other ranks wait for the folder's
completion marker; the folder appears atomically (written aside, then renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

MARKER = "pretrain_report.json"   # written last: its presence means the folder is complete


def stage0_folder(cfg) -> Path:
    p, d = cfg.model.pretrained, cfg.data
    vit = OmegaConf.to_container(cfg.model.vit, resolve=True)
    if vit.get("pos_embed_init") == "normal":
        del vit["pos_embed_init"]     # the original init: folders cached before this key keep their name
    spec = {"vit": vit,
            "steps": p.digits_vit_steps, "batch_size": p.digits_vit_batch_size, "lr": p.digits_vit_lr,
            "seed": cfg.train.seed, "style": d.digit_style}
    if (p.digits_vit_objective, p.digits_vit_max_digits) != ("frame", 1):
        # only outside the original objective, so folders cached before these keys keep their name
        spec.update(objective=p.digits_vit_objective, max_digits=p.digits_vit_max_digits)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(d.work_dir) / f"vit_digits_{key}"


def ensure_digits_vit(cfg, is_rank0: bool, log: Callable[[str], None] = print, timeout_s: float = 3600.0) -> None:
    """Point ``cfg.model.pretrained.vit_path`` at the cached stage-0 ViT, training it first (rank
    0) when it does not exist yet. No-op unless ``digits_vit_steps > 0`` and ``vit_path`` is empty."""
    p = cfg.model.pretrained
    if p.digits_vit_steps <= 0 or p.vit_path:
        return
    folder = stage0_folder(cfg)
    if not (folder / MARKER).is_file():
        if is_rank0:
            _train(cfg, folder, log)
        else:
            deadline = time.monotonic() + timeout_s
            while not (folder / MARKER).is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage 0: rank 0 did not finish {folder} within {timeout_s:.0f} s; "
                                       f"look at rank 0's log, remove {folder} and start the run again")
                time.sleep(1.0)
    report = json.loads((folder / MARKER).read_text())
    log(f"[stage 0] ViT pre-trained to read digits ({report.get('objective', 'frame')} objective, "
        f"{report['steps']} steps, held-out top-1 "
        f"{report['after']['top1_acc']:.3f}): {folder}")
    p.vit_path = str(folder)


def _train(cfg, folder: Path, log: Callable[[str], None]) -> None:
    from stts_dist.train.vit_pretrain import pretrain
    from stts_dist.weights.hf_vit import export_hf_vit

    p = cfg.model.pretrained
    log(f"[stage 0] pre-training the ViT to read {cfg.data.digit_style} digits: {p.digits_vit_steps} steps x "
        f"{p.digits_vit_batch_size} frames (once; cached in {folder})")
    # The other ranks only wait meanwhile (torchrun gives each rank one thread): use every core.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
    try:
        vit, report = pretrain(cfg.model.vit, p.digits_vit_steps, p.digits_vit_batch_size, p.digits_vit_lr,
                               cfg.train.seed, log_every=max(1, p.digits_vit_steps // 5), log=log,
                               style=cfg.data.digit_style, objective=p.digits_vit_objective,
                               max_digits=p.digits_vit_max_digits)
    finally:
        torch.set_num_threads(threads)
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf_vit(vit, tmp)
    (tmp / MARKER).write_text(json.dumps(report, indent=1) + "\n")
    if folder.exists():          # a stale, incomplete folder of an interrupted run
        shutil.rmtree(folder)
    os.replace(tmp, folder)
