"""Decoder-only LLM of the Llama/Qwen family: RMSNorm, RoPE, SwiGLU, grouped-query attention,
tied or untied embeddings, optional q/k/v biases (Qwen2). Parameter names follow the Hugging Face
Llama layout (``layers.{i}.self_attn.q_proj`` ...) so imported checkpoints map one to one.

Sequences are packed: ``(total, hidden)`` with a :class:`VarlenPlan`; positions restart at 0 for
every sequence. No parallelism code here: tensor parallelism swaps the Linear/Embedding modules
(see ``stts_dist.distributed``); head counts are derived from projection widths so that works.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from stts_dist.ops.attention import VarlenPlan, varlen_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (L,) -> cos, sin: (L, 1, head_dim) (HF 'rotate_half' convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LLMAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, qkv_bias: bool):
        super().__init__()
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: Optional[VarlenPlan],
                kv_cache: Optional[dict] = None) -> torch.Tensor:
        """Packed: x (total, hidden) with ``plan``. Cached decoding: x (B, L, hidden), cos/sin
        (B, L, 1, d), ``kv_cache`` {"k","v": (B, Lpast, Hkv, d), "valid": (B, Lpast+L) bool}."""
        q = apply_rope(self.q_proj(x).unflatten(-1, (-1, self.head_dim)), cos, sin)
        k = apply_rope(self.k_proj(x).unflatten(-1, (-1, self.head_dim)), cos, sin)
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        if kv_cache is None:
            out = varlen_attention(q, k, v, plan)
        else:
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], 1)
                v = torch.cat([kv_cache["v"], v], 1)
            kv_cache["k"], kv_cache["v"] = k, v
            out = _cached_attention(q, k, v, kv_cache["valid"])
        return self.o_proj(out.flatten(-2))


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """q: (B, Lq, H, d) are the LAST Lq positions of k/v (B, Lk, Hkv, d); causal + key validity."""
    B, Lq = q.shape[:2]
    Lk = k.shape[1]
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    allowed = causal[None] & valid[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    hq, hk = q.shape[2], k.shape[2]
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias[:, None])
    return out.transpose(1, 2)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int, eps: float, qkv_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = LLMAttention(hidden, heads, kv_heads, qkv_bias)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, ffn)

    def forward(self, x, cos, sin, plan, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLM(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                 rope_theta: float = 10000.0, eps: float = 1e-6, tie_embeddings: bool = True, qkv_bias: bool = False):
        super().__init__()
        self.hidden, self.heads, self.rope_theta = hidden, heads, rope_theta
        self.head_dim = hidden // heads
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, kv_heads, ffn, eps, qkv_bias) for _ in range(layers))
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # The real vocabulary (the tables may be padded, e.g. to a tensor-parallel multiple):
        # padded columns never receive probability mass.
        self.real_vocab = vocab_size
        # Tensor parallelism replaces these two hooks (vocab-parallel loss, gathered logits).
        self.cross_entropy = self._cross_entropy
        self.gather_logits = lambda local: local

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[..., :self.real_vocab].float(), labels)

    def forward_hidden(self, embeds: torch.Tensor, positions: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
        """embeds: (total, hidden) packed; positions: (total,) -> final-normed hidden (total, hidden)."""
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, plan)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits over the real vocabulary: (..., real_vocab)."""
        return self.gather_logits(self.lm_head(hidden))[..., :self.real_vocab]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy over positions with ``labels != -100``; the LM head runs
        only on those positions (answer tokens), which is most of its cost saved. The head is
        called even when no position counts, so every rank runs the same modules."""
        sel = labels != -100
        if not bool(sel.any()):
            return self.lm_head(hidden[:1]).sum() * 0.0
        return self.cross_entropy(self.lm_head(hidden[sel]), labels[sel])

    def forward_cached(self, embeds: torch.Tensor, positions: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """Incremental decoding. embeds: (B, L, hidden); positions: (B, L); ``cache``: one dict per
        layer (see LLMAttention) whose ``valid`` already covers these L positions -> logits (B, L, V)."""
        cos, sin = rope_cos_sin(positions.reshape(-1), self.head_dim, self.rope_theta, embeds.dtype)
        cos = cos.view(*positions.shape, 1, -1)
        sin = sin.view(*positions.shape, 1, -1)
        x = embeds
        for layer, c in zip(self.layers, cache):
            x = layer(x, cos, sin, None, c)
        return self.logits(self.norm(x))
