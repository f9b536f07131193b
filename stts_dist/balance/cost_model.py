"""Per-sample compute cost, from shard-index metadata alone (no pixel is decoded).

STTS prunes a deterministic number of groups per video, so a sample's token counts before and
after pruning are known up front. The cost of one sample is the sum of three components:

* ``vit_pre``:  ViT blocks ``0 .. prune_at+1`` run on every patch of every frame;
* ``vit_post``: ViT blocks ``prune_at+2 .. depth-1`` run on the kept patches only;
* ``llm``:      the LLM runs on ``llm_visual_tokens + text_tokens`` tokens.

Forward FLOPs (one multiply-add = 2 FLOPs), ``D`` ViT width, ``Mv`` ViT MLP width, ``N``
patches per frame, ``T`` frames, ``K`` kept patches of the sample, ``H`` LLM hidden, ``F`` LLM
FFN width, ``rho = kv_heads / heads``, ``L`` LLM tokens of the sample, ``V`` vocabulary::

    vit_block_linear(n)  = 2 n (4 D^2 + 2 D Mv)            # qkv + out proj, MLP up + down
    vit_block_attn(n, T) = 4 n^2 D / T                      # QK^T and AV, per frame (n/T rows each)
    vit_pre  = (prune_at + 2)         * (vit_block_linear(N T) + vit_block_attn(N T, T))
    vit_post = (depth - prune_at - 2) * (vit_block_linear(K)   + vit_block_attn(K, T))
    llm      = layers * (2 L (2 H^2 + 2 rho H^2 + 3 H F) + 2 L^2 H) + 2 L H V

The per-token linear and the attention FLOPs are ``stts_dist.flops``'s (the estimator's and the
benchmark's formulas); this module adds the per-sample view and the LM head (``2 L H V``).

The LLM attention term is per *sample*, not per packed sequence: packed sequences carry
``cu_seqlens`` and no token attends across samples, so the quadratic work of a packed sequence is
the sum of its samples' ``L^2`` (causal, hence ``2 L^2 H`` instead of ``4 L^2 H``). That keeps the
cost additive over samples, which is what the partitioner needs. After pruning each frame keeps a
different number of patches (the budget is global per video); the attention term assumes the
kept patches are spread evenly over the frames (``sum_f k_f^2 >= K^2 / T``), a lower bound.
Everything is multiplied by 3 for training (backward = 2x forward). The connector (3x3 pooling
and projector) is < 1% of the total and is left out. Costs are FLOPs until :meth:`calibrate`
fits measured step times, after which they are seconds.

Kernel-rate calibration (no training step needed): FLOPs split into the six ``TERMS`` (linear and
attention of each component, the LM head counted with the LLM linears); :func:`measure_kernel_rates`
times the model's own matmul/attention shapes on the device and returns FLOP/s per term, and
:meth:`CostModel.with_kernel_rates` turns them into a :class:`KernelRateCostModel` whose unscaled
cost is ``sum_term FLOPs_term / rate_term`` seconds. Rates are per term, never per sample, so
the cost stays additive over samples.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from stts_dist import flops as model_flops

TRAIN_FLOP_FACTOR = 3.0   # forward + backward (2x forward)
COMPONENTS = ("vit_pre", "vit_post", "llm")
# Kernel terms of the kernel-rate calibration; each belongs to one component (TERM_COMPONENT).
TERMS = ("vit_pre_linear", "vit_pre_attn", "vit_post_linear", "vit_post_attn", "llm_linear", "llm_attn")
TERM_COMPONENT = np.repeat(np.eye(len(COMPONENTS)), 2, axis=0)   # (6, 3): term -> component sum


@dataclass
class SampleMeta:
    """Token counts of one sample, as recorded in the shard index.

    ``vit_patches_kept``: patches that run through the ViT blocks after the prune point; derived
    from the LLM visual tokens when not given (every kept group keeps its ``g x g`` patches, so
    the kept fraction of patches equals the kept fraction of groups)."""
    index: int
    frames: int
    patches_per_frame: int
    groups_per_frame: int
    llm_visual_tokens: int
    text_tokens: int
    is_video: bool
    vit_patches_kept: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("frames", "patches_per_frame", "groups_per_frame"):
            if getattr(self, name) < 1:
                raise ValueError(f"SampleMeta(index={self.index}).{name}={getattr(self, name)} must be >= 1")
        for name in ("llm_visual_tokens", "text_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"SampleMeta(index={self.index}).{name}={getattr(self, name)} must be >= 0")
        if self.llm_visual_tokens > self.groups_per_frame * self.frames:
            raise ValueError(
                f"SampleMeta(index={self.index}): llm_visual_tokens={self.llm_visual_tokens} exceeds "
                f"groups_per_frame*frames={self.groups_per_frame * self.frames}; check the shard index")
        if self.vit_patches_kept is None:
            self.vit_patches_kept = derived_patches_kept(
                self.frames, self.patches_per_frame, self.groups_per_frame, self.llm_visual_tokens)

    @property
    def llm_tokens(self) -> int:
        return self.llm_visual_tokens + self.text_tokens

    @property
    def vit_patches(self) -> int:
        return self.frames * self.patches_per_frame


def derived_patches_kept(frames, patches_per_frame, groups_per_frame, llm_visual_tokens):
    """``round(T N * visual / (G T))`` — works on ints and on numpy arrays."""
    total = np.asarray(frames) * np.asarray(patches_per_frame)
    kept = np.rint(total * np.asarray(llm_visual_tokens) / (np.asarray(groups_per_frame) * np.asarray(frames)))
    kept = kept.astype(np.int64)
    return int(kept) if kept.ndim == 0 else kept


_FIELDS = ("index", "frames", "patches_per_frame", "groups_per_frame", "llm_visual_tokens",
           "text_tokens", "is_video", "vit_patches_kept")


@dataclass
class SampleTable:
    """Struct-of-arrays form of many :class:`SampleMeta` (all arrays shape ``(n,)``).

    The planner works on this form so that a window of 30k samples costs a few numpy calls,
    not a Python loop."""
    index: np.ndarray
    frames: np.ndarray
    patches_per_frame: np.ndarray
    groups_per_frame: np.ndarray
    llm_visual_tokens: np.ndarray
    text_tokens: np.ndarray
    is_video: np.ndarray
    vit_patches_kept: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in _FIELDS[:-1]:
            dtype = bool if name == "is_video" else np.int64
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype).reshape(-1))
        n = len(self.index)
        if self.vit_patches_kept is None:
            self.vit_patches_kept = derived_patches_kept(
                self.frames, self.patches_per_frame, np.maximum(self.groups_per_frame, 1),
                self.llm_visual_tokens) if n else np.zeros(0, np.int64)
        self.vit_patches_kept = np.asarray(self.vit_patches_kept, dtype=np.int64).reshape(-1)
        for name in _FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"SampleTable.{name} has {len(getattr(self, name))} entries, index has {n}")
        if n and (self.frames.min() < 1 or self.patches_per_frame.min() < 1 or self.groups_per_frame.min() < 1):
            bad = int(self.index[np.argmin(np.minimum(self.frames, np.minimum(self.patches_per_frame,
                                                                              self.groups_per_frame)))])
            raise ValueError(f"SampleTable: sample {bad} has frames/patches_per_frame/groups_per_frame < 1")
        if n and (self.llm_visual_tokens.min() < 0 or self.text_tokens.min() < 0):
            raise ValueError("SampleTable: llm_visual_tokens and text_tokens must be >= 0")

    @classmethod
    def from_metas(cls, metas: Iterable[SampleMeta]) -> "SampleTable":
        metas = list(metas)
        if metas and not isinstance(metas[0], SampleMeta):
            raise TypeError(f"expected SampleMeta items, got {type(metas[0]).__name__}")
        cols = {name: np.fromiter((getattr(m, name) for m in metas), dtype=bool if name == "is_video" else np.int64,
                                  count=len(metas)) for name in _FIELDS}
        return cls(**cols)

    @classmethod
    def from_index(cls, dataset_index: Any) -> "SampleTable":
        """From any object with per-sample arrays ``frames, patches_per_frame, groups_per_frame,
        llm_visual_tokens, text_tokens, is_video`` (e.g. ``data_pipeline.dataset_index.DatasetIndex``);
        sample ``i`` gets index ``i``."""
        missing = [f for f in _FIELDS[1:-1] if not hasattr(dataset_index, f)]
        if missing:
            raise TypeError(f"SampleTable.from_index: {type(dataset_index).__name__} lacks {missing}")
        cols = {f: getattr(dataset_index, f) for f in _FIELDS[1:-1]}
        return cls(index=np.arange(len(cols["frames"])), **cols)

    @classmethod
    def coerce(cls, samples: "SampleTable | Sequence[SampleMeta]") -> "SampleTable":
        return samples if isinstance(samples, SampleTable) else cls.from_metas(samples)

    @classmethod
    def empty(cls) -> "SampleTable":
        z = np.zeros(0, np.int64)
        return cls(z, z, z, z, z, z, np.zeros(0, bool), z)

    @classmethod
    def concat(cls, tables: Sequence["SampleTable"]) -> "SampleTable":
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        return cls(**{name: np.concatenate([getattr(t, name) for t in tables]) for name in _FIELDS})

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> "SampleTable":
        rows = np.asarray(rows, dtype=np.int64)
        return SampleTable(**{name: getattr(self, name)[rows] for name in _FIELDS})

    def to_metas(self) -> list[SampleMeta]:
        cols = [getattr(self, name).tolist() for name in _FIELDS]
        return [SampleMeta(*row) for row in zip(*cols)]

    @property
    def llm_tokens(self) -> np.ndarray:
        return self.llm_visual_tokens + self.text_tokens

    @property
    def vit_patches(self) -> np.ndarray:
        return self.frames * self.patches_per_frame

    def rows_of(self, indices: np.ndarray) -> np.ndarray:
        """Row of each dataset ``index`` in this table; a clear error for unknown ones."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(self.index, kind="stable")
        pos = np.searchsorted(self.index[order], indices)
        pos = np.minimum(pos, max(len(order) - 1, 0))
        if len(order) == 0 or np.any(self.index[order][pos] != indices):
            missing = indices[(len(order) == 0) | (self.index[order][pos] != indices)] if len(order) else indices
            raise KeyError(f"sample indices {missing[:5].tolist()} are not in the metadata table; pass the "
                           "metas of every candidate of the plan (including samples deferred from earlier steps)")
        return order[pos]


