"""The distributed "train module": the VLM with megatron-core TP inside a DeepSpeed ZeRO engine.

Implements ``stts_dist.train.train_module.TrainModule`` (train_step / save_into / load_from /
close), like ``LocalTrainModule`` beside it, so the training loop does not know which one it drives.

Loss normalisation: the LM loss is a mean over the answer tokens of the GLOBAL batch. Each rank
scales its local mean by ``local_tokens * DP / global_tokens`` (one all-reduce of a count), so
DeepSpeed's gradient averaging over DP yields exactly the single-process gradient even when
ranks hold different numbers of answer tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from stts_dist.model.vlm import build_model
from stts_dist import checkpoint as ckpt
from stts_dist.train.optim import build_optimizer, set_learning_rates
from stts_dist.train.phase_timer import phase
from stts_dist.weights.finetune import load_pretrained_weights

DS_TAG = "deepspeed"


class DistributedTrainModule:
    def __init__(self, cfg, tokenizer):
        from megatron.core import parallel_state as ps

        from stts_dist.distributed.deepspeed_engine import DeepSpeedSettings, initialize_engine
        from stts_dist.distributed.parallel import default_single_process_world, initialize_parallel
        from stts_dist.distributed.parallelize import parallelize_vlm

        par = cfg.parallel
        default_single_process_world()      # a single process can still use the engine
        self.layout = initialize_parallel(par.tensor_parallel, par.timeout_s)
        self.cfg = cfg
        self.rank = self.layout.rank
        self.dp_rank, self.dp_size = self.layout.data_parallel_rank, self.layout.data_parallel
        self.tp_rank = self.layout.tensor_parallel_rank
        self.world = {"world_size": self.layout.world_size, "tensor_parallel": self.layout.tensor_parallel}
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
        self.dp_group = ps.get_data_parallel_group()
        torch.manual_seed(cfg.train.seed)          # identical full weights on every rank
        model = build_model(cfg.model, tokenizer)
        parallelize_vlm(model)
        load_pretrained_weights(model, cfg.model.pretrained)      # each TP rank copies only its slices
        model.to(self.device)
        optimizer = build_optimizer(model, cfg.optim)
        settings = DeepSpeedSettings.from_run_config(cfg, data_parallel=self.dp_size,
                                                     grad_accum=par.grad_accum_steps, zero_stage=par.zero_stage)
        settings.stage3_param_persistence_threshold = par.stage3_param_persistence_threshold
        self.engine = initialize_engine(model, optimizer, settings)
        self.model = self.engine.module
        self.zero_stage = par.zero_stage

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Tear the process groups down before the interpreter exits: left alive, gloo's worker
        threads still hold tensors while Python finalizes, and a rank can die with SIGABRT
        ("terminate called without an active exception") after a successful run."""
        from stts_dist.distributed.parallel import destroy_parallel
        destroy_parallel()

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (one tiny all-reduce)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _global_means(self, *values: float) -> list[float]:
        """Means over the data-parallel group, one all-reduce for all values."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)
        return (t / self.dp_size).tolist()

    def train_step(self, batch, step: int, generator: torch.Generator) -> dict[str, float]:
        lrs = set_learning_rates(self.engine.optimizer, step, self.cfg.train.steps, self.cfg.optim)
        self.engine.train()
        with phase("forward"):
            out = self.engine(batch, generator=generator)
        n_local = torch.tensor([float((batch.labels != -100).sum())], dtype=torch.float64)
        n_global = n_local.clone()
        dist.all_reduce(n_global, group=self.dp_group)
        scale = float(n_local) * self.dp_size / max(float(n_global), 1.0)
        loss = out.training_loss(out.lm_loss, out.aux_loss, lm_scale=scale)
        with phase("backward"):
            self.engine.backward(loss)
        with phase("optimizer"):
            self.engine.step()
        gnorm = self.engine.get_global_grad_norm()
        lm, aux = self._global_means(float(out.lm_loss.detach()) * scale, float(out.aux_loss.detach()))
        m = {"loss": out.training_loss(lm, aux), "lm_loss": lm, "aux_loss": aux,
             "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
             "lr": lrs.get("llm", 0.0), "lr_scorer": lrs.get("scorer", 0.0)}
        m.update(out.metrics)
        return m

    # ------------------------------------------------------------------------------------------
    def save_into(self, folder: Path, trainer_state: dict) -> None:
        """DeepSpeed writes model + optimizer shards per (TP, DP) rank; each rank adds its own
        trainer state (RNG differs per rank)."""
        # save_latest: DeepSpeed's own zero_to_fp32.py (shipped in the folder) finds the tag by itself
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=True)
        ckpt.save_torch(trainer_state, folder / f"trainer_rank{self.rank:05d}.pt")

    def load_from(self, folder: Path) -> dict:
        # DeepSpeed's TorchCheckpointEngine unpickles with weights_only=False: a crafted checkpoint
        # would run code on resume. Its reads go through weights_only=True instead.
        engine_load = self.engine.checkpoint_engine.load
        self.engine.checkpoint_engine.load = _load_deepspeed_file_weights_only
        try:
            path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            self.engine.checkpoint_engine.load = engine_load
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {folder}/{DS_TAG}")
        own = folder / f"trainer_rank{self.rank:05d}.pt"
        if not own.is_file():
            raise ckpt.CheckpointError(f"checkpoint {folder} has no state for rank {self.rank} ({own.name})")
        return ckpt.load_torch(own)


def _load_deepspeed_file_weights_only(path: str, map_location=None):
    """DeepSpeed's checkpoint reads, through :func:`load_deepspeed_file` (weights only)."""
    from stts_dist.distributed.deepspeed_engine import load_deepspeed_file
    try:
        return load_deepspeed_file(path, map_location=map_location)
    except Exception as e:
        raise ckpt.CheckpointError(f"cannot load {path} safely (weights_only=True): {e}") from e
