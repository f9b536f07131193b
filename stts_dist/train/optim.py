"""Optimizer parameter groups and learning-rate schedules.

The scorer is new in every run (also when the rest is pretrained), so it has its own group with
its own learning rate and warm-up; the LLM, ViT and connector may have their own learning rates
and be frozen. Norms, biases, embeddings and position embeddings get no weight decay.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """Per-component groups (llm, vit, connector, scorer) x (decay, no decay), with freezing;
    see ``stts_dist.weights.finetune.finetune_param_groups``."""
    from stts_dist.weights.finetune import finetune_param_groups
    return finetune_param_groups(model, optim_cfg)


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, optim_cfg)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, total: int, optim_cfg) -> dict[str, float]:
    """Sets every group's lr for ``step``; the scorer group uses its own warm-up. Returns the lrs."""
    out = {}
    for g in optimizer.param_groups:
        warm = g.get("warmup_steps", optim_cfg.warmup_steps)
        g["lr"] = g["base_lr"] * lr_factor(step, total, warm, optim_cfg.min_lr_ratio)
        out[g.get("kind", "llm")] = g["lr"]
    return out
