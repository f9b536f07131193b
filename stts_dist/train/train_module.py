"""The "train module": what one training step, save and load mean, behind one interface the
training loop drives without knowing which implementation it holds.

- :class:`LocalTrainModule` -- one process, plain torch + AdamW;
- ``DistributedTrainModule`` (``train/distributed_module.py``) -- the same model with megatron-core
  tensor parallelism inside a DeepSpeed ZeRO engine, on any number of ranks.

Both compose the objective through ``VLMOutput.training_loss`` (the model's one definition of
the loss); the distributed one passes its global answer-token rescaling as ``lm_scale``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch

from stts_dist import checkpoint as ckpt
from stts_dist.model.vlm import VideoVLM, build_model
from stts_dist.train.optim import build_optimizer, set_learning_rates
from stts_dist.weights.finetune import load_pretrained_weights


class TrainModule(Protocol):
    """What the loop calls. ``train_step`` returns the step's metrics (floats, the same keys for
    every implementation); ``save_into`` / ``load_from`` write / read the module's part of a
    checkpoint folder plus the trainer state the loop hands over."""

    model: VideoVLM

    def train_step(self, batch, step: int, generator: torch.Generator) -> dict[str, float]: ...

    def save_into(self, folder: Path, trainer_state: dict) -> None: ...

    def load_from(self, folder: Path) -> dict: ...

    def close(self) -> None: ...


class LocalTrainModule:
    """Single-process model + AdamW: forward, backward, clip, step."""

    def __init__(self, model: VideoVLM, cfg, device: torch.device):
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.optimizer = build_optimizer(model, cfg.optim)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            device.type == "cuda" and cfg.train.dtype in ("auto", "bf16")) else None

    def train_step(self, batch, step: int, generator: torch.Generator) -> dict[str, float]:
        lrs = set_learning_rates(self.optimizer, step, self.cfg.train.steps, self.cfg.optim)
        self.model.train()
        if self.autocast:
            with self.autocast:
                out = self.model(batch, generator=generator)
        else:
            out = self.model(batch, generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()            # VLMOutput.training_loss at lm_scale 1
        clip = self.cfg.optim.grad_clip
        # 0 disables clipping (as in DeepSpeed); the norm is still measured for logging
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        m = {"loss": float(out.loss.detach()), "lm_loss": float(out.lm_loss.detach()), "aux_loss": float(out.aux_loss.detach()),
             "grad_norm": float(gnorm), "lr": lrs.get("llm", 0.0), "lr_scorer": lrs.get("scorer", 0.0)}
        m.update(out.metrics)
        return m

    def save_into(self, folder: Path, trainer_state: dict) -> None:
        ckpt.save_torch({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **trainer_state},
                        folder / "state.pt")

    def load_from(self, folder: Path) -> dict:
        state = ckpt.load_torch(folder / "state.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    def close(self) -> None:
        """Nothing to release in one process (the distributed module drops its process groups)."""


def uses_distributed_engine(cfg) -> bool:
    """DeepSpeed ZeRO + megatron TP when launched on several ranks (torchrun / srun / Ray set
    WORLD_SIZE) or when ``parallel.engine=deepspeed``; single-process torch otherwise."""
    engine = cfg.parallel.engine
    if engine == "auto":
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return engine == "deepspeed"


def build_train_module(cfg, tokenizer, device: torch.device):
    """Single-process torch, or DeepSpeed ZeRO + megatron TP (:func:`uses_distributed_engine`)."""
    if not uses_distributed_engine(cfg):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("parallel.engine=local cannot run on several ranks; use parallel.engine=auto or deepspeed")
        model = build_model(cfg.model, tokenizer)
        load_pretrained_weights(model, cfg.model.pretrained)
        return LocalTrainModule(model, cfg, device)
    from stts_dist.train.distributed_module import DistributedTrainModule
    return DistributedTrainModule(cfg, tokenizer)
