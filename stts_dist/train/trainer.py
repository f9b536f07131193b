"""The training loop. Cross-cutting concerns (logging, tracking) are callbacks; the model,
optimizer and any parallel engine live in a "train module" (``stts_dist.train.train_module``: one
interface, a local and a distributed implementation)."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from stts_dist.config import DIGITS_SOURCES, config_hash, model_config_changes, to_yaml
from stts_dist.data.batch import SequenceBuilder
from stts_dist.device import resolve_device
from stts_dist.evaluation import evaluate
from stts_dist.plots import plot_accuracy_vs_tokens, rows_from_trainer_eval
from stts_dist.host_allocator import keep_freed_blocks
from stts_dist.heldout import describe_unknown_words, training_eval_set, unknown_word_report
from stts_dist.model.vlm import VideoVLM
from stts_dist import checkpoint as ckpt
from stts_dist.checkpoint_io import CONFIG_FILE
from stts_dist.train.loop_callbacks import InjectedFault, loop_callbacks  # noqa: F401  (InjectedFault: callers catch it here)
from stts_dist.samples import training_stack
from stts_dist.train.sources import prepare_shards, resolve_balancing
from stts_dist.train.stage0 import ensure_digits_vit
from stts_dist.train.train_module import build_train_module, uses_distributed_engine
from stts_dist.train.vocabulary import build_tokenizer
from stts_dist.train import phase_timer


class ConsoleLogger:
    """Prints metrics every ``log_every`` steps (rank 0); ``level`` quiet prints no step lines,
    debug every step."""

    def __init__(self, every: int, level: str = "info"):
        self.every = {"quiet": 0, "info": max(1, every), "debug": 1}[level]

    def on_train_start(self, trainer) -> None:
        # ZeRO-3 leaves partitioned parameters empty locally; ds_numel is the full size (under TP,
        # of this rank's slice).
        n = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
        trainer.log(f"[train] {trainer.cfg.name}: {n / 1e6:.2f}M parameters, method={trainer.cfg.model.stts.method} "
                    f"prune_ratio={trainer.cfg.model.stts.prune_ratio}, steps {trainer.step}->{trainer.cfg.train.steps}")

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self.every and (step % self.every == 0 or step == 1):
            keys = ["loss", "aux_loss", "lr", "vit_tokens_before", "vit_tokens_after", "llm_visual_tokens",
                    "step_time", "samples_per_s", "tokens_per_s"]
            trainer.log(f"[step {step}] " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        trainer.log(f"[eval @ {step}] " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())
                                                    if isinstance(v, float)))

    def on_checkpoint(self, trainer, step: int, path: str) -> None:
        trainer.log(f"[checkpoint] step {step} -> {path}")

    def on_artifact(self, trainer, path: str, artifact_dir: Optional[str] = None) -> None:
        pass

    def on_train_end(self, trainer, status: str) -> None:
        trainer.log(f"[train] {status} at step {trainer.step}")


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written. Exit code 143 tells launchers to requeue."""
    exit_code = 143