@dataclass
class CostModel:
    """Modelled training cost of a sample; see the module docstring for the formula.

    ``scale`` multiplies each component (1.0 each: FLOPs; after :meth:`calibrate`: seconds/FLOP)."""
    vit_width: int
    vit_depth: int
    vit_mlp: int
    prune_at: int
    llm_hidden: int
    llm_layers: int
    llm_ffn: int
    llm_kv_ratio: float
    patches_per_frame: int
    llm_vocab: int = 0
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if not 0 <= self.prune_at <= self.vit_depth - 2:
            raise ValueError(f"CostModel: prune_at={self.prune_at} must be in [0, vit_depth-2={self.vit_depth - 2}] "
                             "(pruning happens after block prune_at+1)")
        if not 0 < self.llm_kv_ratio <= 1:
            raise ValueError(f"CostModel: llm_kv_ratio={self.llm_kv_ratio} must be kv_heads/heads in (0, 1]")
        self.scale = tuple(float(s) for s in self.scale)  # type: ignore[assignment]

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dims(cls, vit_width: int, vit_depth: int, vit_mlp: int, prune_at: int, llm_hidden: int,
                  llm_layers: int, llm_ffn: int, llm_kv_ratio: float, patches_per_frame: int,
                  llm_vocab: int = 0) -> "CostModel":
        return cls(int(vit_width), int(vit_depth), int(vit_mlp), int(prune_at), int(llm_hidden),
                   int(llm_layers), int(llm_ffn), float(llm_kv_ratio), int(patches_per_frame), int(llm_vocab))

    @classmethod
    def from_model_config(cls, model_cfg: Any) -> "CostModel":
        """From ``RunConfig.model`` (see ``stts_dist/config.py``)."""
        vit, llm, stts = model_cfg.vit, model_cfg.llm, model_cfg.stts
        n = vit.image_size // vit.patch_size
        return cls.from_dims(vit.width, vit.depth, vit.mlp_dim, stts.prune_at, llm.hidden, llm.layers, llm.ffn,
                             llm.kv_heads / llm.heads, n * n, llm.vocab_size)

    # -- cost -----------------------------------------------------------------------------------
    def vit_linear_flops_per_row(self) -> float:
        """Forward FLOPs of one ViT block's linears per patch: qkv + out projection, MLP up + down."""
        return float(model_flops.vit_linear_flops_per_token(self.vit_width, self.vit_mlp))

    def llm_linear_flops_per_token(self) -> float:
        """Forward FLOPs of one LLM layer's linears per token: q, o, k, v (GQA), SwiGLU gate/up/down."""
        return model_flops.llm_linear_flops_per_token(float(self.llm_hidden), float(self.llm_ffn), self.llm_kv_ratio)

    def _forward_pieces(self, t: SampleTable) -> dict[str, np.ndarray]:
        """Forward FLOPs per sample (each ``(n,)``) of ONE ViT block / LLM layer split into linear and
        attention, plus the LM head; :meth:`breakdown` and :meth:`term_flops` combine them."""
        D, H = float(self.vit_width), float(self.llm_hidden)
        frames = t.frames.astype(np.float64)
        patches = frames * t.patches_per_frame
        kept = t.vit_patches_kept.astype(np.float64)
        L = t.llm_tokens.astype(np.float64)
        lin = self.vit_linear_flops_per_row()
        # ViT attention is per frame: T frames of n/T patches cost 1/T of one sequence of n (kept
        # patches assumed spread evenly, see the module doc)
        return {"vit_pre_linear": lin * patches, "vit_pre_attn": model_flops.attention_flops(patches, D) / frames,
                "vit_post_linear": lin * kept, "vit_post_attn": model_flops.attention_flops(kept, D) / frames,
                "llm_linear": self.llm_linear_flops_per_token() * L,
                "llm_attn": model_flops.attention_flops(L, H, causal=True),
                "llm_head": 2.0 * L * H * self.llm_vocab}

    def _blocks(self) -> tuple[int, int]:
        """(ViT blocks before the prune point incl. the key-bias block, ViT blocks after it)."""
        pre_blocks = self.prune_at + 2
        return pre_blocks, self.vit_depth - pre_blocks

    def breakdown(self, samples: "SampleTable | Sequence[SampleMeta]") -> np.ndarray:
        """Unscaled FLOPs, shape ``(n, 3)``: columns ``vit_pre, vit_post, llm``."""
        p = self._forward_pieces(SampleTable.coerce(samples))
        pre_blocks, post_blocks = self._blocks()
        vit_pre = pre_blocks * (p["vit_pre_linear"] + p["vit_pre_attn"])
        vit_post = post_blocks * (p["vit_post_linear"] + p["vit_post_attn"])
        llm = self.llm_layers * (p["llm_linear"] + p["llm_attn"]) + p["llm_head"]
        return TRAIN_FLOP_FACTOR * np.stack([vit_pre, vit_post, llm], axis=1)

    def term_flops(self, samples: "SampleTable | Sequence[SampleMeta]") -> np.ndarray:
        """Training FLOPs per kernel term, shape ``(n, 6)``, columns ``TERMS``; ``@ TERM_COMPONENT``
        gives :meth:`breakdown` of the FLOP model (up to rounding)."""
        p = self._forward_pieces(SampleTable.coerce(samples))
        pre_blocks, post_blocks = self._blocks()
        terms = [pre_blocks * p["vit_pre_linear"], pre_blocks * p["vit_pre_attn"],
                 post_blocks * p["vit_post_linear"], post_blocks * p["vit_post_attn"],
                 self.llm_layers * p["llm_linear"] + p["llm_head"], self.llm_layers * p["llm_attn"]]
        return TRAIN_FLOP_FACTOR * np.stack(terms, axis=1)

    def costs(self, samples: "SampleTable | Sequence[SampleMeta]") -> np.ndarray:
        """Cost per sample, shape ``(n,)``."""
        return self.breakdown(samples) @ np.asarray(self.scale)

    def cost(self, sample: SampleMeta) -> float:
        return float(self.costs([sample])[0])

    # -- calibration ----------------------------------------------------------------------------
    def calibrate(self, measured: Sequence[tuple[Any, float]]) -> "CostModel":
        """Fit the three component coefficients to measured times; returns a new model.

        ``measured``: ``(x, seconds)`` pairs, ``x`` either a breakdown of shape ``(3,)`` (the
        summed :meth:`breakdown` of what ran in that time, e.g. one micro-step of one rank) or a
        scalar modelled cost (then only the overall scale is fitted). The fit is non-negative
        least squares (exact, by trying every subset of components), so a component the
        measurements cannot separate gets coefficient 0 rather than a negative one."""
        if len(measured) == 0:
            raise ValueError("CostModel.calibrate: no measurements; pass [(breakdown_or_cost, seconds), ...]")
        xs = [np.atleast_1d(np.asarray(x, dtype=np.float64)) for x, _ in measured]
        y = np.asarray([s for _, s in measured], dtype=np.float64)
        if np.any(y < 0) or not np.all(np.isfinite(y)):
            raise ValueError("CostModel.calibrate: measured seconds must be finite and >= 0")
        widths = {len(x) for x in xs}
        if widths == {1}:
            x = np.concatenate(xs)
            denom = float(x @ x)
            if denom == 0:
                raise ValueError("CostModel.calibrate: all measured costs are 0")
            k = float(x @ y) / denom
            return self._with_scale(tuple(k * s for s in self.scale))
        if widths != {3}:
            raise ValueError("CostModel.calibrate: each x must be a scalar cost or a (vit_pre, vit_post, llm) breakdown")
        X = np.stack(xs)
        coef = _nnls_small(X, y)
        if not np.any(coef > 0):
            raise ValueError("CostModel.calibrate: the fit gave all-zero coefficients; measurements are degenerate")
        return self._with_scale(tuple(float(c) for c in coef))

    def _with_scale(self, scale: tuple[float, ...]) -> "CostModel":
        return dataclasses.replace(self, scale=scale)   # keeps the class (and kernel rates) of self

    def with_kernel_rates(self, rates: Mapping[str, float]) -> "KernelRateCostModel":
        """A model whose unscaled costs are seconds ``sum_term FLOPs_term / rates[term]``.

        ``rates``: FLOP/s for every name in ``TERMS`` (e.g. from :func:`measure_kernel_rates`).
        The result's ``scale`` is reset to 1: a scale fitted to FLOPs (seconds per FLOP) would
        have the wrong unit on seconds. :meth:`calibrate` still works on the result and then
        fits dimensionless per-component corrections."""
        missing = [t for t in TERMS if t not in rates]
        unknown = sorted(set(rates) - set(TERMS))
        if missing or unknown:
            raise ValueError(f"CostModel.with_kernel_rates: rates need exactly the terms {TERMS}; "
                             f"missing {missing}, unknown {unknown}")
        dims = {k: getattr(self, k) for k in CostModel.__dataclass_fields__ if k != "scale"}
        return KernelRateCostModel(**dims, kernel_rates=tuple(float(rates[t]) for t in TERMS))


