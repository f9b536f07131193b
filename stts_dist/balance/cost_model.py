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

The LLM attention term is per *sample*, not per packed sequence: packed sequences carry
``cu_seqlens`` and no token attends across samples, so the quadratic work of a packed sequence is
the sum of its samples' ``L^2`` (causal, hence ``2 L^2 H`` instead of ``4 L^2 H``). That keeps the
cost additive over samples, which is what the partitioner needs. After pruning each frame keeps a
different number of patches (the budget is global per video); the attention term assumes the
kept patches are spread evenly over the frames (``sum_f k_f^2 >= K^2 / T``), a lower bound.
Everything is multiplied by 3 for training (backward = 2x forward). The connector (3x3 pooling
and projector) is < 1% of the total and is left out. Costs are FLOPs until :meth:`calibrate`
fits measured step times, after which they are seconds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

TRAIN_FLOP_FACTOR = 3.0   # forward + backward (2x forward)
COMPONENTS = ("vit_pre", "vit_post", "llm")


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
    def breakdown(self, samples: "SampleTable | Sequence[SampleMeta]") -> np.ndarray:
        """Unscaled FLOPs, shape ``(n, 3)``: columns ``vit_pre, vit_post, llm``."""
        t = SampleTable.coerce(samples)
        D, Mv = float(self.vit_width), float(self.vit_mlp)
        frames = t.frames.astype(np.float64)
        patches = frames * t.patches_per_frame
        kept = t.vit_patches_kept.astype(np.float64)
        pre_blocks = self.prune_at + 2
        post_blocks = self.vit_depth - pre_blocks
        lin = 2.0 * (4 * D * D + 2 * D * Mv)
        vit_pre = pre_blocks * (lin * patches + 4.0 * patches ** 2 * D / frames)
        vit_post = post_blocks * (lin * kept + 4.0 * kept ** 2 * D / frames)
        H, F = float(self.llm_hidden), float(self.llm_ffn)
        L = t.llm_tokens.astype(np.float64)
        per_token = 2.0 * (2 * H * H + 2 * self.llm_kv_ratio * H * H + 3 * H * F)
        llm = self.llm_layers * (per_token * L + 2.0 * L ** 2 * H) + 2.0 * L * H * self.llm_vocab
        return TRAIN_FLOP_FACTOR * np.stack([vit_pre, vit_post, llm], axis=1)

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
        kw = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "scale"}
        return CostModel(**kw, scale=scale)  # type: ignore[arg-type]


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
