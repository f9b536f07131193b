"""The pruning-aware token balancer wired into real training: the sample-source stack with its
balanced split under the Trainer, on one process and on 2 gloo ranks with DeepSpeed ZeRO-3 (plans,
budgets, deferrals, resume)."""
import dataclasses
import math
import re
import shutil

import pytest

from conftest import tiny_overrides
from dist_utils import run_distributed
from shard_utils import tiny_shards

STEPS, KILL_AFTER = 4, 2
FRAMES_BUDGET = 16      # frames per rank per step; a 4-sample window of 2..12-frame videos often needs more
SKEWED = {"data.min_frames": 2, "data.num_frames": 12, "train.batch_size": 4, "data.train_samples": 64}


def _cfg(out_dir, **extra):
    from stts_dist.config import load_config
    ov = {"train.out_dir": str(out_dir), "train.steps": STEPS, "balance.enabled": True, "train.save_every": KILL_AFTER,
          "train.eval_prune_ratios": "[0.5]", "data.eval_samples": 2, **SKEWED}
    ov.update(extra)
    return load_config(None, tiny_overrides(**ov))


def _dist_cfg(out_dir, **extra):
    return _cfg(out_dir, **{"parallel.engine": "deepspeed", "parallel.stage3_param_persistence_threshold": 0,
                            "parallel.timeout_s": 30, "balance.max_vit_frames_per_micro": FRAMES_BUDGET, **extra})


def _row(sample_id: str) -> int:
    return int(re.fullmatch(r"digits-train-\d+-(\d+)", sample_id).group(1))


def _stack(cfg, dp_rank, dp_size, shard_dir=None, balanced=True):
    """The run's sample-source stack as the trainer builds it (balanced: ``balance.enabled``)."""
    from stts_dist.samples import training_stack
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.tokenizer import default_tokenizer
    cfg.balance.enabled = balanced
    return training_stack(cfg, TokenBudget.from_model_config(cfg.model), dp_rank, dp_size, shard_dir,
                          default_tokenizer())


def window_rows(num_samples, window, seed, steps):
    """The candidate windows of the first ``steps`` steps, as the stack's sampler draws them."""
    from stts_dist.samples import PermutationSampler
    sampler = PermutationSampler(num_samples, window, seed)
    return [sampler.next_rows().tolist() for _ in range(steps)]


def _collate(cfg):
    from stts_dist.data.batch import SequenceBuilder
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.tokenizer import default_tokenizer
    return SequenceBuilder(default_tokenizer(), TokenBudget.from_model_config(cfg.model), cfg.model.vit.image_size)


class _Recorder:
    """Per step: this rank's sample rows (``trainer.last_batch_ids``), the rows still deferred,
    and the step's metrics; counts training forwards (micro-batches)."""

    def __init__(self, trainer):
        self.rows, self.deferred, self.metrics, self.forwards = [], [], [], 0
        trainer.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.forwards += bool(module.training)

    def on_step_end(self, trainer, step, metrics):
        self.rows.append([_row(i) for i in trainer.last_batch_ids])
        self.deferred.append(sorted(trainer.source.deferred_rows.tolist()))
        self.metrics.append({k: v for k, v in metrics.items() if isinstance(v, float)})


