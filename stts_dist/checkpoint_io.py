"""Load a trained checkpoint for evaluation and inference: ``(cfg, tokenizer, model)``.

Accepted paths (the newest verified checkpoint is taken when a folder holds several):

- a checkpoint folder ``<out_dir>/checkpoints/step_00000300/``
- the checkpoints folder ``<out_dir>/checkpoints/``
- the run folder ``<out_dir>/`` (the trainer's ``train.out_dir``)

The checkpoint is verified against its ``manifest.json`` (sizes and sha256) before anything is
read, weights are read with ``torch.load(weights_only=True)`` (no code runs), and the model built
from ``config.yaml`` must match the weights tensor by tensor; otherwise :class:`CheckpointLoadError`
names the first tensors that differ. Only the model weights are kept (the optimizer state is
dropped after reading).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from stts_dist.config import ConfigError, load_config
from stts_dist.model.vlm import VideoVLM, build_model
from stts_dist.tokenizer import tokenizer_from_json
from stts_dist import checkpoint as ckpt

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointLoadError(ckpt.CheckpointError):
    """A checkpoint cannot be used; the message names the path or tensor and the fix."""


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step folder from a step folder, a ``checkpoints/`` folder or a run folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointLoadError(f"checkpoint not found: {p} does not exist. Pass a run folder (train.out_dir), "
                                  f"its checkpoints/ folder or one checkpoints/step_XXXXXXXX/ folder")
    if p.is_file():
        raise CheckpointLoadError(f"checkpoint path {p} is a file; pass the folder that holds {STATE_FILE}, "
                                  f"{CONFIG_FILE} and manifest.json")
    if (p / ckpt.MANIFEST).is_file() or (p / STATE_FILE).is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = ckpt.find_resumable(root, log=lambda msg: print(msg, flush=True))
    if found is None:
        partial = sorted(root.glob("step_*"))
        hint = (f" ({len(partial)} incomplete or corrupt step folder(s) found: {partial[-1].name} ...)"
                if partial else "")
        raise CheckpointLoadError(f"no complete checkpoint under {p}{hint}. Train first (stts-train) or pass a "
                                  f"folder holding checkpoints/step_XXXXXXXX/ with a manifest.json")
    return found[0]


def _model_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from the trainer's ``{"module": {"model": ...}}`` (or a bare one)."""
    if isinstance(state, dict) and isinstance(state.get("module"), dict) and "model" in state["module"]:
        return state["module"]["model"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"]
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
    raise CheckpointLoadError(f"{path} holds no model weights (top-level keys: {keys}); expected the trainer's "
                              f"{{'module': {{'model': state_dict}}}}. A sharded DeepSpeed checkpoint must be "
                              f"consolidated into one state dict first")


def check_weights_match(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointLoadError` naming missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append("shape mismatch: " + ", ".join(f"{k} is {w} in the weights but {m} in the model built from "
                                                    f"the config" for k, w, m in shapes[:3])
                     + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    if missing:
        parts.append(f"missing from the weights: {', '.join(missing[:3])}"
                     + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if unexpected:
        parts.append(f"not in the model: {', '.join(unexpected[:3])}"
                     + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
    raise CheckpointLoadError(f"{where}: the weights do not fit the model described by its config ("
                              + "; ".join(parts) + "). Use the config.yaml saved with these weights and do not "
                              "override model shape keys (model.vit.*, model.llm.*, model.connector.*)")


def load_checkpoint(path: str | Path, overrides: Optional[Sequence[str]] = None, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[Any, Any, VideoVLM]:
    """``(cfg, tokenizer, model)`` from a trained checkpoint; the model is in eval mode on ``device``.

    ``overrides``: dotted config keys applied on top of the saved config (e.g.
    ``model.stts.attention_backend=padded``); shape keys that contradict the weights are refused."""
    step_dir = resolve_checkpoint_dir(path)
    if verify:
        try:
            ckpt.verify(step_dir)
        except ckpt.CheckpointError as e:
            raise CheckpointLoadError(f"{e}. Use another checkpoint (the folder's previous step_* folder) or pass "
                                      f"verify=False / --no-verify if you know the files are intact") from None
    for name in (STATE_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (step_dir / name).is_file():
            raise CheckpointLoadError(f"checkpoint {step_dir} lacks {name}; it was not written by stts-train")
    try:
        cfg = load_config(step_dir / CONFIG_FILE, list(overrides or []))
    except ConfigError as e:
        raise CheckpointLoadError(f"checkpoint {step_dir}: its {CONFIG_FILE} does not load with this version of "
                                  f"stts_dist ({e})") from None
    try:
        tokenizer = tokenizer_from_json((step_dir / TOKENIZER_FILE).read_text())
    except ValueError as e:
        raise CheckpointLoadError(f"checkpoint {step_dir}: {TOKENIZER_FILE} is unreadable ({e})") from None
    weights = _model_state(ckpt.load_torch(step_dir / STATE_FILE), step_dir / STATE_FILE)
    model = build_model(cfg.model, tokenizer)
    check_weights_match(model, weights, str(step_dir))
    model.load_state_dict(weights)
    model.to(device).eval()
    return cfg, tokenizer, model
