"""A training source whose global batches are split across data-parallel ranks by the
pruning-aware token balancer (``stts_dist.balance``, design in docs/balancing.md).

Per global step, every rank

1. draws the same candidate window (``EpochSampler`` over ``balance.CandidateWindow``: epoch ``e``
   is the seeded permutation ``default_rng([seed, e])``, ragged tail dropped -- the unbalanced
   ``DigitsSource`` order);
2. runs :class:`~stts_dist.balance.BalancePlanner` on the window's *metadata* plus the samples
   deferred from earlier steps (``balance.schedule.plan_window``, as ``BalancedSchedule`` does),
   and gets the same :class:`~stts_dist.balance.Plan` as every other rank (a pure function of
   seed, step, metadata and planner state: no pixels move, no collective, no driver);
3. generates / decodes only its own samples and collates them into one packed sequence
   (``SequenceBuilder``: per-sample ``seq_lengths``, no cross-sample attention).

One micro-batch per rank per step (``micro_batches_per_rank=1``), so every rank runs exactly one
forward/backward per step -- ZeRO-3 hangs when ranks run different numbers of forwards. Samples
that do not fit the per-micro-batch budgets are deferred to the next step, never dropped. The
window position and the planner state (deferred samples with their ages) are the source state
saved in checkpoints; resume needs the same DP degree, budgets, seed and method (the planner
refuses anything else, naming the difference).

Token counts: the planner budgets the exact packed-sequence length that ``SequenceBuilder``
produces for each sample, from the run's :class:`~stts_dist.stts.budget.TokenBudget` -- LLM
visual tokens ``G*T - int(G*r*T)`` plus text tokens (the builder's ``SPECIAL_TOKENS``, question,
answer, and one separator per frame when enabled). Every
collated batch is checked against the plan, so metadata that disagrees with the data is an
error instead of a silently broken budget.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from stts_dist.balance import BalancePlanner, CostModel, Plan, SampleTable, balance_metrics, in_order_imbalance
from stts_dist.balance.schedule import plan_window
from stts_dist.data.batch import SPECIAL_TOKENS
from stts_dist.stts.budget import TokenBudget
from stts_dist.train.data import DigitsDataset, EpochSampler, prefetching_batches
from stts_dist.train.vocabulary import build_tokenizer

UNBOUNDED = 1 << 40            # a budget of 0 in the config: larger than any micro-batch
PLAN_AHEAD = 64                # steps planned (and prefetched by loader workers) at a time
STATE_VERSION = 1


class TokenCountMismatch(RuntimeError):
    """A collated sample's sequence length differs from the length the planner budgeted."""


# ---------------------------------------------------------------------------------------------
# Metadata tables (what the planner sees)

def visual_tokens(budget: TokenBudget, frames: np.ndarray) -> np.ndarray:
    """LLM visual tokens per sample, shape ``(n,)``: ``budget.llm_visual_tokens`` itself,
    evaluated once per distinct frame count (so the rounding is exactly the builder's)."""
    frames = np.asarray(frames, dtype=np.int64)
    distinct, inverse = np.unique(frames, return_inverse=True)
    per_t = np.array([budget.llm_visual_tokens(int(t), int(t) > 1) for t in distinct.tolist()], dtype=np.int64)
    return per_t[inverse.reshape(-1)]


def sample_table(budget: TokenBudget, frames: np.ndarray, text_tokens: np.ndarray) -> SampleTable:
    """What the planner sees of samples with ``frames`` (n,) frames and ``text_tokens`` (n,)
    question + answer tokens (specials excluded): rows ``0..n-1``, the text column counting every
    non-visual token of the packed sequence (specials and frame separators included)."""
    frames = np.asarray(frames, dtype=np.int64)
    other = np.asarray(text_tokens, dtype=np.int64) + SPECIAL_TOKENS + budget.separator_tokens(frames)
    n = len(frames)
    return SampleTable(index=np.arange(n), frames=frames, patches_per_frame=np.full(n, budget.patches_per_frame),
                       groups_per_frame=np.full(n, budget.groups_per_frame),
                       llm_visual_tokens=visual_tokens(budget, frames), text_tokens=other, is_video=frames > 1)


