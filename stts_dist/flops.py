"""Analytic forward FLOPs of the model (multiply-add = 2 FLOPs), from token counts.

Used by the benchmark (FLOP-ideal speed-up), the memory/FLOP estimator and the balancer's cost
model (``stts_dist.balance.cost_model`` takes its per-token linear and attention FLOPs from the
``*_flops_per_token`` / ``attention_flops`` formulas here), so all three agree on what a token
costs. Training ~ 3x forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from stts_dist.stts.budget import TokenBudget


@dataclass
class FlopBreakdown:
    vit_before: float = 0.0       # patch embed + blocks 0..prune_at+1 (full frames)
    vit_after: float = 0.0        # blocks prune_at+2.. on kept tokens
    scorer: float = 0.0
    connector: float = 0.0
    llm: float = 0.0

    @property
    def total(self) -> float:
        return self.vit_before + self.vit_after + self.scorer + self.connector + self.llm


def vit_linear_flops_per_token(width, mlp):
    """One pre-norm ViT block's linears on one patch: qkv + out projection (``4 D^2``) and MLP up +
    down (``2 D Mv``). Scalars or numpy arrays; ints stay exact ints."""
    return 2 * (4 * width * width + 2 * width * mlp)


def llm_linear_flops_per_token(hidden, ffn, kv_ratio):
    """One decoder layer's linears on one token: q and o (``2 H^2``), k and v at the GQA width
    ``kv_ratio * H`` (``kv_ratio = kv_heads / heads``), SwiGLU gate / up / down (``3 H F``)."""
    return 2 * (2 * hidden * hidden + 2 * kv_ratio * hidden * hidden + 3 * hidden * ffn)


def attention_flops(length, width, causal: bool = False):
    """``QK^T`` and ``AV`` of one sequence of ``length`` tokens at model width ``width`` (two
    ``L x L x width`` products); causal attention computes half of them. Scalars or arrays."""
    return (2 if causal else 4) * length ** 2 * width


def vit_block_flops(n: int, width: int, mlp: int) -> float:
    """One pre-norm block on one frame of n tokens."""
    return n * vit_linear_flops_per_token(width, mlp) + attention_flops(n, width)


def llm_layer_flops(L: int, hidden: int, heads: int, kv_heads: int, ffn: int, causal: bool = True) -> float:
    """One decoder layer on one sequence of L tokens."""
    return L * llm_linear_flops_per_token(hidden, ffn, kv_heads / heads) + attention_flops(L, hidden, causal)


def model_forward_flops(model_cfg, budget: TokenBudget, frames_kept_patches: Sequence[Sequence[int]],
                        llm_lengths: Sequence[int], kept_groups: int) -> FlopBreakdown:
    """Forward FLOPs of the model of ``model_cfg`` pruning with ``budget.method`` (the scorer runs
    for method ``scorer`` only). frames_kept_patches: per video, kept patches of each frame after
    the prune point; llm_lengths: LLM sequence lengths; kept_groups: total groups reaching the
    connector."""
    v, c, l, s = model_cfg.vit, model_cfg.connector, model_cfg.llm, model_cfg.stts
    n = budget.patches_per_frame
    num_frames = sum(len(f) for f in frames_kept_patches)
    out = FlopBreakdown()
    out.vit_before = num_frames * (2 * n * v.in_channels * v.patch_size ** 2 * v.width
                                   + (s.prune_at + 2) * vit_block_flops(n, v.width, v.mlp_dim))
    after_blocks = v.depth - (s.prune_at + 2)
    out.vit_after = sum(after_blocks * vit_block_flops(k, v.width, v.mlp_dim) for f in frames_kept_patches for k in f)
    g2 = c.pool_size ** 2
    groups = budget.groups_per_frame
    if budget.method == "scorer":
        # [down-projection on all patches] + pooling (kv proj on all patches, q/out per group) +
        # 3-layer MLP per group
        p = s.scorer_pool_dim or v.width
        down = 2 * n * v.width * p if s.scorer_pool_dim else 0
        out.scorer = num_frames * (down + 2 * n * 2 * p * p + groups * 2 * (
            2 * p * p + 2 * p * s.scorer_hidden + s.scorer_hidden ** 2 + s.scorer_hidden))
    dim = v.width * len(c.layers)
    out.connector = kept_groups * 2 * (g2 * 2 * dim * dim + 2 * dim * dim + dim * l.hidden + l.hidden * l.hidden)
    out.llm = sum(l.layers * llm_layer_flops(L, l.hidden, l.heads, l.kv_heads, l.ffn) for L in llm_lengths)
    return out
