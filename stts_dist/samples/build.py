"""The run's training stack from its config (``RunConfig``, read by attribute).

    in-memory digits, unbalanced   PermutationSampler -> StridedSplit  -> DigitsReader -> collate
    shards (digits_mp4, manifest), unbalanced
                                   ShardOrderSampler  -> StridedSplit  -> ShardReader  -> collate
    any data, balanced             PermutationSampler -> BalancedSplit -> (either reader) -> collate

The unbalanced shard path keeps the data pipeline's shard-friendly epoch order (consecutive rows
from the same few shards); the balancer reads the rows it planned by index wherever they lie, so
it draws from the seeded permutation over all rows (the same order as the in-memory digits).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from data_pipeline.dataset_index import DatasetIndex, load_index
from stts_dist.balance import BalancePlanner, CostModel
from stts_dist.samples.readers import DigitsDataset, DigitsReader, ShardReader
from stts_dist.samples.samplers import PermutationSampler, ShardOrderSampler
from stts_dist.samples.splits import BalancedSplit, StridedSplit
from stts_dist.samples.stack import SampleStack
from stts_dist.samples.tables import digits_table, sample_table
from stts_dist.stts.budget import TokenBudget
from stts_dist.tokenizer import WordTokenizer

UNBOUNDED = 1 << 40            # a budget of 0 in the config: larger than any micro-batch


def digits_dataset(cfg: Any, split: str = "train") -> DigitsDataset:
    """The run's moving-digits clips of ``split`` (train: ``data.train_samples``, eval:
    ``data.eval_samples``), with the run's clip lengths. Only training clips carry follow-up
    questions (``data.follow_up_questions``): held-out clips are asked their own question."""
    d = cfg.data
    size = d.train_samples if split == "train" else d.eval_samples
    return DigitsDataset(size, d.seed, d.num_frames, cfg.model.vit.image_size, d.tasks, split, d.min_frames,
                         d.digit_style, tuple(d.follow_up_questions) if split == "train" else ())


def check_clip_lengths(budget: TokenBudget, index: DatasetIndex) -> None:
    """Shards serve every ratio, so whether each clip of a shard folder's ``index`` is long enough
    for this run's ratio (the first frame is always kept whole) is checked here, at load time,
    naming the fix."""
    ratio = budget.prune_ratio
    too_short = budget.too_short_to_prune(index.frames, index.is_video)
    if too_short.any():
        shortest, longest = int(index.frames[too_short].min()), int(index.frames[too_short].max())
        raise ValueError(f"{int(too_short.sum())} of {len(index)} clips in {index.root} have too few frames "
                         f"({shortest}-{longest}) to prune model.stts.prune_ratio={ratio} and keep their first frame: "
                         f"lower the ratio to <= {(shortest - 1) / shortest:.3f}, or drop clips of {longest} frames "
                         f"or fewer from the manifest")


def balanced_split(cfg: Any, budget: TokenBudget, table: Any, dp_rank: int, dp_size: int, vocab_size: int,
                   exact_text: bool) -> BalancedSplit:
    """The balancer of ``cfg.balance`` over ``table``, costing samples with the run's model."""
    b = cfg.balance
    cost_model = dataclasses.replace(CostModel.from_model_config(cfg.model),
                                     llm_vocab=cfg.model.llm.vocab_size or vocab_size)
    planner = BalancePlanner(dp_size, 1, b.max_llm_tokens_per_micro or UNBOUNDED,
                             b.max_vit_frames_per_micro or UNBOUNDED, seed=cfg.data.seed, method=b.method,
                             cost_model=cost_model, align=1)
    return BalancedSplit(table, planner, b.window or cfg.train.batch_size, dp_rank, exact_text)


def training_stack(cfg: Any, budget: TokenBudget, dp_rank: int, dp_size: int, shard_dir: Optional[Path],
                   tokenizer: Any) -> SampleStack:
    """The run's training source; ``budget`` (the model's) fixes the token counts it checks and
    plans, ``tokenizer`` the text-token counts the balancer plans with. ``cfg.balance.enabled``
    must be settled (``stts_dist.train.sources.resolve_balancing``)."""
    d = cfg.data
    if d.source == "digits":
        reader: Any = DigitsReader(digits_dataset(cfg), d.num_workers)
    else:
        if shard_dir is None:
            raise ValueError(f"data.source={d.source} needs its shard folder; call prepare_shards first")
        index = load_index(shard_dir)
        check_clip_lengths(budget, index)
        reader = ShardReader(index, d.num_workers)
    if not cfg.balance.enabled:
        if d.source == "digits":
            sampler: Any = PermutationSampler(len(reader), cfg.train.batch_size, d.seed)
        else:
            sampler = ShardOrderSampler(reader.index, cfg.train.batch_size, d.seed, dp_rank, dp_size)
        return SampleStack(sampler, StridedSplit(dp_rank, dp_size), reader)
    # pruning-aware split of each global batch across DP ranks
    if d.source != "digits" and not isinstance(tokenizer, WordTokenizer):
        raise ValueError(f"balance.enabled=true over shards needs the word tokenizer: {shard_dir}/index.json counts "
                         f"the words of every question and answer, and this run's {type(tokenizer).__name__} splits "
                         "text differently, so the balancer's token budgets would not hold; set balance.enabled=false "
                         "(or leave it unset: auto turns it off)")
    if d.source == "digits":
        table = digits_table(budget, reader.dataset, tokenizer)
    else:
        if (index.patches_per_frame != budget.patches_per_frame).any():
            raise ValueError(f"{shard_dir} was sharded with {int(index.patches_per_frame[0])} patches per frame "
                             f"but the model sees {budget.patches_per_frame}; re-shard at model.vit.image_size")
        table = sample_table(budget, index.frames, index.text_tokens, index.turns)
    split = balanced_split(cfg, budget, table, dp_rank, dp_size, tokenizer.vocab_size, reader.exact_text)
    window = cfg.balance.window or cfg.train.batch_size
    return SampleStack(PermutationSampler(len(table), window, d.seed), split, reader)
