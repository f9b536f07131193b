"""The memory/FLOP estimator (stts_dist/estimate.py, tools/estimate_memory.py) against real models:
parameter counts of built (and tensor-parallel) models, activation bytes autograd really saves,
and the direction of every knob."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stts_dist.config import load_config
from stts_dist.estimate import (Cluster, ParallelPlan, Workload, activation_bytes, estimate, llm_layer_activation_bytes,
                                micro_batch_tokens, model_state_bytes, parameter_counts, plan_from_config,
                                vit_block_activation_bytes)
from stts_dist.ops.attention import VarlenPlan
from stts_dist.stts.budget import TokenBudget
from stts_dist.model.llm import DecoderLayer, rope_cos_sin
from stts_dist.model.vit import ViTBlock
from stts_dist.model.vlm import build_model
from stts_dist.tokenizer import default_tokenizer
from tests.conftest import tiny_overrides
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
CONFIG_7B = REPO / "jobs" / "train_7b.yaml"
PARTS = ("vit", "connector", "scorer", "llm")


def small_cfg(**extra):
    return load_config(None, tiny_overrides(**{"model.connector.layers": "[-1,-3]", **extra}))


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors count once


@pytest.mark.parametrize("tied,qkv_bias,vocab", [(True, False, 0), (False, True, 0), (False, True, 101)])
def test_parameter_counts_equal_the_built_model(tied, qkv_bias, vocab):
    cfg = small_cfg(**{"model.llm.tie_embeddings": tied, "model.llm.qkv_bias": qkv_bias,
                       "model.llm.vocab_size": vocab})
    model = build_model(cfg.model, default_tokenizer())
    counts = parameter_counts(cfg.model)
    for part in PARTS:
        assert counts[part].total == numel(getattr(model, part)), part
    assert sum(c.total for c in counts.values()) == numel(model)
    assert all(c.per_tp_rank == c.total for c in counts.values())   # TP=1 splits nothing


def _tp_rank_numels(rank: int, world_size: int, overrides: list[str]) -> dict[str, int]:
    from stts_dist.distributed.parallel import initialize_parallel
    from stts_dist.distributed.parallelize import parallelize_vlm

    initialize_parallel(tensor_parallel=world_size)
    cfg = load_config(None, overrides)
    model = parallelize_vlm(build_model(cfg.model, default_tokenizer()))
    return {part: numel(getattr(model, part)) for part in PARTS}


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_per_tp_rank_counts_equal_a_tensor_parallel_model(tied):
    # vocab 45 is odd: the TP=2 embedding/head are padded to 46 rows, 23 per rank
    overrides = tiny_overrides(**{"model.connector.layers": "[-1,-3]", "model.llm.tie_embeddings": tied,
                                  "model.llm.qkv_bias": True, "model.llm.vocab_size": 45})
    per_rank = run_distributed(_tp_rank_numels, 2, overrides)
    counts = parameter_counts(load_config(None, overrides).model, tp=2)
    for rank_counts in per_rank:
        assert rank_counts == {part: counts[part].per_tp_rank for part in PARTS}


def _saved_activation_bytes(module: torch.nn.Module, forward) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def test_vit_block_formula_matches_what_autograd_saves():
    width, mlp, frames, tokens = 64, 256, 4, 49
    block = ViTBlock(width, 4, mlp, 1e-6).to(torch.bfloat16)
    x = torch.randn(frames, tokens, width, dtype=torch.bfloat16, requires_grad=True)
    saved = _saved_activation_bytes(block, lambda: block(x))
    formula = vit_block_activation_bytes(width, mlp) * frames * tokens
    # the formula leaves out O(heads) per token (LayerNorm statistics, attention log-sum-exp)
    assert formula <= saved <= 1.03 * formula


def test_llm_layer_formula_matches_what_autograd_saves():
    hidden, heads, ffn, length = 64, 4, 176, 96
    # kv_heads == heads: the CPU kernels repeat grouped K/V heads, GPU varlen kernels do not
    layer = DecoderLayer(hidden, heads, heads, ffn, 1e-6, True).to(torch.bfloat16)
    x = torch.randn(length, hidden, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(length), hidden // heads, 10000.0, torch.bfloat16)
    plan = VarlenPlan.build([length], x.device, causal=True, backend="bucketed")
    saved = _saved_activation_bytes(layer, lambda: layer(x, cos, sin, plan))
    formula = llm_layer_activation_bytes(hidden, heads, heads, ffn) * length
    assert formula <= saved <= 1.05 * formula


def test_model_state_memory_falls_with_data_and_tensor_parallelism():
    cfg = load_config(CONFIG_7B)

    def state(tp: int, dp: int) -> float:
        plan = ParallelPlan(tp, dp, zero_stage=3, micro_batch=1)
        return sum(model_state_bytes(parameter_counts(cfg.model, tp), plan).values())

    by_dp = [state(1, dp) for dp in (1, 2, 4, 8, 16)]
    by_tp = [state(tp, 4) for tp in (1, 2, 4)]
    assert all(a > b for a, b in zip(by_dp, by_dp[1:])), by_dp
    assert all(a > b for a, b in zip(by_tp, by_tp[1:])), by_tp
    # ZeRO-3 shards params, grads and Adam state (16 bytes/param) over DP; only the gather buffers stay
    params = sum(c.per_tp_rank for c in parameter_counts(cfg.model, 1).values())
    assert by_dp[3] - by_dp[4] == pytest.approx(16 * params * (1 / 8 - 1 / 16))


def test_lower_zero_stages_keep_more_on_every_gpu():
    cfg = load_config(CONFIG_7B)
    params = parameter_counts(cfg.model, 4)
    totals = [sum(model_state_bytes(params, ParallelPlan(4, 8, stage, 1)).values()) for stage in (0, 1, 2, 3)]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


def test_activation_memory_falls_with_tensor_parallelism_and_checkpointing():
    cfg = load_config(CONFIG_7B)
    tokens = micro_batch_tokens(TokenBudget.from_model_config(cfg.model).with_setting("scorer", 0.5), 64, 1, Workload())
    act = {tp: sum(activation_bytes(cfg.model, tokens, 152064, tp, checkpointing=False).values()) for tp in (1, 2, 4)}
    assert act[1] > act[2] > act[4]
    ckpt = sum(activation_bytes(cfg.model, tokens, 152064, 4, checkpointing=True).values())
    assert ckpt < act[4] / 2


def test_pruning_lowers_activations_and_flops_by_the_token_budget():
    cfg = load_config(CONFIG_7B)
    cluster = Cluster(nodes=4)
    est = estimate(cfg, plan_from_config(cfg, cluster), cluster)
    pruned, full = est.tokens[True], est.tokens[False]
    # 27 x 27 patches, 3 x 3 groups: 81 groups per frame, 64 frames, half pruned
    assert (full.kept_groups, pruned.kept_groups) == (81 * 64, 81 * 64 - int(81 * 0.5 * 64))
    assert pruned.vit_full == full.vit_full == 64 * 27 * 27
    assert pruned.vit_kept == full.vit_kept // 2
    a_p, a_f = est.activations[(True, False)], est.activations[(False, False)]
    assert a_p["vit_before_prune"] == a_f["vit_before_prune"]              # same full frames
    assert a_p["vit_after_prune"] == pytest.approx(a_f["vit_after_prune"] / 2)
    assert a_p["llm_layers"] < 0.52 * a_f["llm_layers"]
    assert est.total_bytes(pruned=True) < est.total_bytes(pruned=False)
    assert est.flops[True].vit_before == est.flops[False].vit_before
    assert 1.8 < est.train_flops_per_step(False) / est.train_flops_per_step(True) < 2.0


def test_the_7b_config_matches_the_target_architecture_and_fits_on_4_nodes():
    cfg = load_config(CONFIG_7B)
    counts = parameter_counts(cfg.model)
    assert 7.5e9 < counts["llm"].total < 7.7e9        # Qwen2-7B: 7.6B
    assert 0.39e9 < counts["vit"].total < 0.43e9      # SigLIP-so400m vision tower
    cluster = Cluster(nodes=4, gpus_per_node=8, gpu_mem_gb=80)
    plan = plan_from_config(cfg, cluster)
    assert (plan.tensor_parallel, plan.data_parallel, plan.zero_stage) == (4, 8, 3)
    est = estimate(cfg, plan, cluster)
    assert est.fits and est.total_bytes(pruned=True) < 80e9


@pytest.mark.slow
def test_cli_reports_and_fails_when_over_budget():
    run = [sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--config", str(CONFIG_7B)]
    ok = subprocess.run(run + ["--nodes", "4"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    for needle in ("parameters", "per-GPU memory", "activation bytes per token per layer", "FLOPs per optimizer step",
                   "fits:"):
        assert needle in ok.stdout
    # one node: DP=2, so 4 videos per micro-batch do not fit 80 GB
    over = subprocess.run(run + ["--nodes", "1"], capture_output=True, text=True, timeout=60)
    assert over.returncode == 1
    assert "exceeds --gpu-mem-gb 80" in over.stderr and "grad_accum_steps" in over.stderr
    # ... but they do with activation checkpointing
    assert subprocess.run(run + ["--nodes", "1", "--activation-checkpointing"], capture_output=True,
                          timeout=60).returncode == 0
    bad = subprocess.run(run + ["--nodes", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not divisible by data_parallel=6" in bad.stderr


def test_scorer_parameter_count_with_a_pooling_width():
    from stts_dist.config import load_config
    from stts_dist.estimate import scorer_params
    from stts_dist.model.vlm import build_model
    from stts_dist.tokenizer import default_tokenizer
    cfg = load_config(None, ["model.stts.scorer_pool_dim=32"])
    model = build_model(cfg.model, default_tokenizer())
    assert scorer_params(cfg.model.vit, cfg.model.stts).total == sum(p.numel() for p in model.scorer.parameters())