@dataclass
class KernelRateCostModel(CostModel):
    """:class:`CostModel` whose unscaled cost is kernel time: each term's FLOPs divided by the
    measured FLOP rate of that term's kernels on the device (``kernel_rates``, FLOP/s, in
    ``TERMS`` order). :meth:`breakdown` returns seconds per component, shape ``(n, 3)``.

    Use it when the costs must hold across model shapes (comparing configurations, or components
    whose matrices differ in size): FLOP/s grows with matrix size, so raw FLOPs overrate wide
    models. A separate class, so that the configuration of plain FLOP models (recorded in the
    planner's checkpoint state) does not change."""
    kernel_rates: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        rates = tuple(float(r) for r in self.kernel_rates)
        if len(rates) != len(TERMS) or not all(np.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"KernelRateCostModel: kernel_rates={self.kernel_rates} must be {len(TERMS)} "
                             f"positive finite FLOP/s, one per term {TERMS}")
        self.kernel_rates = rates  # type: ignore[assignment]

    @property
    def rates(self) -> dict[str, float]:
        return dict(zip(TERMS, self.kernel_rates))

    def term_seconds(self, samples: "SampleTable | Sequence[SampleMeta]") -> np.ndarray:
        """Kernel seconds per sample and term, shape ``(n, 6)``: ``term_flops / kernel_rates``."""
        return self.term_flops(samples) / np.asarray(self.kernel_rates)

    def breakdown(self, samples: "SampleTable | Sequence[SampleMeta]") -> np.ndarray:
        """Unscaled kernel seconds, shape ``(n, 3)``: columns ``vit_pre, vit_post, llm``."""
        return self.term_seconds(samples) @ TERM_COMPONENT


