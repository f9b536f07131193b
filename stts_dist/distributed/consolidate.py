"""Merge a distributed checkpoint (DeepSpeed ZeRO shards x megatron TP slices) into the plain
single-process ``VideoVLM`` state dict, in one ordinary process (no process group, no GPU).

What the trainer writes (``DistributedTrainModule.save_into``), per TP rank ``t`` and DP rank ``d``:

- ZeRO-3: ``deepspeed/zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt`` (names, local shapes,
  buffers; parameters empty) and ``..._optim_states.pt`` (``fp32_flat_groups``: this DP rank's
  partition of the fp32 master weights).
- ZeRO-1/2: ``deepspeed/mp_rank_{t:02d}_model_states.pt`` and
  ``zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt`` (``single_partition_of_fp32_groups``).

Two merges, in this order:

1. ZeRO, per TP rank: the fp32 master weights of that rank's slice are glued back from the DP
   partitions, with the rules of DeepSpeed's ``deepspeed/utils/zero_to_fp32.py`` (0.19.8):
   ZeRO-3 pads every parameter to ``ceil(numel / DP)`` elements per rank and walks the flat
   groups of all ranks in ``param_shapes`` order; ZeRO-1/2 concatenates each group's rank
   partitions and walks it with the recorded alignment paddings. That script assumes TP=1, so
   it is re-done here per ``mp_rank``.
2. TP: each parameter's slices are concatenated along the dim the tensor-parallel plan of
   ``stts_dist.distributed.parallelize`` splits it on (column-parallel: dim 0 for weight and
   bias; row-parallel: dim 1 for the weight, the bias is replicated; vocab-parallel embedding /
   untied head: dim 0, then the padding rows are cut off). Everything else is replicated and
   taken from TP rank 0.

Loading is ``torch.load(weights_only=True)`` throughout: DeepSpeed's optimizer files pickle a few
small DeepSpeed data classes (``ZeroStageEnum``, ``LossScaler``, ZeRO-1/2's ``fragment_address``),
which are allow-listed for those files only, after the manifest's sha256 checksums have been
verified. No pickled code runs.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from stts_dist.checkpoint_io import (CONFIG_FILE, TOKENIZER_FILE, CheckpointLoadError, check_weights_match,
                                     resolve_checkpoint_dir)
from stts_dist.config import load_config
from stts_dist.distributed.deepspeed_engine import load_deepspeed_file
from stts_dist.model.vlm import VideoVLM, build_model
from stts_dist.tokenizer import tokenizer_from_json
from stts_dist import checkpoint as ckpt

DS_FOLDER = "deepspeed"          # stts_dist.train.distributed_module.DS_TAG (not imported: that pulls megatron)
EMBEDDING = "llm.embed_tokens.weight"
LM_HEAD = "llm.lm_head.weight"


class ConsolidationError(ckpt.CheckpointError):
    """The checkpoint cannot be merged; the message names the file or tensor and the fix."""


# --- which dim each parameter is split on ---------------------------------------------------------

def _plan_patterns() -> list[tuple[re.Pattern, Optional[int]]]:
    """(regex over plain parameter names, concat dim or None=replicated), from parallelize.py's plan.

    parallelize_vlm swaps ``model.vit.blocks[i].<path>`` by ``_VIT_PLAN`` and
    ``model.llm.layers[i].<path>`` by ``_LLM_PLAN``; kinds "col" / "row" are megatron's
    ColumnParallelLinear (rows split) / RowParallelLinear (columns split, bias whole)."""
    from stts_dist.distributed.parallelize import _LLM_PLAN, _VIT_PLAN

    dims = {("col", "weight"): 0, ("col", "bias"): 0, ("row", "weight"): 1, ("row", "bias"): None}
    out = []
    for prefix, plan in ((r"vit\.blocks\.\d+\.", _VIT_PLAN), (r"llm\.layers\.\d+\.", _LLM_PLAN)):
        for path, kind in plan:
            for leaf in ("weight", "bias"):
                out.append((re.compile(prefix + re.escape(path) + r"\." + leaf + "$"), dims[(kind, leaf)]))
    return out


def tensor_parallel_dims(names: list[str], tied_embeddings: bool) -> dict[str, Optional[int]]:
    """For each plain parameter name: the dim its TP slices are concatenated on, or None when
    every TP rank holds the whole (replicated) tensor."""
    patterns = _plan_patterns()
    out: dict[str, Optional[int]] = {}
    for name in names:
        dim: Optional[int] = None
        if name == EMBEDDING or (name == LM_HEAD and not tied_embeddings):
            dim = 0  # vocab-parallel rows (padded to a TP multiple)
        else:
            for pattern, d in patterns:
                if pattern.match(name):
                    dim = d
                    break
        out[name] = dim
    return out


# --- reading DeepSpeed's files --------------------------------------------------------------------

def _load_model_states(path: Path) -> dict:
    if not path.is_file():
        raise ConsolidationError(f"{path} is missing: the checkpoint lacks this rank's DeepSpeed model states")
    return ckpt.load_torch(path)  # weights_only=True suffices: tensors, dicts, torch.Size


def _load_optim_states(path: Path) -> dict:
    """A ZeRO optimizer partition, read with :func:`load_deepspeed_file` (weights only)."""
    if not path.is_file():
        raise ConsolidationError(f"{path} is missing: the checkpoint lacks this rank's ZeRO optimizer partition")
    try:
        state = load_deepspeed_file(path, map_location="cpu", mmap=True)
    except Exception as e:
        raise ConsolidationError(f"cannot read {path} with weights_only=True ({e}). A DeepSpeed version other than "
                                 f"0.19.8 may pickle further classes; add them to the allow-list in "
                                 f"stts_dist.distributed.deepspeed_engine.load_deepspeed_file after checking they hold only data") from e
    return state["optimizer_state_dict"]


def _span(flat: list[torch.Tensor], starts: list[int], begin: int, length: int) -> list[torch.Tensor]:
    """Elements ``[begin, begin+length)`` of the concatenation of ``flat`` (without building it)."""
    pieces, end = [], begin + length
    for tensor, start in zip(flat, starts):
        stop = start + tensor.numel()
        if stop <= begin or start >= end:
            continue
        pieces.append(tensor.narrow(0, max(begin, start) - start, min(end, stop) - max(begin, start)))
    return pieces


def _merge_zero3(shapes: dict[str, torch.Size], groups_per_rank: list[list[torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """ZeRO-3: parameter p occupies ``ceil(numel/DP)`` consecutive elements on every DP rank (the
    last rank's tail is padding), parameters in ``shapes`` order across all flat groups."""
    dp = len(groups_per_rank)
    starts = [0]
    for t in groups_per_rank[0][:-1]:
        starts.append(starts[-1] + t.numel())
    available = sum(t.numel() for t in groups_per_rank[0])
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = shape.numel()
        per_rank = -(-numel // dp)
        pieces = [p for groups in groups_per_rank for p in _span(groups, starts, offset, per_rank)]
        out[name] = torch.cat(pieces)[:numel].view(shape).clone()
        offset += per_rank
    if offset != available:
        raise ConsolidationError(f"{where}: the parameter shapes account for {offset} of the {available} elements per "
                                 f"rank in fp32_flat_groups; the model and optimizer files do not belong together")
    return out


def _merge_zero12(shapes_per_group: list[dict[str, torch.Size]], partitions_per_rank: list[list[torch.Tensor]],
                  paddings: Optional[list[list[int]]], where: str) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each param group is one flat vector split into DP equal partitions; parameters
    sit in it in order, each followed by its alignment padding."""
    dp = len(partitions_per_rank)
    out = {}
    for g, shapes in enumerate(shapes_per_group):
        full = torch.cat([partitions_per_rank[r][g] for r in range(dp)])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = shape.numel()
            if offset + numel > full.numel():
                raise ConsolidationError(f"{where}: group {g} holds {full.numel()} elements, too few for {name}")
            out[name] = full.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[g][i] if paddings is not None else 0)
    return out


def _local_state(folder: Path, tp_rank: int, dp: int) -> tuple[dict[str, torch.Tensor], int]:
    """fp32 parameters and buffers of TP rank ``tp_rank`` (names of the TP model, local shapes),
    and the ZeRO stage the files were written with."""
    ds = folder / DS_FOLDER
    zero3_model = ds / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
    zero12_model = ds / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if zero3_model.is_file():
        model_states = _load_model_states(zero3_model)
    elif zero12_model.is_file():
        model_states = _load_model_states(zero12_model)
    else:
        raise ConsolidationError(f"{ds} has neither {zero3_model.name} nor {zero12_model.name}: not a DeepSpeed ZeRO "
                                 f"checkpoint for tensor-parallel rank {tp_rank}")
    optim = [_load_optim_states(ds / f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt") for d in range(dp)]
    stage = int(optim[0]["zero_stage"])
    counts = optim[0]["partition_count"]
    count = max(counts) if isinstance(counts, list) else int(counts)
    if count != dp:
        raise ConsolidationError(f"{ds}: ZeRO partitioned over {count} ranks but the manifest's layout has data "
                                 f"parallel {dp}; the checkpoint's files are from different runs")
    where = f"{ds} (tensor-parallel rank {tp_rank})"
    if stage == 3:
        shapes = {k: v for group in model_states["param_shapes"] for k, v in group.items()}
        # saved with requires_grad=True; detached so the merged tensors are plain data
        params = _merge_zero3(shapes, [[t.detach() for t in o["fp32_flat_groups"]] for o in optim], where)
    elif stage in (1, 2):
        params = _merge_zero12(model_states["param_shapes"],
                               [[t.detach() for t in o["single_partition_of_fp32_groups"]] for o in optim],
                               optim[0].get("param_alignment_paddings"), where)
    else:
        raise ConsolidationError(f"{where}: ZeRO stage {stage} is not supported (1, 2 or 3)")
    buffers = {k: v.float() if v.is_floating_point() else v
               for k, v in model_states["module"].items() if k in set(model_states.get("buffer_names", []))}
    state = {**buffers, **params}
    for alias, owner in model_states.get("shared_params", {}).items():  # modules sharing one Parameter
        if owner in state:
            state[alias] = state[owner]
    return state, stage


# --- the merge ------------------------------------------------------------------------------------

@dataclass
class Consolidated:
    state_dict: dict[str, torch.Tensor]   # plain VideoVLM names and shapes, fp32
    step: int
    tensor_parallel: int
    data_parallel: int
    zero_stage: int
    replicated_max_diff: float            # largest |difference| between TP ranks' copies of replicated tensors


def _expected_model(step_dir: Path) -> VideoVLM:
    """The single-process model of the checkpoint's config, on the meta device (no memory)."""
    cfg = load_config(step_dir / CONFIG_FILE)
    tokenizer = tokenizer_from_json((step_dir / TOKENIZER_FILE).read_text())
    with torch.device("meta"):
        return build_model(cfg.model, tokenizer)


def consolidate(path: str | Path, verify: bool = True) -> Consolidated:
    """Merge the checkpoint at ``path`` (a step folder, its ``checkpoints/`` folder or the run
    folder) into one fp32 state dict with exactly the keys and shapes of
    ``build_model(cfg.model, tokenizer).state_dict()``. Runs in a plain process."""
    step_dir = resolve_checkpoint_dir(path)
    manifest = ckpt.verify(step_dir) if verify else json.loads((step_dir / ckpt.MANIFEST).read_text())
    if not (step_dir / DS_FOLDER).is_dir():
        raise ConsolidationError(f"{step_dir} has no {DS_FOLDER}/ folder: it was written by the single-process "
                                 f"trainer, whose state.pt already holds the plain weights (stts_dist.checkpoint_io)")
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (step_dir / name).is_file():
            raise ConsolidationError(f"checkpoint {step_dir} lacks {name}; it was not written by stts-train")
    world = manifest.get("world") or {}
    if "world_size" not in world or "tensor_parallel" not in world:
        raise ConsolidationError(f"{step_dir}/{ckpt.MANIFEST} records no parallel layout ('world'); cannot tell "
                                 f"how many TP and DP shards to merge")
    tp, world_size = int(world["tensor_parallel"]), int(world["world_size"])
    dp = world_size // tp

    model = _expected_model(step_dir)
    expected = model.state_dict()
    tied = bool(model.llm.tie_embeddings)
    real_vocab = model.llm.real_vocab

    per_rank = [_local_state(step_dir, t, dp) for t in range(tp)]
    stage = per_rank[0][1]
    dims = tensor_parallel_dims(list(expected), tied)
    out: dict[str, torch.Tensor] = {}
    replicated_diff = 0.0
    for name in expected:
        if name == LM_HEAD and tied:
            continue  # filled from the embedding below
        missing = [t for t, (state, _) in enumerate(per_rank) if name not in state]
        if missing:
            raise ConsolidationError(f"{step_dir}: {name} is not in the DeepSpeed files of tensor-parallel rank(s) "
                                     f"{missing}; the checkpoint was written by a different model version")
        slices = [state[name] for state, _ in per_rank]
        dim = dims[name]
        if dim is None:
            for other in slices[1:]:
                replicated_diff = max(replicated_diff, float((other - slices[0]).abs().max()) if other.numel() else 0.0)
            out[name] = slices[0]
        else:
            out[name] = torch.cat(slices, dim=dim)
    out[EMBEDDING] = out[EMBEDDING][:real_vocab].contiguous()
    if tied:
        out[LM_HEAD] = out[EMBEDDING]
    else:
        out[LM_HEAD] = out[LM_HEAD][:real_vocab].contiguous()
    check_weights_match(model, out, f"consolidated {step_dir}")
    return Consolidated(state_dict=out, step=int(manifest.get("step", -1)), tensor_parallel=tp, data_parallel=dp,
                        zero_stage=stage, replicated_max_diff=replicated_diff)


# --- writing and reading the consolidated file ----------------------------------------------------

def save_consolidated(result: Consolidated, source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """``out`` (safetensors) plus ``config.yaml`` and ``tokenizer.json`` copied next to it."""
    from safetensors.torch import save_file

    out = Path(out)
    step_dir = resolve_checkpoint_dir(source)
    companions = [(step_dir / CONFIG_FILE, out.parent / CONFIG_FILE), (step_dir / TOKENIZER_FILE, out.parent / TOKENIZER_FILE)]
    if not overwrite:
        clashes = [p for p in [out] + [dst for _, dst in companions] if p.exists()]
        if clashes:
            raise ConsolidationError(f"{', '.join(map(str, clashes))} already exist(s); choose another --out folder "
                                     f"or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory (the tied head): store an independent copy;
    # load_state_dict writes both keys into the one shared Parameter.
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in result.state_dict.items()}
    meta = {"source": str(step_dir), "step": str(result.step), "tensor_parallel": str(result.tensor_parallel),
            "data_parallel": str(result.data_parallel), "zero_stage": str(result.zero_stage)}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    for src, dst in companions:
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    return out


def load_consolidated(path: str | Path, device: str | torch.device = "cpu"):
    """``(cfg, tokenizer, model)`` from a consolidated ``model.safetensors`` and the
    ``config.yaml`` / ``tokenizer.json`` beside it; the model is in eval mode on ``device``."""
    from safetensors.torch import load_file

    path = Path(path)
    for p in (path, path.parent / CONFIG_FILE, path.parent / TOKENIZER_FILE):
        if not p.is_file():
            raise CheckpointLoadError(f"{p} is missing; tools/consolidate_checkpoint.py writes the weights and copies "
                                      f"{CONFIG_FILE} and {TOKENIZER_FILE} into the same folder")
    cfg = load_config(path.parent / CONFIG_FILE)
    tokenizer = tokenizer_from_json((path.parent / TOKENIZER_FILE).read_text())
    weights = load_file(str(path))
    model = build_model(cfg.model, tokenizer)
    check_weights_match(model, weights, str(path))
    model.load_state_dict(weights)
    return cfg, tokenizer, model.to(device).eval()
