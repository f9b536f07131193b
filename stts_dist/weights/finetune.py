"""Fine-tuning from pretrained weights: load them into a built model, and per-component optimizer
groups (LLM, ViT, connector, scorer) with their own learning rates, the scorer's own warm-up, and
frozen parts.

Config fields read (``cfg.optim``; absent ones take the defaults in brackets, so the current
OptimConfig works unchanged):

- ``lr`` [1e-3], ``weight_decay`` [0.0], ``warmup_steps`` [0]: base values;
- ``llm_lr``, ``vit_lr``, ``connector_lr`` [0.0 = ``lr``]: per-component learning rates;
- ``scorer_lr`` [``lr``], ``scorer_warmup_steps`` [``warmup_steps``]: the scorer is always new;
- ``freeze`` [[]]: parameter-name prefixes not trained (``vit``, ``llm``, ``llm.embed_tokens``,
  ``vit.blocks.0`` ...). The scorer cannot be frozen (it is initialised from scratch).

``cfg.model.pretrained``: ``llm_path``, ``vit_path`` (HF folders, "" = random init) and
``allow_activation_mismatch`` [False], read by :func:`load_pretrained`.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from stts_dist.weights.folder import WeightsError

COMPONENTS = ("llm", "vit", "connector", "scorer")


def _component(name: str) -> str:
    head = name.split(".", 1)[0]
    if head not in COMPONENTS:
        raise WeightsError(f"parameter '{name}' belongs to no known component {COMPONENTS}")
    return head


def _lr(cfg: Any, component: str) -> float:
    base = float(getattr(cfg, "lr", 1e-3))
    value = float(getattr(cfg, f"{component}_lr", 0.0) or 0.0)
    return value if value > 0 else base


def finetune_param_groups(model: nn.Module, cfg: Any) -> list[dict]:
    """Optimizer groups, one per (component, decay / no decay) that has trainable parameters.

    Each group: ``params``, ``name`` (e.g. ``vit_nodecay``), ``kind`` (the component; the
    trainer's schedule gives kind ``scorer`` its own warm-up), ``lr``, ``weight_decay``,
    ``warmup_steps``. Frozen parameters get ``requires_grad=False`` and appear in no group.
    No weight decay on vectors (norms, biases), embeddings and position embeddings."""
    named = [(n[len("module."):] if n.startswith("module.") else n, p) for n, p in model.named_parameters()]
    freeze = [str(f).rstrip(".") for f in (getattr(cfg, "freeze", None) or [])]
    for prefix in freeze:
        if prefix == "scorer" or prefix.startswith("scorer."):
            raise WeightsError(f"optim.freeze entry '{prefix}': the scorer is always trained (it starts from scratch)")
        if not any(n == prefix or n.startswith(prefix + ".") for n, _ in named):
            raise WeightsError(f"optim.freeze entry '{prefix}' matches no parameter; use a name prefix such as "
                               f"'vit', 'llm', 'connector', 'llm.embed_tokens' or 'vit.blocks.0'")
    decay = float(getattr(cfg, "weight_decay", 0.0))
    warmup = int(getattr(cfg, "warmup_steps", 0))
    scorer_warmup = int(getattr(cfg, "scorer_warmup_steps", warmup))
    groups: dict[str, dict] = {}
    for name, p in named:
        kind = _component(name)
        if any(name == f or name.startswith(f + ".") for f in freeze):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name
        key = f"{kind}{'_nodecay' if no_decay else ''}"
        if key not in groups:
            lr = float(getattr(cfg, "scorer_lr", 0.0) or 0.0) if kind == "scorer" else 0.0
            groups[key] = {"params": [], "name": key, "kind": kind, "lr": lr if lr > 0 else _lr(cfg, kind),
                           "weight_decay": 0.0 if no_decay else decay,
                           "warmup_steps": scorer_warmup if kind == "scorer" else warmup}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def load_pretrained_weights(model: nn.Module, pretrained: Any) -> None:
    """A run's Hugging Face LLM / ViT weights (``cfg.model.pretrained``) into a built (under TP:
    parallelized) model, if it names any; the connector and the scorer keep their fresh init."""
    if pretrained.llm_path or pretrained.vit_path:
        load_pretrained(model, pretrained)


def load_pretrained(model: nn.Module, paths: Any) -> dict[str, Any]:
    """Load ``paths.llm_path`` into ``model.llm`` and ``paths.vit_path`` into ``model.vit`` (either
    may be "" to keep the random init). The connector and the scorer keep their fresh init.
    Call after building (and, under TP, parallelizing) the model, before ``deepspeed.initialize``.
    Returns ``{"llm": report or None, "vit": report or None}``."""
    from stts_dist.weights.hf_llm import load_hf_llm
    from stts_dist.weights.hf_vit import load_hf_vit
    llm_path = str(getattr(paths, "llm_path", "") or "")
    vit_path = str(getattr(paths, "vit_path", "") or "")
    out: dict[str, Any] = {"llm": None, "vit": None}
    if llm_path:
        out["llm"] = load_hf_llm(model.llm, llm_path)
    if vit_path:
        out["vit"] = load_hf_vit(model.vit, vit_path,
                                 allow_activation_mismatch=bool(getattr(paths, "allow_activation_mismatch", False)))
    return out
