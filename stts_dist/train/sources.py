"""Where training batches come from: one interface, several sources.

- ``digits``      the moving-digits task generated in memory (fast unit tests, debugging);
- ``digits_mp4``  the same videos written as real mp4 files + a manifest, sharded by Ray into
                  WebDataset shards, read back by the data pipeline's loader (the full user path);
- ``manifest``    a user's JSONL manifest of videos: sharded first (skipped when current);
- ``shards``      an existing shard folder.

Every source yields, per step, THIS data-parallel rank's share of the global batch, collated,
together with the source state after that step, so a checkpoint records the exact position and
a resumed run consumes exactly the samples the uninterrupted run would have.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from stts_dist.data.digits import make_sample
from stts_dist.stts.budget import TokenBudget
from stts_dist.train.data import DigitsDataset, EpochSampler, prefetching_batches



class DigitsSource:
    def __init__(self, cfg, dp_rank: int, dp_size: int):
        d, m = cfg.data, cfg.model
        self.dataset = DigitsDataset(d.train_samples, d.seed, d.num_frames, m.vit.image_size, d.tasks, "train",
                                     d.min_frames, d.digit_style)
        self.sampler = EpochSampler(len(self.dataset), cfg.train.batch_size, d.seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = d.num_workers

    def batches(self, num_steps: int, collate: Callable) -> Iterator[tuple[Any, dict]]:
        start = self.sampler.state_dict()
        plan = []
        for _ in range(num_steps):
            idx = self.sampler.next_batch()
            plan.append((idx[self.dp_rank::self.dp_size], self.sampler.state_dict()))
        self.sampler.load_state_dict(start)
        for (_, state), batch in zip(plan, prefetching_batches(self.dataset, [p[0] for p in plan], collate,
                                                                self.num_workers)):
            self.sampler.load_state_dict(state)
            yield batch, state

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def check_clip_lengths(budget: TokenBudget, shard_dir: Path) -> None:
    """Shards serve every ratio, so whether each clip is long enough for this run's ratio (the
    first frame is always kept whole) is checked here, at load time, naming the fix."""
    from data_pipeline.dataset_index import load_index
    ratio = budget.prune_ratio
    index = load_index(shard_dir)
    too_short = budget.too_short_to_prune(index.frames, index.is_video)
    if too_short.any():
        shortest, longest = int(index.frames[too_short].min()), int(index.frames[too_short].max())
        raise ValueError(f"{int(too_short.sum())} of {len(index)} clips in {shard_dir} have too few frames "
                         f"({shortest}-{longest}) to prune model.stts.prune_ratio={ratio} and keep their first frame: "
                         f"lower the ratio to <= {(shortest - 1) / shortest:.3f}, or drop clips of {longest} frames "
                         f"or fewer from the manifest")


class ShardSource:
    """The data pipeline's ``VideoLoader`` over a shard folder (decoding in its workers)."""

    def __init__(self, cfg, budget: TokenBudget, shard_dir: Path, dp_rank: int, dp_size: int):
        from data_pipeline.loader import VideoLoader
        check_clip_lengths(budget, shard_dir)
        d = cfg.data
        self.local_batch = cfg.train.batch_size // dp_size
        self.loader = VideoLoader({"datasets": [{"path": str(shard_dir)}], "seed": d.seed,
                                   "num_workers": d.num_workers}, dp_rank=dp_rank, dp_size=dp_size)
        if self.loader.steps_per_epoch(self.local_batch) == 0:
            raise ValueError(f"{shard_dir} holds too few samples for a global batch of {cfg.train.batch_size} "
                             f"over {dp_size} data-parallel ranks")

    def batches(self, num_steps: int, collate: Callable) -> Iterator[tuple[Any, dict]]:
        it = self.loader.iter_batches(self.local_batch, collate, epochs=None)
        for _ in range(num_steps):
            batch = next(it)
            yield batch, self.loader.state_dict()
        it.close()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def sharding_overrides(cfg) -> dict:
    """The sharding settings that must agree with the model that trains on the shards."""
    m, d = cfg.model, cfg.data
    return {"image_size": m.vit.image_size, "patch_size": m.vit.patch_size, "pool_size": m.connector.pool_size,
            "max_frames": d.num_frames, "fps": d.fps, "num_cpus": d.shard_cpus, "progress_bar": False}


