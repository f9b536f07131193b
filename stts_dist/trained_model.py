"""Open whatever the trainer wrote as ``(cfg, tokenizer, model, where)``: the one entry point of
``stts-eval``, ``stts-infer`` and ``tools/visualize_tokens.py``.

Accepted:

- a run folder, its ``checkpoints/`` folder or one ``step_XXXXXXXX/`` folder written by
  * one process (``state.pt``: the plain weights), or
  * DeepSpeed ZeRO on N ranks, with or without tensor parallelism (``deepspeed/``): merged in
    memory on the fly by :func:`stts_dist.distributed.consolidate.consolidate` (a plain process,
    no process group; it reads every rank's model-state file once: for the default model well
    under a second; for a large model ``tools/consolidate_checkpoint.py`` once, then pass its
    output);
- a consolidated ``.safetensors`` file (``tools/consolidate_checkpoint.py``), with the
  ``config.yaml`` and ``tokenizer.json`` that tool copies beside it.

``where`` is the step folder (or the ``.safetensors`` file's folder): outputs go next to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from stts_dist.checkpoint_io import (CONFIG_FILE, STATE_FILE, TOKENIZER_FILE, CheckpointLoadError,
                                     check_weights_match, load_checkpoint, resolve_checkpoint_dir)
from stts_dist.config import ConfigError, load_config
from stts_dist.distributed.consolidate import DS_FOLDER, consolidate, load_consolidated
from stts_dist.model.vlm import VideoVLM, build_model
from stts_dist.tokenizer import tokenizer_from_json
from stts_dist import checkpoint as ckpt


def open_trained_model(path: str | Path, overrides: Optional[Sequence[str]] = None,
                       device: str | torch.device = "cpu", verify: bool = True) -> tuple[Any, Any, VideoVLM, Path]:
    """``(cfg, tokenizer, model in eval mode on device, where)`` from any checkpoint the trainer
    writes (see the module docstring). ``overrides``: dotted config keys applied on top of the
    saved config (folders only)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointLoadError(f"{p} is a file but not a consolidated .safetensors model; pass the run folder "
                                      f"(train.out_dir), one checkpoints/step_XXXXXXXX/ folder or the .safetensors "
                                      f"written by tools/consolidate_checkpoint.py")
        if overrides:
            raise CheckpointLoadError("config overrides apply to checkpoint folders, not to a consolidated file")
        cfg, tokenizer, model = load_consolidated(p, device)
        return cfg, tokenizer, model, p.parent
    step_dir = resolve_checkpoint_dir(p)
    if (step_dir / STATE_FILE).is_file():
        cfg, tokenizer, model = load_checkpoint(step_dir, overrides, device, verify)
        return cfg, tokenizer, model, step_dir
    if (step_dir / DS_FOLDER).is_dir():
        return (*_merge_distributed(step_dir, overrides, device, verify), step_dir)
    raise CheckpointLoadError(
        f"{step_dir} holds neither {STATE_FILE} (a 1-process checkpoint) nor {DS_FOLDER}/ (DeepSpeed ranks): "
        f"it was not written by stts-train. Pass a run folder or step folder the trainer wrote, or a "
        f".safetensors from `python tools/consolidate_checkpoint.py {step_dir} --out model.safetensors`")


def _merge_distributed(step_dir: Path, overrides: Optional[Sequence[str]], device, verify: bool):
    try:
        merged = consolidate(step_dir, verify=verify)
    except ckpt.CheckpointError as e:
        raise CheckpointLoadError(f"{e}. Check the folder with `python tools/consolidate_checkpoint.py {step_dir} "
                                  f"--out model.safetensors`, or pass the run's previous step_* folder") from None
    try:
        cfg = load_config(step_dir / CONFIG_FILE, list(overrides or []))
    except ConfigError as e:
        raise CheckpointLoadError(f"checkpoint {step_dir}: its {CONFIG_FILE} does not load with this version of "
                                  f"stts_dist ({e})") from None
    tokenizer = tokenizer_from_json((step_dir / TOKENIZER_FILE).read_text())
    model = build_model(cfg.model, tokenizer)
    check_weights_match(model, merged.state_dict, str(step_dir))
    model.load_state_dict(merged.state_dict)
    return cfg, tokenizer, model.to(device).eval()