def _nnls_small(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: best feasible subset solution."""
    n_cols = X.shape[1]
    colscale = np.maximum(np.abs(X).max(axis=0), 1e-300)   # FLOP columns are ~1e15; condition them
    Xs = X / colscale
    best, best_res = np.zeros(n_cols), float(y @ y)
    for size in range(1, n_cols + 1):
        for cols in itertools.combinations(range(n_cols), size):
            sol, *_ = np.linalg.lstsq(Xs[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            res = float(np.sum((Xs[:, cols] @ sol - y) ** 2))
            if res < best_res - 1e-15 * max(best_res, 1.0):
                best_res = res
                best = np.zeros(n_cols)
                best[list(cols)] = sol
    return best / colscale


# ---------------------------------------------------------------------------------------------
# kernel-rate calibration

def representative_shapes(samples: "SampleTable | Sequence[SampleMeta]", max_rows: int = 4096) -> dict[str, int]:
    """Kernel shapes of one training step on ``samples`` (e.g. one micro-batch), for timing.

    ``*_rows``: tokens through one ViT block (before / after pruning) or LLM layer, i.e. rows of
    their matmuls, capped at ``max_rows`` so the measurement stays short. ``*_len``: attention
    length (patches per frame for the ViT, ``L`` for the LLM), the mean weighted by attention
    FLOPs (``sum c l^3 / sum c l^2``) since those dominate the term. ``*_batch``: frames or
    samples per timed attention call (``<= max_rows // len``)."""
    t = SampleTable.coerce(samples)
    if len(t) == 0:
        raise ValueError("representative_shapes: no samples; pass the metadata of a typical micro-batch")
    frames = t.frames.astype(np.float64)
    kept_per_frame = t.vit_patches_kept / frames
    llm_tokens = t.llm_tokens.astype(np.float64)
    stages = {"vit_pre": (t.patches_per_frame.astype(np.float64), frames),
              "vit_post": (kept_per_frame, frames), "llm": (llm_tokens, np.ones(len(t)))}
    shapes: dict[str, int] = {}
    for stage, (lengths, counts) in stages.items():
        length = _flop_weighted_length(lengths, counts)
        shapes[f"{stage}_rows"] = int(min(max_rows, max(1.0, float(lengths @ counts))))
        shapes[f"{stage}_len"] = length
        shapes[f"{stage}_batch"] = int(min(counts.sum(), max(1, max_rows // length)))
    return shapes


def _flop_weighted_length(lengths: np.ndarray, counts: np.ndarray) -> int:
    """``sum c l^3 / sum c l^2`` rounded, >= 1: the length where most attention FLOPs are spent."""
    weight = counts * lengths ** 2
    if weight.sum() <= 0:
        return 1
    return max(1, int(round(float(weight @ lengths / weight.sum()))))


def measure_kernel_rates(cost_model: CostModel, samples: "SampleTable | Sequence[SampleMeta]", *,
                         vit_heads: int, llm_heads: int, max_rows: int = 4096, device: str = "cpu",
                         dtype: Any = None, repeats: int = 5) -> dict[str, float]:
    """Training FLOP/s of each of ``TERMS`` on ``device``, from the model's own kernel shapes.

    Times, forward + backward (inputs and weights both need gradients, as in a trained block),
    the matmuls of one ViT block at the pre- and post-pruning row counts, one LLM layer plus the
    LM head, and ``scaled_dot_product_attention`` at the per-frame (ViT, bidirectional) and
    per-sample (LLM, causal) lengths of :func:`representative_shapes`. Backward is timed rather
    than assumed to be 2x forward: its matmuls are the transposed shapes (``dX = dY W^T``,
    ``dW = X^T dY``, reducing over the rows), which run at a different rate. Each rate is the
    cost model's FLOP count of the timed work divided by its time, so ``FLOPs_term / rate_term``
    reproduces the kernel time even where the kernel does more or less work than counted
    (e.g. causal attention). Times are the minimum over ``repeats`` after one warm-up run:
    preemption on a shared machine only ever adds time. ``vit_heads``/``llm_heads`` set the head
    dimension, which the FLOP count does not see. Norms, activations, the optimizer step and
    the connector are not timed; the rates describe kernels, not whole steps.

    Returns ``{term: FLOP/s}``; feed it to :meth:`CostModel.with_kernel_rates`."""
    import torch   # lazy: the planner imports this module on every rank; only measuring needs torch

    cm = cost_model
    if cm.vit_width % vit_heads or cm.llm_hidden % llm_heads:
        raise ValueError(f"measure_kernel_rates: vit_width={cm.vit_width} / vit_heads={vit_heads} and "
                         f"llm_hidden={cm.llm_hidden} / llm_heads={llm_heads} must divide evenly")
    shapes = representative_shapes(samples, max_rows)
    timer = _KernelTimer(torch, torch.device(device), dtype or torch.get_default_dtype(), repeats)
    D, Mv, H, F = cm.vit_width, cm.vit_mlp, cm.llm_hidden, cm.llm_ffn
    kv = round(cm.llm_kv_ratio * H)
    rates: dict[str, float] = {}
    for stage in ("vit_pre", "vit_post"):
        rows, length, batch = (shapes[f"{stage}_{k}"] for k in ("rows", "len", "batch"))
        seconds = timer.linears(rows, [(D, 3 * D), (D, D), (D, Mv), (Mv, D)])
        rates[f"{stage}_linear"] = TRAIN_FLOP_FACTOR * cm.vit_linear_flops_per_row() * rows / seconds
        seconds = timer.attention(batch, length, vit_heads, D // vit_heads, causal=False)
        rates[f"{stage}_attn"] = TRAIN_FLOP_FACTOR * model_flops.attention_flops(length, D) * batch / seconds
    rows = shapes["llm_rows"]
    layer_s = timer.linears(rows, [(H, H), (H, kv), (H, kv), (H, H), (H, F), (H, F), (F, H)])
    head_s = timer.linears(rows, [(H, cm.llm_vocab)]) if cm.llm_vocab else 0.0
    # one rate for layers + head, weighted as the cost model weights them (both scale with L)
    flops = cm.llm_layers * cm.llm_linear_flops_per_token() + 2.0 * H * cm.llm_vocab
    rates["llm_linear"] = TRAIN_FLOP_FACTOR * flops * rows / (cm.llm_layers * layer_s + head_s)
    length, batch = shapes["llm_len"], shapes["llm_batch"]
    seconds = timer.attention(batch, length, llm_heads, H // llm_heads, causal=True)
    rates["llm_attn"] = TRAIN_FLOP_FACTOR * model_flops.attention_flops(length, H, causal=True) * batch / seconds
    return rates


class _KernelTimer:
    """Forward + backward timings of linears and attention with random data (seconds)."""

    def __init__(self, torch: Any, device: Any, dtype: Any, repeats: int):
        if repeats < 1:
            raise ValueError(f"measure_kernel_rates: repeats={repeats} must be >= 1")
        self.torch, self.device, self.dtype, self.repeats = torch, device, dtype, repeats

    def _randn(self, *shape: int, grad: bool = True):
        return self.torch.randn(*shape, device=self.device, dtype=self.dtype, requires_grad=grad)

    def linears(self, rows: int, in_out: Sequence[tuple[int, int]]) -> float:
        """Summed time of ``(rows, in) @ (in, out)`` for each pair, with ``dX`` and ``dW``."""
        total = 0.0
        for fan_in, fan_out in in_out:
            x, w = self._randn(rows, fan_in), self._randn(fan_out, fan_in)
            grad_out = self._randn(rows, fan_out, grad=False)
            linear = self.torch.nn.functional.linear
            total += self._best_time(lambda: self.torch.autograd.grad(linear(x, w), (x, w), grad_out))
        return total

    def attention(self, batch: int, length: int, heads: int, head_dim: int, causal: bool) -> float:
        """Time of ``scaled_dot_product_attention`` on ``(batch, length, heads, head_dim)`` q/k/v laid
        out as the model passes them (transposed views), with the gradients of q, k and v."""
        q, k, v = (self._randn(batch, length, heads, head_dim) for _ in range(3))
        grad_out = self._randn(batch, heads, length, head_dim, grad=False)
        sdpa = self.torch.nn.functional.scaled_dot_product_attention

        def step():
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
            return self.torch.autograd.grad(out, (q, k, v), grad_out)
        return self._best_time(step)

    def _best_time(self, step: Callable[[], Any]) -> float:
        step()                                   # warm-up: allocator, kernel selection
        best = float("inf")
        for _ in range(self.repeats):
            self._sync()
            start = time.perf_counter()
            step()
            self._sync()
            best = min(best, time.perf_counter() - start)
        return best

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
