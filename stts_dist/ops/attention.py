"""Variable-length ("packed") attention with interchangeable kernels.

Packed tokens live in one flat tensor ``(total, heads, head_dim)``; sequence ``i`` occupies rows
``cu_seqlens[i]:cu_seqlens[i+1]``. Attention never crosses sequences. Kernels:

- ``bucketed``   runs of consecutive equal-length sequences are viewed as one dense batch and go
                 through ``scaled_dot_product_attention`` together; the runs are cut with ONE
                 ``torch.split`` (cheap backward). Exact, no wasted FLOPs. CPU default for the ViT
                 (the packer orders frames by kept count so runs are long).
- ``padded``     pad every sequence to the longest, one SDPA call (``is_causal`` for causal:
                 right padding never influences earlier positions). CPU default for the LLM.
- ``block_diag`` one flat sequence with a dense block-diagonal (causal) boolean mask: the
                 reference formulation, quadratic in the total; used in tests as the oracle.
- ``flash_varlen`` flash-attention's varlen kernel on GPU when ``flash_attn`` is installed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
        return flash_attn_varlen_func
    except Exception:
        return None


def resolve_backend(requested: str, device: torch.device, causal: bool) -> str:
    if requested != "auto":
        if requested == "flash_varlen" and (device.type != "cuda" or flash_attn_varlen() is None):
            raise RuntimeError("attention_backend=flash_varlen needs a CUDA device and the flash_attn package; "
                               "use attention_backend=auto")
        return requested
    if device.type == "cuda" and flash_attn_varlen() is not None:
        return "flash_varlen"
    return "padded" if causal else "bucketed"


@dataclass
class VarlenPlan:
    """Everything a kernel needs about the packing, computed once per forward and shared by all
    blocks. ``lengths``: python ints, one per non-empty sequence, in flat order."""
    lengths: list[int]
    cu_seqlens: torch.Tensor          # (n+1,) int32
    max_seqlen: int
    causal: bool
    backend: str
    runs: list[tuple[int, int]]       # (num_sequences, length) of consecutive equal-length runs
    run_sizes: list[int]              # tokens per run (for torch.split)
    pad_index: Optional[torch.Tensor] = None   # (n, max_len) flat row of each padded slot, -1 = pad
    pad_valid: Optional[torch.Tensor] = None   # (n, max_len) bool
    dense_mask: Optional[torch.Tensor] = None  # (total, total) bool for block_diag

    @property
    def total(self) -> int:
        return int(sum(self.lengths))

    @staticmethod
    def build(lengths: list[int], device: torch.device, causal: bool, backend: str = "auto") -> "VarlenPlan":
        lengths = [int(n) for n in lengths if int(n) > 0]
        backend = resolve_backend(backend, device, causal)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        if lengths:
            cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        runs: list[tuple[int, int]] = []
        for n in lengths:
            if runs and runs[-1][1] == n:
                runs[-1] = (runs[-1][0] + 1, n)
            else:
                runs.append((1, n))
        plan = VarlenPlan(lengths, cu.to(device), max(lengths, default=0), causal, backend, runs,
                          [c * n for c, n in runs])
        if backend == "padded" and lengths:
            ar = torch.arange(plan.max_seqlen)
            starts = cu[:-1].to(torch.long)
            valid = ar[None, :] < torch.tensor(lengths)[:, None]
            plan.pad_index = torch.where(valid, starts[:, None] + ar[None, :], torch.full_like(valid, -1, dtype=torch.long)).to(device)
            plan.pad_valid = valid.to(device)
        if backend == "block_diag" and lengths:
            seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            mask = seg[:, None] == seg[None, :]
            if causal:
                mask &= torch.ones_like(mask).tril()
            plan.dense_mask = mask.to(device)
        return plan


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_bias: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """q: (B, Lq, Hq, d); k, v: (B, Lk, Hkv, d); key_bias: (B, Lk) added to every query's logits.
    Returns (B, Lq, Hq, d). Grouped-query attention by repeating K/V heads."""
    hq, hk = q.shape[2], k.shape[2]
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
    mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
    """q: (total, Hq, d); k, v: (total, Hkv, d) packed as described by ``plan``. Returns (total, Hq, d)."""
    if plan.total == 0:
        return q
    if plan.backend == "bucketed":
        outs = []
        for (count, n), qc, kc, vc in zip(plan.runs, torch.split(q, plan.run_sizes),
                                         torch.split(k, plan.run_sizes), torch.split(v, plan.run_sizes)):
            outs.append(dense_attention(qc.view(count, n, *qc.shape[1:]), kc.view(count, n, *kc.shape[1:]),
                                        vc.view(count, n, *vc.shape[1:]), causal=plan.causal).reshape(count * n, *qc.shape[1:]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    if plan.backend == "padded":
        idx = plan.pad_index.clamp(min=0)
        qp, kp, vp = q[idx], k[idx], v[idx]                   # (n, max_len, H, d)
        if plan.causal:
            out = dense_attention(qp, kp, vp, causal=True)
        else:
            bias = torch.zeros(plan.pad_valid.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~plan.pad_valid, float("-inf"))
            out = dense_attention(qp, kp, vp, key_bias=bias)
        return out[plan.pad_valid]
    if plan.backend == "block_diag":
        hq, hk = q.shape[1], k.shape[1]
        if hk != hq:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             attn_mask=plan.dense_mask)
        return out[0].transpose(0, 1)
    if plan.backend == "flash_varlen":
        fn = flash_attn_varlen()
        return fn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen, causal=plan.causal)
    raise ValueError(f"unknown attention backend {plan.backend!r}")