def _train_body(rank, world, out_dir, extra):
    from stts_dist.train.trainer import Trainer
    trainer = Trainer(_dist_cfg(out_dir, **extra), callbacks=[])
    rec = _Recorder(trainer)
    trainer.callbacks.append(rec)
    trainer.fit()
    return {"rows": rec.rows, "deferred": rec.deferred, "metrics": rec.metrics, "forwards": rec.forwards,
            "steps": [h["step"] for h in trainer.history], "losses": [h["loss"] for h in trainer.history]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted 2-rank run; it also checkpoints after step KILL_AFTER, while the source
    has already planned the steps after it (the saved state must be the step's, not the plan-ahead's)."""
    out = tmp_path_factory.mktemp("full") / "run"
    return out, run_distributed(_train_body, 2, str(out), {}, timeout_s=240)


@pytest.fixture(scope="module")
def uninterrupted(full_run):
    return full_run[1]


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks, DeepSpeed ZeRO-3, through the Trainer

@pytest.mark.slow
def test_two_ranks_assign_every_window_sample_exactly_once_within_budgets(uninterrupted):
    from stts_dist.samples import DigitsDataset
    cfg = _dist_cfg("unused")
    windows = window_rows(cfg.data.train_samples, cfg.train.batch_size, cfg.data.seed, STEPS)
    frames = DigitsDataset(64, 0, 12, 32, cfg.data.tasks, "train", 2).frames_for
    r0, r1 = uninterrupted
    assert r0["deferred"] == r1["deferred"]                   # both ranks hold the same planner state
    pending: list[int] = []
    for s in range(STEPS):
        a, b = r0["rows"][s], r1["rows"][s]
        assert a and b and not set(a) & set(b)                  # both ranks train, on disjoint samples
        # what this step trained plus what it deferred = what it was offered (window + earlier deferrals)
        assert sorted(a + b + r0["deferred"][s]) == sorted(windows[s] + pending)
        pending = r0["deferred"][s]
        for rows in (a, b):
            assert sum(frames(i) for i in rows) <= FRAMES_BUDGET
    assert any(r0["deferred"][s] for s in range(STEPS)), "the budget should force deferrals in this mix"
    trained = [i for r in (r0, r1) for rows in r["rows"] for i in rows]
    assert sorted(trained + pending) == sorted(i for w in windows for i in w)   # nothing dropped or repeated


@pytest.mark.slow
def test_two_ranks_run_equal_micro_batches_with_finite_losses_and_log_balance_metrics(uninterrupted):
    for r in uninterrupted:
        assert r["steps"] == list(range(1, STEPS + 1))
        assert r["forwards"] == STEPS                           # one micro-batch per rank per step
        assert all(math.isfinite(x) for x in r["losses"])
    r0, r1 = uninterrupted
    assert r0["losses"] == pytest.approx(r1["losses"], rel=1e-6)   # the loss is the global mean
    planned = lambda m: {k: v for k, v in m.items() if k.startswith("balance/") and k != "balance/plan_ms"}
    for s, m in enumerate(r0["metrics"]):
        assert planned(m) == planned(r1["metrics"][s])          # every rank computed the same plan
        for stem in ("vit_tokens_pre", "vit_tokens_post", "llm_tokens", "cost"):
            assert m[f"balance/{stem}_max"] >= m[f"balance/{stem}_mean"] > 0
        assert m["balance/padding_fraction"] == 0.0             # packed, unaligned: no padding
        assert m["balance/samples"] == len(r0["rows"][s]) + len(r1["rows"][s])
        assert m["balance/deferred"] == len(r0["deferred"][s])
        # the per-rank maximum of ViT tokens before pruning is what the ranks really ran
        per_rank = [r["metrics"][s]["vit_tokens_before"] * len(r["rows"][s]) for r in (r0, r1)]
        assert m["balance/vit_tokens_pre_max"] == pytest.approx(max(per_rank))
        assert m["balance/vit_tokens_pre_mean"] == pytest.approx(sum(per_rank) / 2)


@pytest.mark.slow
def test_resume_through_a_checkpoint_reproduces_the_per_step_assignment(full_run, tmp_path):
    full_out, full = full_run
    assert full[0]["deferred"][KILL_AFTER - 1], "the checkpoint should carry deferred samples"
    mid = f"step_{KILL_AFTER:08d}"
    shutil.copytree(full_out / "checkpoints" / mid, tmp_path / "run" / "checkpoints" / mid)
    resumed = run_distributed(_train_body, 2, str(tmp_path / "run"), {}, timeout_s=240)
    for rank in range(2):
        assert resumed[rank]["steps"] == list(range(KILL_AFTER + 1, STEPS + 1))
        assert resumed[rank]["rows"] == full[rank]["rows"][KILL_AFTER:]
        assert resumed[rank]["deferred"] == full[rank]["deferred"][KILL_AFTER:]
        assert resumed[rank]["losses"] == pytest.approx(full[rank]["losses"][KILL_AFTER:], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# One process

def test_dp1_trainer_trains_exactly_the_window_samples_and_prints_balance_metrics(tmp_path, capsys):
    from stts_dist.train.balance_callback import BalanceLogger
    from stts_dist.train.trainer import ConsoleLogger, Trainer
    cfg = _cfg(tmp_path, **{"train.steps": 3, "train.log_every": 2, "train.save_every": 0, "data.num_frames": 6})
    trainer = Trainer(cfg, callbacks=[ConsoleLogger(2), BalanceLogger(2)])
    rec = _Recorder(trainer)
    trainer.callbacks.append(rec)
    trainer.fit()
    windows = window_rows(64, 4, 0, 3)
    assert [sorted(r) for r in rec.rows] == [sorted(w) for w in windows]
    assert rec.deferred == [[], [], []] and rec.forwards == 3
    assert all(k in trainer.history[-1] for k in ("balance/cost_max", "balance/cost_imbalance", "balance/plan_ms"))
    out = capsys.readouterr().out
    assert re.search(r"\[balance step 1\] vit_pre max/mean=\d+/\d+ vit_post", out)
    assert "[balance step 2]" in out and "[balance step 3]" not in out
    # one rank: the in-order split is the whole batch on that rank, like the balanced one
    assert all(r["balance/cost_imbalance_in_order"] == 1.0 for r in trainer.history)
    assert re.search(r"\[balance\] 3 steps over 1 data-parallel ranks: .* 1\.000 balanced .* vs 1\.000 for the same "
                     r"samples split in order", out)


def test_dp1_balanced_source_yields_the_unbalanced_sources_global_batches(tmp_path):
    cfg = _cfg(tmp_path)
    collate = _collate(cfg)
    plain = [b.ids for b, _ in _stack(cfg, 0, 1, balanced=False).batches(20, collate)]   # 20 steps: crosses an epoch
    balanced = [b.ids for b, _ in _stack(cfg, 0, 1).batches(20, collate)]
    assert [sorted(b) for b in balanced] == [sorted(p) for p in plain]


def test_naive_method_is_the_unbalanced_sequential_split(tmp_path):
    cfg = _cfg(tmp_path, **{"balance.method": "naive"})
    collate = _collate(cfg)
    for rank in range(2):
        plain = [b.ids for b, _ in _stack(cfg, rank, 2, balanced=False).batches(5, collate)]
        assert [b.ids for b, _ in _stack(cfg, rank, 2).batches(5, collate)] == plain


def test_two_sources_in_one_process_split_each_window_and_match_planned_token_counts(tmp_path):
    cfg = _cfg(tmp_path, **{"balance.max_llm_tokens_per_micro": 80})
    collate = _collate(cfg)
    sources = [_stack(cfg, r, 2) for r in range(2)]
    table = sources[0].split.table
    windows = window_rows(64, 4, 0, 8)
    pending: list[int] = []
    for s, pair in enumerate(zip(*(src.batches(8, collate) for src in sources))):
        rows = [[_row(i) for i in batch.ids] for batch, _ in pair]
        deferred = sorted(sources[0].deferred_rows.tolist())
        assert sorted(rows[0] + rows[1] + deferred) == sorted(windows[s] + pending)
        pending = deferred
        for (batch, _), r in zip(pair, rows):
            # the packed sequence is exactly what the planner budgeted, and within the budget
            assert batch.seq_lengths == table.llm_tokens[r].tolist()
            assert sum(batch.seq_lengths) <= 80
            assert batch.visual_tokens == table.llm_visual_tokens[r].tolist()
        assert pair[0][1] == pair[1][1]                          # identical source state on both ranks


def test_source_state_resumes_the_same_plans(tmp_path):
    cfg = _cfg(tmp_path, **{"balance.max_vit_frames_per_micro": 12, "balance.method": "lpt"})
    collate = _collate(cfg)
    full = [b.ids for b, _ in _stack(cfg, 1, 2).batches(6, collate)]
    head = _stack(cfg, 1, 2)
    it = head.batches(3, collate)
    first = [b.ids for b, _ in it]
    state = head.state_dict()
    assert state["split"]["planner"]["deferred"]["index"], "state should carry deferred samples"
    tail = _stack(cfg, 1, 2)
    tail.load_state_dict(state)
    assert first + [b.ids for b, _ in tail.batches(3, collate)] == full
    # the balanced source's state as written before the stack (one dict) resumes the same
    legacy = {"version": 1, "next_step": state["split"]["next_step"], "window": state["sampler"],
              "planner": state["split"]["planner"]}
    again = _stack(cfg, 1, 2)
    again.load_state_dict(legacy)
    assert first + [b.ids for b, _ in again.batches(3, collate)] == full
    other = _stack(_cfg(tmp_path, **{"balance.max_vit_frames_per_micro": 13, "balance.method": "lpt"}), 1, 2)
    with pytest.raises(ValueError, match="max_vit_frames_per_micro: saved 12 vs now 13"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="was not written by the balanced source"):
        _stack(cfg, 1, 2).load_state_dict(_stack(cfg, 1, 2, balanced=False).state_dict())
    with pytest.raises(ValueError, match="was written by the balanced source"):
        _stack(cfg, 1, 2, balanced=False).load_state_dict(state)


def test_balanced_source_over_shards_reads_only_its_planned_samples(tmp_path):
    from stts_dist.config import load_config
    shards = tiny_shards(tmp_path)
    cfg = load_config(None, tiny_overrides(**{"balance.enabled": True, "data.source": "shards",
                                              "data.path": str(shards), "data.num_frames": 12,
                                              "train.batch_size": 4, "data.num_workers": 1}))
    collate = _collate(cfg)
    sources = [_stack(cfg, r, 2, shards) for r in range(2)]
    ids = sources[0].reader.index.ids
    windows = window_rows(len(ids), 4, 0, 4)
    for s, pair in enumerate(zip(*(src.batches(4, collate) for src in sources))):
        rows = [[ids.index(i) for i in batch.ids] for batch, _ in pair]
        assert sorted(rows[0] + rows[1]) == sorted(windows[s])
        for (batch, _), r in zip(pair, rows):
            assert batch.seq_lengths == sources[0].split.table.llm_tokens[r].tolist()
            assert batch.frames.shape[0] == sources[0].split.table.frames[r].sum()


# ---------------------------------------------------------------------------------------------
# Configuration and budgets

@pytest.mark.parametrize("override, message", [
    ({"balance.method": "greedy"}, "balance.method='greedy' must be one of"),
    ({"parallel.grad_accum_steps": 2}, "parallel.grad_accum_steps=2 must be 1"),
    ({"balance.max_vit_frames_per_micro": 8}, "max_vit_frames_per_micro=8 is below data.num_frames=12"),
    ({"balance.window": -1}, "balance.window=-1 must be >= 0"),
])
def test_bad_balance_config_names_the_key(tmp_path, override, message):
    from stts_dist.config import ConfigError
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(tmp_path, **override)


def test_a_sample_that_can_never_fit_is_refused_at_start_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"can never fit one micro-batch .* raise the budgets to at least \d+ tokens"):
        _stack(_cfg(tmp_path, **{"balance.max_llm_tokens_per_micro": 20}), 0, 2)
    with pytest.raises(ValueError, match="balance.window=1 is smaller than the data-parallel size 2"):
        _stack(_cfg(tmp_path, **{"balance.window": 1}), 0, 2)


def test_metadata_that_disagrees_with_the_data_is_an_error(tmp_path):
    from stts_dist.samples import TokenCountMismatch
    cfg = _cfg(tmp_path)
    source = _stack(cfg, 0, 1)
    source.split.table = dataclasses.replace(source.split.table, text_tokens=source.split.table.text_tokens + 1)
    with pytest.raises(TokenCountMismatch, match=r"step 0: sample digits-train-\d+-\d+ \(row \d+\) has \d+ LLM tokens but the "
                                                 r"balancer budgeted \d+"):
        next(source.batches(1, _collate(cfg)))


def test_auto_balancing_turns_on_exactly_when_clip_lengths_vary_over_several_ranks(tmp_path, monkeypatch):
    from stts_dist.config import load_config
    from stts_dist.train.sources import resolve_balancing

    def resolved(dp_size, shard_dir=None, **ov):
        cfg = load_config(None, tiny_overrides(**ov))
        assert cfg.balance.enabled is None                       # the default: auto
        why = resolve_balancing(cfg, shard_dir, dp_size)
        return cfg.balance.enabled, why

    assert resolved(2, **{"data.min_frames": 2, "data.num_frames": 12}) == (
        True, "balancing on (auto: clips of 2-12 frames over 2 data-parallel ranks; balance.enabled=false turns it off)")
    on, why = resolved(1, **{"data.min_frames": 2, "data.num_frames": 12})
    assert not on and "one data-parallel rank" in why
    on, why = resolved(2, **{"data.num_frames": 6})
    assert not on and "every clip has 6 frames" in why
    on, why = resolved(2, **{"data.min_frames": 2, "data.num_frames": 12, "model.stts.adaptive": True})
    assert not on and "model.stts.adaptive" in why
    forced = load_config(None, tiny_overrides(**{"balance.enabled": False, "data.min_frames": 2}))
    assert resolve_balancing(forced, None, 2) == "balance.enabled=false (set in the config)" and forced.balance.enabled is False

    # shards: the index's frame counts decide
    import numpy as np
    import stts_dist.train.sources as sources

    class FakeIndex:
        frames = np.array([4, 9, 16])

    monkeypatch.setattr(sources, "load_index", lambda folder: FakeIndex())
    on, why = resolved(4, tmp_path, **{"data.source": "shards", "data.path": str(tmp_path)})
    assert on and "clips of 4-16 frames over 4" in why
    # a pretrained LLM's tokenizer: the index's word counts are not its token counts
    on, why = resolved(4, tmp_path, **{"data.source": "shards", "data.path": str(tmp_path),
                                       "model.pretrained.llm_path": str(tmp_path / "llm")})
    assert not on and "the shard index counts words" in why