class EvalHistory:
    """Appends every evaluation to ``<out_dir>/eval_history.jsonl`` (rank 0), one JSON object per
    line with its step: the run's learning curve on held-out data, readable without a tracking
    server (e.g. to decide whether a model has converged). A resumed run appends; a step evaluated
    twice keeps both lines, the later one wins for readers."""

    FILE = "eval_history.jsonl"

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        if trainer.is_rank0:
            with open(trainer.out_dir / self.FILE, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_eval_history(out_dir) -> dict[int, dict]:
    """``{step: metrics}`` from a run folder's ``eval_history.jsonl`` (empty if there is none)."""
    path = Path(out_dir) / EvalHistory.FILE
    out: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[int(row.pop("step"))] = row
    return dict(sorted(out.items()))


class StepLog:
    """Every step's metrics, one JSON line each, in ``<out_dir>/train_log.jsonl`` (rank 0): the
    per-step detail the console leaves out. A resumed run appends."""

    FILE = "train_log.jsonl"

    def __init__(self):
        self._file: Any = None

    def on_train_start(self, trainer) -> None:
        if trainer.is_rank0:
            self._file = open(trainer.out_dir / self.FILE, "a", buffering=1)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **{k: v for k, v in metrics.items()
                                                          if isinstance(v, (int, float))}}) + "\n")

    def on_train_end(self, trainer, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def default_callbacks(cfg) -> list:
    cbs: list = [ConsoleLogger(cfg.train.log_every, cfg.train.log_level), EvalHistory(), StepLog()]
    if cfg.balance.enabled:
        from stts_dist.train.balance_callback import BalanceLogger
        cbs.append(BalanceLogger(cfg.train.log_every))
    if cfg.tracking.enabled:
        from stts_dist.tracking.mlflow_callback import MLflowCallback
        cbs.append(MLflowCallback(cfg.tracking))
    from stts_dist.faults import sample_log_callbacks
    cbs.extend(sample_log_callbacks())   # STTS_SAMPLE_LOG=path: per-step sample ids (tools/fault_drill.py)
    return cbs


class Trainer:
    def __init__(self, cfg, callbacks: Optional[list] = None, module: Any = None, launch_method: Optional[str] = None):
        import os
        self.cfg = cfg
        # set by slurm/train.sh and the Ray launcher; torchrun sets WORLD_SIZE
        self.launch_method = launch_method or os.environ.get(
            "STTS_LAUNCHER", "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local")
        self.last_batch_ids: list[str] = []
        self._bar: Any = None             # the rank-0 progress bar while fit() runs
        self.device = resolve_device(cfg.train.device)
        host_allocator = keep_freed_blocks() if self.device.type == "cpu" and cfg.train.keep_freed_host_memory else None
        torch.manual_seed(cfg.train.seed)
        # stage 0 (the digit-reading ViT) belongs to the digits task; a user's data starts from
        # model.pretrained.vit_path (or from scratch)
        shard_dir = self._prepare_data(module is None and cfg.data.source in DIGITS_SOURCES)
        self.tokenizer = build_tokenizer(cfg, shard_dir)
        self.module = module or build_train_module(cfg, self.tokenizer, self.device)
        self.model: VideoVLM = self.module.model
        self.rank = getattr(self.module, "rank", 0)
        self.dp_rank = getattr(self.module, "dp_rank", 0)
        self.dp_size = getattr(self.module, "dp_size", 1)
        self.is_rank0 = self.rank == 0
        if host_allocator:
            self.log(f"[host] {host_allocator}")
        if cfg.train.batch_size % self.dp_size:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} (global) must be divisible by the "
                             f"data-parallel size {self.dp_size}")
        m = cfg.model
        # the run's token budget, built once (with the model, from cfg.model): the batches, the
        # source's clip-length check / balancer and the evaluation settings all count with it
        self.budget = self.model.budget
        self.builder = SequenceBuilder(self.tokenizer, self.budget, m.vit.image_size)
        d = cfg.data
        self.log(f"[data] {resolve_balancing(cfg, shard_dir, self.dp_size)}")   # settles balance.enabled
        # the sample-source stack (sampler -> split -> reader -> collate, stts_dist/samples/)
        self.source = training_stack(cfg, self.budget, self.dp_rank, self.dp_size, shard_dir, self.tokenizer)
        self.eval_set: list[dict] = training_eval_set(cfg)
        if not self.eval_set:
            self.log(f"[eval] data.source={d.source} without data.eval_path: no accuracy evaluation; set "
                     "data.eval_path=YOUR_HELDOUT.jsonl (a manifest like the training one) to measure it")
        self.unknown_words = (unknown_word_report(self.tokenizer, self.eval_set)
                              if self.eval_set and d.source not in DIGITS_SOURCES else None)
        if self.unknown_words and self.unknown_words["unknown"]:
            self.log(f"[eval] {describe_unknown_words(self.unknown_words)}")
        user = callbacks if callbacks is not None else default_callbacks(cfg)
        before, after = loop_callbacks(cfg)
        self.callbacks = before + list(user) + after
        self._stop_signal: Optional[int] = None
        self.step = 0
        self.state: dict = {}
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.history: list[dict] = []
        self._saved_step: Optional[int] = None

    def _prepare_data(self, stage0: bool) -> Optional[Path]:
        """One-off set-up before the model exists, done by rank 0 while the other ranks wait:
        the stage-0 ViT (cached), the videos sharded with Ray and their vocabulary learned (both
        skipped when current). Returns the run's shard folder (None for in-memory digits)."""
        cfg = self.cfg
        rank0 = int(os.environ.get("RANK", "0")) == 0
        barrier = lambda: None                                                    # noqa: E731
        if uses_distributed_engine(cfg):
            from stts_dist.distributed.parallel import preparation_barrier
            barrier = preparation_barrier(cfg.parallel.timeout_s)
        log = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
        if rank0:
            if stage0:
                ensure_digits_vit(cfg, True, log)
            prepare_shards(cfg, log)          # videos -> Ray -> WebDataset shards (once)
        barrier()
        if stage0 and not rank0:
            ensure_digits_vit(cfg, False, log)                  # rank 0 wrote it: now a cache hit
        return prepare_shards(cfg, lambda msg: None)            # now a no-op check on every rank

    # ------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_rank0:
            if self._bar is not None:    # above the progress bar, which stays on the last line
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def _world(self) -> dict:
        return getattr(self.module, "world", {"world_size": 1, "tensor_parallel": 1})

    def save(self) -> Path:
        """Every rank writes its part into the temporary folder; the module's ``checkpoint_barrier``
        orders the manifest (rank 0) after all parts."""
        trainer_state = {"source": self.source.state_dict(), "step": self.step, "rng": ckpt.rng_state(),
                         "trainer_state": dict(self.state)}

        def write(tmp: Path) -> None:
            self.module.save_into(tmp, trainer_state)
            if self.is_rank0:
                (tmp / CONFIG_FILE).write_text(to_yaml(self.cfg))
                (tmp / "tokenizer.json").write_text(self.tokenizer.to_json())

        self._saved_step = self.step
        path = ckpt.write_checkpoint(self.ckpt_root, self.step, write,
                                     {"config_hash": config_hash(self.cfg), "world": self._world()},
                                     is_rank0=self.is_rank0, barrier=getattr(self.module, "barrier", None))
        self._emit("on_checkpoint", self.step, str(path))
        return path

    def maybe_resume(self) -> bool:
        if not self.cfg.train.resume:
            return False
        found = ckpt.find_resumable(self.ckpt_root, self.log if self.is_rank0 else (lambda m: None))
        if found is None:
            return False
        path, manifest = found
        ckpt.check_layout(manifest, self._world())
        saved_config = path / CONFIG_FILE
        changed = model_config_changes(saved_config, self.cfg) if saved_config.is_file() else []
        if changed:
            self.log(f"[resume] warning: {path} holds a model trained with other model settings ({'; '.join(changed)}); "
                     f"this run continues that model. To train the new settings from scratch, give it another "
                     f"train.out_dir")
        state = self.module.load_from(path)
        self.source.load_state_dict(state["source"])
        self.step = int(state["step"])
        self.state = dict(state.get("trainer_state", {}))
        ckpt.set_rng_state(state["rng"])
        self._saved_step = self.step
        self.log(f"[resume] from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------------------------------
    def evaluate(self, methods_ratios: Optional[list[tuple[str, float]]] = None) -> dict[str, float]:
        s = self.cfg.model.stts
        if methods_ratios is None:
            methods_ratios = [("none" if r == 0 else s.method, r) for r in self.cfg.train.eval_prune_ratios]
            methods_ratios += [(m, r) for r in self.cfg.train.eval_prune_ratios if r > 0
                               for m in self.cfg.train.eval_methods if m != s.method]
        samples = self.eval_set
        if not samples:
            return {}
        # Data-parallel ranks share the eval set (each runs the same number of batches, so ZeRO-3's
        # collective parameter gathers stay in step); under TP every rank evaluates all of it.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        split = self.dp_size > 1 and self.dp_size == world and len(samples) % self.dp_size == 0
        out: dict[str, float] = {}
        for method, ratio in methods_ratios:
            res = evaluate(self.model, self.tokenizer, samples, method, ratio, seed=self.cfg.data.seed,
                           adaptive_strength=self.budget.adaptive_strength,
                           rank=self.dp_rank if split else 0, world=self.dp_size if split else 1)
            tag = f"{method}@{ratio:g}"
            for k, v in res.items():
                if k != "n":
                    out[f"eval/{tag}/{k}"] = float(v)
        if self.unknown_words is not None:
            out["eval/unknown_word_share"] = float(self.unknown_words["share"])
        self._emit("on_eval_end", self.step, out)
        return out

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        self._emit("on_train_start")
        total = cfg.train.steps
        # This data-parallel rank's share of each global batch (TP peers share a dp_rank, so they
        # receive identical samples), built ahead in loader workers, with the source state after
        # each step so checkpoints record the exact position.
        batches = self.source.batches(max(0, total - self.step), _Collate(self.builder))
        batches = phase_timer.timed_batches(batches)      # STTS_PHASE_TIMES=1 only (tools/bench_train.py)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000003 + self.step)
        status = "FAILED"
        previous = self._install_signal_handlers()
        try:
            bar = self._bar = _progress(cfg.train.progress_bar and self.is_rank0, self.step, total)
            for batch, source_state in batches:
                t0 = time.perf_counter()
                self._emit("on_step_begin", self.step)
                batch = batch.to(self.device)
                self.last_batch_ids = list(batch.ids)
                metrics = self.module.train_step(batch, self.step, gen)
                metrics.update(getattr(self.source, "last_metrics", None) or {})   # e.g. balance/*
                dt = time.perf_counter() - t0
                metrics.update(step_time=dt, samples_per_s=batch.size / dt,
                               tokens_per_s=(metrics["vit_tokens_after"] + metrics["llm_tokens"]) * batch.size / dt)
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step}; lower optim.lr or check the data")
                self.step += 1
                self.history.append({"step": self.step, **metrics})
                if bar:
                    bar.update(1)
                    # the bar itself shows steps/s and the ETA
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", kept=f"{metrics['llm_visual_tokens']:.0f}",
                                    samples_s=f"{metrics['samples_per_s'] * self.dp_size:.1f}", refresh=False)
                # logging, then the loop's own snapshots / checkpoints / evaluations (loop_callbacks.py)
                metrics.update(phase_timer.collect())           # phase/* seconds, STTS_PHASE_TIMES=1 only
                with phase_timer.phase("logging"):
                    self._emit("on_step_end", self.step, metrics)
                stop = self._stop_signal is not None
                any_rank = getattr(self.module, "any_rank", None)
                if any_rank is not None:
                    # signals reach ranks at slightly different times: agree on the step to stop
                    # at, or ranks would meet in different collectives and hang
                    stop = any_rank(stop)
                if stop:
                    sig = self._stop_signal or signal.SIGTERM
                    self.log(f"[signal] {signal.Signals(sig).name} received: checkpointing at step {self.step}")
                    if self._saved_step != self.step:
                        self.save()
                    status = "KILLED"
                    raise Preempted(f"stopped by {signal.Signals(sig).name} at step {self.step}")
            if bar:
                bar.close()
                self._bar = None
            if total > 0 and self._saved_step != self.step:
                self.save()
            last_eval = self.evaluate()
            self._plot_final_eval(last_eval)
            status = "FINISHED"
            return last_eval
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._restore_signal_handlers(previous)
            self._emit("on_train_end", status)

    def close(self) -> None:
        """Release the train module (process groups); call once the run's output is written."""
        self.module.close()

    def _plot_final_eval(self, results: dict[str, float]) -> None:
        """Accuracy vs LLM visual tokens of the final evaluation, one point per setting, written to
        ``<out_dir>/eval/`` and handed to the callbacks (MLflow: artifact folder ``eval``)."""
        rows = rows_from_trainer_eval(results)
        if not self.is_rank0 or not rows or rows[0]["kind"] != "baseline":
            return
        path = self.out_dir / "eval" / f"accuracy_vs_tokens_step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_accuracy_vs_tokens(rows, path, f"{self.cfg.name} at step {self.step}: {len(self.eval_set)} held-out clips")
        self._emit("on_artifact", str(path), "eval")

    def snapshot_kept_tokens(self) -> None:
        """Picture of what STTS keeps on a fixed held-out clip (every rank takes part: ZeRO-3
        gathers parameters collectively; rank 0 writes it and hands it to the callbacks, e.g.
        MLflow as an artifact under kept_tokens/)."""
        from stts_dist.visualize import snapshot_for_trainer
        if not self.eval_set:
            return
        path = snapshot_for_trainer(self.model, self.eval_set[0], self.out_dir, self.step, write=self.is_rank0)
        if path is not None:
            self._emit("on_artifact", str(path), "kept_tokens")

    def _install_signal_handlers(self) -> dict:
        """SIGTERM (Slurm preemption, torchrun shutdown) and SIGUSR1 (sbatch --signal) finish the
        current step, write a checkpoint and exit with 143."""
        def handler(signum, frame):
            self._stop_signal = signum
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:       # not the main thread (e.g. inside some launchers)
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


class _Collate:
    """Picklable collate for loader workers."""

    def __init__(self, builder: SequenceBuilder):
        self.builder = builder

    def __call__(self, samples):
        return self.builder(samples)


def _progress(enabled: bool, start: int, total: int):
    """The rank-0 progress bar, on a terminal only: in a log file (Slurm, Ray, a redirect) every
    redraw would be a line of its own, and the step lines say the same."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=2.0)