def prepare_shards(cfg, log: Callable[[str], None] = print) -> Optional[Path]:
    """Rank 0 only: make sure the shard folder the run reads exists (write the synthetic mp4s,
    shard with Ray). Returns the shard folder, or None for the in-memory source."""
    d = cfg.data
    if d.source == "digits":
        return None
    from data_pipeline.build_shards import ensure_shards, keyed_shard_dir
    work = Path(d.work_dir)
    if d.source == "shards":
        return ensure_shards(d.path, d.path)
    if d.source == "manifest":    # one folder per input (manifest bytes + frame geometry), any ratio
        out = keyed_shard_dir(work, d.path, sharding_overrides(cfg))
        log(f"[data] sharding {d.path} with Ray into {out} (skipped when the shards are current)")
        return ensure_shards(d.path, out, sharding_overrides(cfg))
    # digits_mp4: the complete user path on generated data
    from data_pipeline.synth_digits import write_synthetic
    tasks = "-".join(sorted(d.tasks))
    lengths = f"t{d.min_frames}-{d.num_frames}" if 0 < d.min_frames < d.num_frames else f"t{d.num_frames}"
    tag = f"n{d.train_samples}_{lengths}_s{cfg.model.vit.image_size}_seed{d.seed}_{d.digit_style}_{tasks}"
    manifest = work / f"digits_mp4_{tag}" / "manifest.jsonl"
    if not manifest.is_file():
        log(f"[data] writing {d.train_samples} moving-digits mp4 clips ({d.digit_style} digits, "
            f"{lengths[1:]} frames) to {manifest.parent}")
        write_synthetic(manifest.parent, d.train_samples, d.num_frames, cfg.model.vit.image_size, d.seed,
                        list(d.tasks), "train", functools.partial(make_sample, style=d.digit_style),
                        min_frames=d.min_frames)
    log(f"[data] sharding {manifest} with Ray (skipped when the shards are current)")
    return ensure_shards(manifest, work / f"digits_shards_{tag}", sharding_overrides(cfg))


def resolve_balancing(cfg, shard_dir: Optional[Path], dp_size: int) -> str:
    """Settle ``balance.enabled`` when the config leaves it null (auto) and return the one-line
    reason. Auto turns the balancer on exactly when there is something to balance: the clips vary
    in length (data.min_frames for the generated digits, the shard index's frame counts for
    shards) and at least two data-parallel ranks share each batch. It stays off, saying why, when
    the run asks for what the balancer cannot do (adaptive budgets, gradient accumulation)."""
    b, d = cfg.balance, cfg.data
    if b.enabled is not None:
        return f"balance.enabled={str(b.enabled).lower()} (set in the config)"
    if d.source == "digits":
        lengths = (d.min_frames or d.num_frames, d.num_frames)
    else:
        from data_pipeline.dataset_index import load_index
        frames = load_index(shard_dir).frames
        lengths = (int(frames.min()), int(frames.max())) if len(frames) else (0, 0)
    varies = lengths[0] != lengths[1]
    spread = f"clips of {lengths[0]}-{lengths[1]} frames" if varies else f"every clip has {lengths[1]} frames"
    if not varies or dp_size < 2:
        b.enabled = False
        why = spread if not varies else f"{spread} but one data-parallel rank"
        return f"balancing off (auto: {why}; nothing to balance)"
    if cfg.model.stts.adaptive or cfg.parallel.grad_accum_steps != 1:
        b.enabled = False
        what = "model.stts.adaptive" if cfg.model.stts.adaptive else "parallel.grad_accum_steps > 1"
        return f"balancing off (auto: {spread}, but {what} is set, which the balancer does not plan for)"
    b.enabled = True
    return f"balancing on (auto: {spread} over {dp_size} data-parallel ranks; balance.enabled=false turns it off)"


def build_source(cfg, budget: TokenBudget, dp_rank: int, dp_size: int, shard_dir: Optional[Path],
                 tokenizer: Any = None):
    """The run's training source; ``budget`` (the trainer's) fixes the token counts it checks / plans."""
    if cfg.balance.enabled:    # pruning-aware split of each global batch across DP ranks
        from stts_dist.train.balanced_source import BalancedSource
        return BalancedSource.from_config(cfg, dp_rank, dp_size, shard_dir, tokenizer, budget)
    if cfg.data.source == "digits":
        return DigitsSource(cfg, dp_rank, dp_size)
    if shard_dir is None:
        raise ValueError(f"data.source={cfg.data.source} needs its shard folder; call prepare_shards first")
    return ShardSource(cfg, budget, shard_dir, dp_rank, dp_size)