def digits_text_tokens(dataset: DigitsDataset, tokenizer: Any) -> np.ndarray:
    """Question + answer tokens of every digits sample, shape ``(len(dataset),)``, without
    rendering a frame: the task is the first draw of the sample's generator in ``make_sample``
    (``default_rng([seed, index, split])``), and each task has a fixed question and one-word
    answers. The source checks every collated batch against these counts."""
    from stts_dist.data.digits import ANSWERS, QUESTIONS
    split = 0 if dataset.split == "train" else 1
    per_task = []
    for task in dataset.tasks:
        answer_tokens = {len(tokenizer.encode(a)) for a in ANSWERS[task]}
        per_task.append(len(tokenizer.encode(QUESTIONS[task])) + max(answer_tokens))
    per_task_arr = np.asarray(per_task, dtype=np.int64)
    draws = np.fromiter((np.random.default_rng([dataset.seed, i, split]).integers(len(dataset.tasks))
                         for i in range(len(dataset))), dtype=np.int64, count=len(dataset))
    return per_task_arr[draws]


# ---------------------------------------------------------------------------------------------
# Readers: rows -> collated batches, only this rank's rows are ever generated or decoded

class DigitsRowReader:
    """In-memory digits videos by dataset row (generated in loader workers)."""

    exact_text = True

    def __init__(self, dataset: DigitsDataset, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers

    def batches(self, row_lists: list[list[int]], collate: Callable) -> Iterator[Any]:
        yield from prefetching_batches(self.dataset, row_lists, collate, self.num_workers)


class ShardRowReader:
    """Samples of one shard folder by index row, decoded by the data pipeline's reader stage
    (allow-list decoding, frame-count check against the index) in DataLoader workers."""

    exact_text = False   # the index counts all turns' text; the builder uses question + answer only

    def __init__(self, index: Any, num_workers: int, worker_chunk: int = 8):
        self.index, self.num_workers, self.worker_chunk = index, num_workers, worker_chunk

    def _samples(self, rows: np.ndarray) -> Iterator[dict]:
        import torch.utils.data

        from data_pipeline.loader import RankSlice, unpack_chunk
        order = np.stack([np.zeros(len(rows), np.int64), np.asarray(rows, np.int64)], axis=1)
        workers = min(self.num_workers, len(rows))
        chunk = max(1, min(self.worker_chunk, -(-len(rows) // max(1, workers))))
        reader = RankSlice([self.index], order, 0, len(order), "uint8", "error", chunk)
        if workers <= 0:
            yield from reader
            return
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers, persistent_workers=False)
        it = iter(loader)
        try:
            for c in it:
                yield from unpack_chunk(c)
        finally:
            it._shutdown_workers()

    def batches(self, row_lists: list[list[int]], collate: Callable) -> Iterator[Any]:
        samples = self._samples(np.concatenate([np.asarray(r, np.int64) for r in row_lists]))
        for rows in row_lists:
            yield collate([next(samples) for _ in rows])


# ---------------------------------------------------------------------------------------------

class BalancedSource:
    """Same interface as ``DigitsSource`` / ``ShardSource``: ``batches(num_steps, collate)``
    yields ``(this rank's collated batch, source state after the step)``.

    ``table``: metadata of every dataset row (``SampleTable`` with ``index == row``);
    ``reader``: turns row lists into collated batches. After each yielded batch,
    ``last_metrics`` holds the step's ``balance/*`` scalars (identical on every rank) and
    ``last_plan`` the step's :class:`Plan`."""

    def __init__(self, table: SampleTable, reader: Any, planner: BalancePlanner, window: int, seed: int,
                 dp_rank: int, num_workers: int = 0):
        if not np.array_equal(table.index, np.arange(len(table))):
            raise ValueError("BalancedSource: table.index must be the dataset rows 0..n-1")
        if not 0 <= dp_rank < planner.num_ranks:
            raise ValueError(f"dp_rank={dp_rank} outside the planner's {planner.num_ranks} ranks")
        if window < planner.num_ranks:
            raise ValueError(f"balance.window={window} is smaller than the data-parallel size {planner.num_ranks}: "
                             "every rank needs a sample per step; raise balance.window or train.batch_size")
        if window > len(table):
            raise ValueError(f"balance.window={window} exceeds the {len(table)} samples of the dataset; lower "
                             "balance.window (or train.batch_size) or add data")
        self.table, self.reader, self.planner = table, reader, planner
        self.dp_rank = dp_rank
        self.sampler = EpochSampler(len(table), window, seed)
        self.next_step = 0
        self.last_metrics: dict[str, float] = {}
        self.last_plan: Optional[Plan] = None
        self._check_budgets()
        self._state = self._live_state()

    # -- construction from a run config ---------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, dp_rank: int, dp_size: int, shard_dir: Any = None,
                    tokenizer: Any = None, budget: Optional[TokenBudget] = None) -> "BalancedSource":
        """``tokenizer`` / ``budget``: the trainer's (None: built from ``cfg`` the same way)."""
        d, b = cfg.data, cfg.balance
        tokenizer = tokenizer or build_tokenizer(cfg, shard_dir)
        budget = budget or TokenBudget.from_model_config(cfg.model)
        if d.source == "digits":
            dataset = DigitsDataset(d.train_samples, d.seed, d.num_frames, cfg.model.vit.image_size, d.tasks,
                                    "train", d.min_frames, d.digit_style)
            frames = np.fromiter((dataset.frames_for(i) for i in range(len(dataset))), np.int64, len(dataset))
            table = sample_table(budget, frames, digits_text_tokens(dataset, tokenizer))
            reader: Any = DigitsRowReader(dataset, d.num_workers)
        else:
            from data_pipeline.dataset_index import load_index
            if shard_dir is None:
                raise ValueError(f"data.source={d.source} needs its shard folder; call prepare_shards first")
            index = load_index(shard_dir)
            table = sample_table(budget, index.frames, index.text_tokens)
            if np.any(index.patches_per_frame != budget.patches_per_frame):
                raise ValueError(f"{shard_dir} was sharded with {int(index.patches_per_frame[0])} patches per frame "
                                 f"but the model sees {budget.patches_per_frame}; re-shard at model.vit.image_size")
            reader = ShardRowReader(index, d.num_workers)
        cost_model = dataclasses.replace(CostModel.from_model_config(cfg.model),
                                         llm_vocab=cfg.model.llm.vocab_size or tokenizer.vocab_size)
        planner = BalancePlanner(dp_size, 1, b.max_llm_tokens_per_micro or UNBOUNDED,
                                 b.max_vit_frames_per_micro or UNBOUNDED, seed=d.seed, method=b.method,
                                 cost_model=cost_model, align=1)
        return cls(table, reader, planner, b.window or cfg.train.batch_size, d.seed, dp_rank, d.num_workers)

    def _check_budgets(self) -> None:
        """Fail at start-up, not at step 10,000, if some sample can never fit a micro-batch."""
        p, t = self.planner, self.table
        too_long = np.nonzero((t.llm_tokens > p.max_llm_tokens) | (t.frames > p.max_vit_frames))[0]
        if len(too_long):
            i = int(too_long[np.argmax(t.llm_tokens[too_long])])
            raise ValueError(f"{len(too_long)} samples can never fit one micro-batch (e.g. row {i}: "
                             f"{int(t.llm_tokens[i])} LLM tokens, {int(t.frames[i])} frames) under "
                             f"balance.max_llm_tokens_per_micro={p.max_llm_tokens} / balance.max_vit_frames_per_micro="
                             f"{p.max_vit_frames}; raise the budgets to at least {int(t.llm_tokens.max())} tokens and "
                             f"{int(t.frames.max())} frames (or 0 = unbounded)")

    # -- state -----------------------------------------------------------------------------------
    def _live_state(self) -> dict:
        return {"version": STATE_VERSION, "next_step": self.next_step, "window": self.sampler.state_dict(),
                "planner": self.planner.state_dict()}

    def state_dict(self) -> dict:
        """The state after the last yielded step (window position + deferred samples)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or "planner" not in state:
            raise ValueError("the checkpoint's data-source state was not written by the balanced source "
                             f"(keys {sorted(state)}); resume with the balance settings the run was started with")
        self._restore(state)

    def _restore(self, state: dict) -> None:
        self.sampler.load_state_dict(state["window"])
        self.planner.load_state_dict(state["planner"])
        self.next_step = int(state["next_step"])
        self._state = copy.deepcopy(state)

    @property
    def deferred_rows(self) -> np.ndarray:
        """Rows planned for a later step (carried in the state)."""
        return np.asarray(self._state["planner"]["deferred"]["index"], dtype=np.int64)

    # -- planning --------------------------------------------------------------------------------
    def plan_next(self) -> tuple[Plan, dict]:
        """Plan the next global step (identically on every rank); returns the plan and its metrics."""
        started = time.perf_counter()
        rows = np.asarray(self.sampler.next_batch(), dtype=np.int64)
        # the source's step count (checkpointed as next_step), not the window's: the two differ once a
        # run resumes with another window size
        plan = plan_window(self.planner, self.table, self.next_step, rows)
        self.next_step += 1
        plan_ms = 1e3 * (time.perf_counter() - started)
        pool = self.table.take(np.concatenate([plan.sample_index, plan.deferred]))
        metrics = balance_metrics(plan, pool, self.planner.cost_model)
        # the step's samples split without balancing (rank r takes every R-th, in row order, which
        # is as random in length as the sampler's order): the end-of-run summary's comparison
        metrics["balance/cost_imbalance_in_order"] = in_order_imbalance(
            self.table, np.sort(plan.sample_index), self.planner.num_ranks, self.planner.cost_model)
        metrics["balance/plan_ms"] = plan_ms
        return plan, metrics

    def batches(self, num_steps: int, collate: Callable) -> Iterator[tuple[Any, dict]]:
        self._restore(self._state)           # an abandoned earlier iterator may have planned ahead
        done = 0
        while done < num_steps:
            ahead = []
            for _ in range(min(PLAN_AHEAD, num_steps - done)):
                plan, metrics = self.plan_next()
                rows = plan.micro_batch(self.dp_rank, 0)
                if len(rows) == 0:
                    raise RuntimeError(f"step {plan.step}: the plan gives rank {self.dp_rank} no sample; every rank "
                                       "must run one forward per step (ZeRO-3)")
                ahead.append((plan, metrics, rows, self._live_state()))
            for (plan, metrics, rows, state), batch in zip(ahead, self.reader.batches([a[2].tolist() for a in ahead],
                                                                                      collate)):
                self._check_tokens(plan.step, rows, batch)
                self._state, self.last_plan, self.last_metrics = state, plan, metrics
                done += 1
                yield batch, copy.deepcopy(state)

    def _check_tokens(self, step: int, rows: np.ndarray, batch: Any) -> None:
        planned = self.table.llm_tokens[rows]
        actual = np.asarray(batch.seq_lengths, dtype=np.int64)
        bad = actual != planned if self.reader.exact_text else actual > planned
        if np.any(bad):
            i = int(np.nonzero(bad)[0][0])
            raise TokenCountMismatch(
                f"step {step}: sample {batch.ids[i]} (row {int(rows[i])}) has {int(actual[i])} LLM tokens but the "
                f"balancer budgeted {int(planned[i])} from its metadata ({len(np.nonzero(bad)[0])} such samples); "
                "the metadata (frames, text tokens, prune ratio, frame separators) disagrees with the data -- "
                "re-shard with the model's settings")


def window_rows(num_samples: int, window: int, seed: int, steps: int) -> list[list[int]]:
    """The candidate windows of the first ``steps`` steps, as the source draws them."""
    sampler = EpochSampler(num_samples, window, seed)
    return [sampler.next_batch() for _ in range(steps)]


__all__: Sequence[str] = ("BalancedSource", "sample_table", "visual_tokens", "DigitsRowReader", "ShardRowReader",
                          "digits_text_tokens", "window_rows", "TokenCountMismatch", "UNBOUNDED")
