"""A run's data, before the first step: the shard folder it reads and whether it is balanced.

- ``digits``      the moving-digits task generated in memory (fast unit tests, debugging);
- ``digits_mp4``  the same videos written as real mp4 files + a manifest, sharded by Ray into
                  WebDataset shards (the full user path);
- ``manifest``    a user's JSONL manifest of videos: sharded first (skipped when current);
- ``shards``      an existing shard folder.

:func:`prepare_shards` (rank 0) makes the shard folder exist; :func:`resolve_balancing` settles
``balance.enabled``. The samples themselves come from the sample-source stack
(``stts_dist.samples``: sampler -> split -> reader -> collate), built by
``stts_dist.samples.training_stack``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

from data_pipeline.build_shards import ensure_shards, keyed_shard_dir
from data_pipeline.dataset_index import load_index
from data_pipeline.synth_digits import write_synthetic
from stts_dist.data.digits import make_sample


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
    work = Path(d.work_dir)
    if d.source == "shards":
        return ensure_shards(d.path, d.path)
    if d.source == "manifest":    # one folder per input (manifest bytes + frame geometry), any ratio
        out = keyed_shard_dir(work, d.path, sharding_overrides(cfg))
        log(f"[data] sharding {d.path} with Ray into {out} (skipped when the shards are current)")
        return ensure_shards(d.path, out, sharding_overrides(cfg))
    # digits_mp4: the complete user path on generated data
    tasks = "-".join(sorted(d.tasks))
    lengths = f"t{d.min_frames}-{d.num_frames}" if 0 < d.min_frames < d.num_frames else f"t{d.num_frames}"
    follow_ups = "_followups-" + "-".join(sorted(d.follow_up_questions)) if d.follow_up_questions else ""
    tag = f"n{d.train_samples}_{lengths}_s{cfg.model.vit.image_size}_seed{d.seed}_{d.digit_style}_{tasks}{follow_ups}"
    manifest = work / f"digits_mp4_{tag}" / "manifest.jsonl"
    if not manifest.is_file():
        log(f"[data] writing {d.train_samples} moving-digits mp4 clips ({d.digit_style} digits, "
            f"{lengths[1:]} frames{', follow-up questions' if follow_ups else ''}) to {manifest.parent}")
        write_synthetic(manifest.parent, d.train_samples, d.num_frames, cfg.model.vit.image_size, d.seed,
                        list(d.tasks), "train",
                        functools.partial(make_sample, style=d.digit_style, follow_ups=tuple(d.follow_up_questions)),
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
        frames = load_index(shard_dir).frames
        lengths = (int(frames.min()), int(frames.max())) if len(frames) else (0, 0)
    varies = lengths[0] != lengths[1]
    spread = f"clips of {lengths[0]}-{lengths[1]} frames" if varies else f"every clip has {lengths[1]} frames"
    if not varies or dp_size < 2:
        b.enabled = False
        why = spread if not varies else f"{spread} but one data-parallel rank"
        return f"balancing off (auto: {why}; nothing to balance)"
    pre = cfg.model.pretrained
    if d.source != "digits" and (pre.tokenizer_path or pre.llm_path):
        b.enabled = False
        return (f"balancing off (auto: {spread}, but the shard index counts words and this run tokenizes with the "
                "pretrained LLM's tokenizer, whose token counts the balancer cannot plan from metadata)")
    if cfg.model.stts.adaptive or cfg.parallel.grad_accum_steps != 1:
        b.enabled = False
        what = "model.stts.adaptive" if cfg.model.stts.adaptive else "parallel.grad_accum_steps > 1"
        return f"balancing off (auto: {spread}, but {what} is set, which the balancer does not plan for)"
    b.enabled = True
    return f"balancing on (auto: {spread} over {dp_size} data-parallel ranks; balance.enabled=false turns it off)"
