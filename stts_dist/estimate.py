"""Parameters, per-GPU memory and FLOPs of a run config under ZeRO x tensor parallelism.

Everything is computed from the config alone (no model is built, nothing is allocated), so a
7B-class run can be sized on a laptop: ``python tools/estimate_memory.py --config X --nodes N``.

Model (what the numbers assume):

* Parameters: the exact element counts of :class:`stts_dist.model.vlm.VideoVLM` (tests compare
  them with ``sum(p.numel())`` of a built model).
* Tensor parallelism (Megatron layout, TP inside a node): column-parallel q/k/v, fc1 and
  gate/up (weights and biases), row-parallel out_proj/o_proj, fc2 and down (weights; their biases
  stay whole), vocab-parallel embedding and untied LM head (vocab padded to a TP multiple). Norms,
  patch/position embeddings, the scorer and the connector are replicated on every TP rank.
* ZeRO over the DP group, mixed precision with bf16 weights and fp32 master weights + Adam m, v:
  16 bytes per parameter; stage 3 shards all of it over DP, stage 2 keeps bf16 params whole,
  stage 1 keeps bf16 params and grads whole, stage 0 shards nothing. ZeRO-3 also gathers each module's bf16 params just
  before use (current + prefetched module) and its full gradient for the reduce-scatter:
  ~3 x the largest module.
* Activations: bf16, memory-efficient attention (no L x L score matrix stored), no dropout, no
  sequence parallelism; see :func:`vit_block_activation_bytes` and
  :func:`llm_layer_activation_bytes` for the per-token-per-layer formulas.
* ``train.batch_size`` is the GLOBAL batch per optimizer step (as in
  ``stts_dist.distributed.deepspeed_engine.DeepSpeedSettings``):
  micro-batch = batch_size / (DP x parallel.grad_accum_steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from stts_dist.config import ConfigError
from stts_dist.flops import FlopBreakdown, model_forward_flops
from stts_dist.stts.budget import TokenBudget

BF16_BYTES = 2
# bf16 weights (2) + bf16 grads (2) + fp32 master weights, Adam m and v (4 + 4 + 4).
BYTES_PER_PARAM_STATE = {"params": 2, "grads": 2, "optimizer": 12}
GB = 1e9


# --- parameters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleParams:
    """Element counts of one model part: ``total`` as built (TP=1), ``per_tp_rank`` what one TP
    rank holds (split matrices / TP, vocab padded, + everything replicated), ``largest_unit`` the
    biggest module ZeRO-3 gathers at once (per TP rank)."""

    total: int
    per_tp_rank: int
    largest_unit: int


def _split(n: int, tp: int) -> int:
    if n % tp:
        raise ConfigError(f"a tensor-parallel dimension of {n} elements does not divide by tensor_parallel={tp}")
    return n // tp


def vit_params(v: Any, tp: int = 1) -> ModuleParams:
    """Patch embedding (conv + bias), position embedding, ``depth`` pre-norm blocks (no final norm)."""
    W, M = v.width, v.mlp_dim
    num_patches = (v.image_size // v.patch_size) ** 2
    embed = v.in_channels * v.patch_size ** 2 * W + W + num_patches * W
    split = 3 * (W * W + W) + W * W + (W * M + M) + M * W   # q/k/v, out_proj.w, fc1, fc2.w
    replicated = 4 * W + W + W                              # 2 LayerNorms, out_proj.b, fc2.b
    block_total = split + replicated
    block_rank = _split(split, tp) + replicated
    return ModuleParams(embed + v.depth * block_total, embed + v.depth * block_rank, max(block_rank, embed))


def scorer_params(v: Any, s: Any) -> ModuleParams:
    """LayerNorm, [down-projection], mean-query attention pool (q, kv, out), 3-layer MLP on
    [prev, current]."""
    W, H = v.width, s.scorer_hidden
    P = s.scorer_pool_dim or W
    down = W * P + P if s.scorer_pool_dim else 0
    n = 2 * W + down + (4 * P * P + 4 * P) + (2 * P * H + H) + (H * H + H) + (H + 1)
    return ModuleParams(n, n, n)


def connector_params(v: Any, c: Any, l: Any) -> ModuleParams:
    """LayerNorm + attention pool over ``len(layers)`` concatenated ViT layers, 2-layer MLP."""
    dim = v.width * len(c.layers)
    n = 2 * dim + (4 * dim * dim + 4 * dim) + (dim * l.hidden + l.hidden) + (l.hidden * l.hidden + l.hidden)
    return ModuleParams(n, n, n)


def llm_params(l: Any, vocab_size: int, tp: int = 1) -> ModuleParams:
    """Embedding, decoder layers (RMSNorm, GQA attention, SwiGLU), final norm, LM head if untied."""
    h, hd = l.hidden, l.hidden // l.heads
    q, kv = l.heads * hd, l.kv_heads * hd
    bias = (q + 2 * kv) if l.qkv_bias else 0
    split = h * q + 2 * h * kv + bias + q * h + 3 * h * l.ffn
    replicated = 2 * h
    padded_vocab = -(-vocab_size // tp) * tp     # as stts_dist.distributed.tp_layers.padded_vocab_size
    heads_total = vocab_size * h * (1 if l.tie_embeddings else 2)
    heads_rank = (padded_vocab // tp) * h * (1 if l.tie_embeddings else 2)
    layer_rank = _split(split, tp) + replicated
    total = heads_total + l.layers * (split + replicated) + h
    per_rank = heads_rank + l.layers * layer_rank + h
    return ModuleParams(total, per_rank, max(layer_rank, (padded_vocab // tp) * h))


def resolved_vocab_size(model_cfg: Any) -> int:
    """``model.llm.vocab_size``, or the default tokenizer's size when it is 0 (as build_model does)."""
    if model_cfg.llm.vocab_size:
        return int(model_cfg.llm.vocab_size)
    from stts_dist.tokenizer import default_tokenizer
    return default_tokenizer().vocab_size


def parameter_counts(model_cfg: Any, tp: int = 1, vocab_size: Optional[int] = None) -> dict[str, ModuleParams]:
    """{"vit", "connector", "scorer", "llm"} -> :class:`ModuleParams`. The scorer exists in every
    built model (also when ``stts.method`` is not ``scorer``), so it is always counted."""
    vocab = vocab_size or resolved_vocab_size(model_cfg)
    m = model_cfg
    return {"vit": vit_params(m.vit, tp), "connector": connector_params(m.vit, m.connector, m.llm),
            "scorer": scorer_params(m.vit, m.stts), "llm": llm_params(m.llm, vocab, tp)}


# --- parallel plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    # CUDA context, NCCL communicators and buffers, allocator fragmentation: not in the formulas.
    overhead_gb: float = 5.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ParallelPlan:
    tensor_parallel: int
    data_parallel: int
    zero_stage: int
    micro_batch: int          # videos per DP rank per forward
    grad_accum: int = 1       # micro-batches per optimizer step


def plan_from_config(cfg: Any, cluster: Cluster) -> ParallelPlan:
    """TP x DP layout of ``cfg`` on ``cluster`` (``load_config`` already checked the ZeRO stage and
    that TP divides the heads and FFN widths)."""
    tp = int(cfg.parallel.tensor_parallel)
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        raise ConfigError(f"--nodes={cluster.nodes} and --gpus-per-node={cluster.gpus_per_node} must be >= 1")
    if cluster.gpus_per_node % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} must divide --gpus-per-node={cluster.gpus_per_node}: "
                          "a TP group stays inside one node (its all-reduces need NVLink)")
    dp = cluster.world_size // tp
    accum = int(cfg.parallel.grad_accum_steps)
    batch = int(cfg.train.batch_size)
    if batch % (dp * accum):
        raise ConfigError(f"train.batch_size={batch} (global) is not divisible by data_parallel={dp} x "
                          f"parallel.grad_accum_steps={accum} ({cluster.nodes} nodes x {cluster.gpus_per_node} GPUs / "
                          f"tensor_parallel={tp}); use a multiple of {dp * accum} or another --nodes")
    return ParallelPlan(tp, dp, int(cfg.parallel.zero_stage), batch // (dp * accum), accum)


# --- token counts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What one sample looks like beyond the config: text tokens around the visual ones."""

    text_tokens: int = 64       # prompt + question + answer + special tokens per sample
    answer_tokens: int = 8      # positions with a label (the LM head runs on these only)


@dataclass(frozen=True)
class MicroBatchTokens:
    videos: int
    frames: int                 # frames in the micro-batch
    vit_full: int               # patches through blocks 0..prune_at+1
    vit_kept: int               # patches through blocks prune_at+2..depth-1
    kept_groups: int            # groups reaching the connector (= LLM visual tokens)
    llm_tokens: int             # packed LLM sequence length of the micro-batch
    answer_tokens: int


def micro_batch_tokens(budget: TokenBudget, num_frames: int, videos: int, workload: Workload) -> MicroBatchTokens:
    """Token counts of ``videos`` samples of ``num_frames`` frames each, pruned to ``budget``."""
    n, G = budget.patches_per_frame, budget.groups_per_frame
    kept_groups = budget.llm_visual_tokens(num_frames)
    kept_patches = round(kept_groups * n / G)     # exact when the patch grid divides by pool_size
    return MicroBatchTokens(videos, videos * num_frames, videos * num_frames * n, videos * kept_patches,
                            videos * kept_groups, videos * (kept_groups + workload.text_tokens),
                            videos * workload.answer_tokens)


# --- activations --------------------------------------------------------------------------------

def vit_block_activation_bytes(width: int, mlp_dim: int, tp: int = 1) -> float:
    """Bytes one ViT block keeps for backward, per token:

        2 * (4W + (4W + 2M) / TP)

    4W replicated on every TP rank (LN1 in/out, LN2 in/out); 4W split (q, k, v, attention output)
    and 2M split (fc1 output, GELU output)."""
    return BF16_BYTES * (4 * width + (4 * width + 2 * mlp_dim) / tp)


def llm_layer_activation_bytes(hidden: int, heads: int, kv_heads: int, ffn: int, tp: int = 1) -> float:
    """Bytes one decoder layer keeps for backward, per token:

        2 * (8h + (2h + 2kv + 4f) / TP),  kv = kv_heads * head_dim

    8h replicated: each of the two RMSNorms keeps its input in fp32 (it normalises in fp32: 2h in
    bf16 units), the normalised bf16 value and its output (the next matmul's input); split: q and
    attention output (2h), k and v (2kv; GQA kernels do not repeat them), gate, up, SiLU(gate),
    SiLU(gate)*up (4f)."""
    kv = kv_heads * (hidden // heads)
    return BF16_BYTES * (8 * hidden + (2 * hidden + 2 * kv + 4 * ffn) / tp)


def checkpointed_layer_bytes(width: int) -> float:
    """With full activation checkpointing a layer keeps only its input: 2 * width bytes per token
    (replicated over TP); the backward pass recomputes one layer at a time."""
    return BF16_BYTES * width


def activation_bytes(model_cfg: Any, tokens: MicroBatchTokens, vocab_size: int, tp: int,
                     checkpointing: bool) -> dict[str, float]:
    """Per-GPU activation bytes of one micro-batch, by part."""
    m = model_cfg
    v, c, l, s = m.vit, m.connector, m.llm, m.stts
    full_blocks = s.prune_at + 2
    kept_blocks = v.depth - full_blocks
    vit_layer = vit_block_activation_bytes(v.width, v.mlp_dim, tp)
    llm_layer = llm_layer_activation_bytes(l.hidden, l.heads, l.kv_heads, l.ffn, tp)
    out: dict[str, float] = {}
    # frames (bf16 pixels) and the patch-embedding output
    out["patch_embed"] = BF16_BYTES * tokens.vit_full * (v.in_channels * v.patch_size ** 2 + v.width)
    per_vit = checkpointed_layer_bytes(v.width) if checkpointing else vit_layer
    out["vit_before_prune"] = full_blocks * tokens.vit_full * per_vit
    out["vit_after_prune"] = kept_blocks * tokens.vit_kept * per_vit
    if s.method == "scorer":
        # LN output + pool k, v on every patch, and the temporal-loss group features (one W per patch)
        out["scorer"] = BF16_BYTES * tokens.vit_full * 4 * v.width
    dim = v.width * len(c.layers)
    g2 = c.pool_size ** 2
    # per kept group: grouped features, LN output, pool k and v (g^2 x dim each), pooled, 2 MLP outputs
    out["connector"] = BF16_BYTES * tokens.kept_groups * (4 * g2 * dim + dim + 2 * l.hidden)
    per_llm = checkpointed_layer_bytes(l.hidden) if checkpointing else llm_layer
    # embeddings + final norm in/out, replicated
    out["llm_layers"] = l.layers * tokens.llm_tokens * per_llm + BF16_BYTES * tokens.llm_tokens * 3 * l.hidden
    # vocab-parallel logits and their gradient in fp32 on the answer positions only
    out["lm_loss"] = 2 * 4 * tokens.answer_tokens * (-(-vocab_size // tp))
    if checkpointing:
        # one layer recomputed at a time: the largest of a full-frame ViT block and an LLM layer
        out["recompute_working_set"] = max(tokens.vit_full * vit_layer, tokens.llm_tokens * llm_layer)
    return out


# --- the estimate -------------------------------------------------------------------------------

@dataclass
class Estimate:
    plan: ParallelPlan
    cluster: Cluster
    params: dict[str, ModuleParams]
    model_state: dict[str, float]                       # bytes per GPU
    tokens: dict[bool, MicroBatchTokens]                # pruned? -> token counts
    activations: dict[tuple[bool, bool], dict[str, float]] = field(default_factory=dict)  # (pruned, ckpt)
    flops: dict[bool, FlopBreakdown] = field(default_factory=dict)      # pruned? -> forward FLOPs, global batch
    checkpointing: bool = False
    prune_ratio: float = 0.0

    def activation_total(self, pruned: bool, checkpointing: bool) -> float:
        return sum(self.activations[(pruned, checkpointing)].values())

    def total_bytes(self, pruned: bool = True, checkpointing: Optional[bool] = None) -> float:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        return (sum(self.model_state.values()) + self.activation_total(pruned, ckpt)
                + self.cluster.overhead_gb * GB)

    @property
    def fits(self) -> bool:
        return self.total_bytes(pruned=True) <= self.cluster.gpu_mem_gb * GB

    def train_flops_per_step(self, pruned: bool) -> float:
        """fwd + bwd (~3 x forward), + one more forward with activation checkpointing."""
        return (4.0 if self.checkpointing else 3.0) * self.flops[pruned].total


def model_state_bytes(params: dict[str, ModuleParams], plan: ParallelPlan) -> dict[str, float]:
    """Per-GPU bytes of weights, grads and optimizer state under ZeRO ``plan.zero_stage``."""
    per_rank = sum(p.per_tp_rank for p in params.values())
    dp, stage = plan.data_parallel, plan.zero_stage
    sharded = {"params": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1}
    out = {f"{k} ({'bf16' if k != 'optimizer' else 'fp32 master + Adam m, v'})":
           BYTES_PER_PARAM_STATE[k] * per_rank / (dp if sharded[k] else 1) for k in BYTES_PER_PARAM_STATE}
    if stage == 3:
        largest = max(p.largest_unit for p in params.values())
        out["ZeRO-3 gathered params/grads"] = 3 * BF16_BYTES * largest
    return out


def _frames_kept_patches(budget: TokenBudget, num_frames: int) -> list[int]:
    """Kept patches per frame of one video: the first frame whole, the rest spread evenly (the
    scorer's real split varies per video; FLOPs depend on it only through the attention term)."""
    n, G = budget.patches_per_frame, budget.groups_per_frame
    kept = budget.llm_visual_tokens(num_frames)
    if num_frames == 1:
        return [round(kept * n / G)]
    rest, extra = divmod(kept - G, num_frames - 1)
    groups = [G] + [rest + (1 if i < extra else 0) for i in range(num_frames - 1)]
    return [round(k * n / G) for k in groups]


def forward_flops(model_cfg: Any, budget: TokenBudget, videos: int, num_frames: int,
                  workload: Workload) -> FlopBreakdown:
    """Forward FLOPs of ``videos`` samples (stts_dist.flops) pruned to ``budget``."""
    if budget.prune_ratio <= 0:    # the unpruned baseline runs no scorer
        budget = budget.with_setting("none", 0.0)
    kept_groups = budget.llm_visual_tokens(num_frames)
    frames = [_frames_kept_patches(budget, num_frames)] * videos
    lengths = [kept_groups + workload.text_tokens] * videos
    return model_forward_flops(model_cfg, budget, frames, lengths, kept_groups * videos)


def estimate(cfg: Any, plan: ParallelPlan, cluster: Cluster = Cluster(), workload: Workload = Workload(),
             checkpointing: bool = False, vocab_size: Optional[int] = None) -> Estimate:
    """Parameters, per-GPU memory (pruned as configured and unpruned, with and without activation
    checkpointing) and per-step FLOPs of run config ``cfg`` under ``plan``."""
    m = cfg.model
    vocab = vocab_size or resolved_vocab_size(m)
    params = parameter_counts(m, plan.tensor_parallel, vocab)
    configured = TokenBudget.from_model_config(m)
    budgets = {True: configured, False: configured.with_setting("none", 0.0)}     # pruned? -> budget
    T = int(cfg.data.num_frames)
    tokens = {pruned: micro_batch_tokens(budgets[pruned], T, plan.micro_batch, workload) for pruned in (True, False)}
    est = Estimate(plan, cluster, params, model_state_bytes(params, plan), tokens,
                   checkpointing=checkpointing, prune_ratio=configured.prune_ratio)
    for pruned in (True, False):
        for ckpt in (False, True):
            est.activations[(pruned, ckpt)] = activation_bytes(m, tokens[pruned], vocab, plan.tensor_parallel, ckpt)
        est.flops[pruned] = forward_flops(m, budgets[pruned], int(cfg.train.batch_size), T, workload)
    return est


# --- report -------------------------------------------------------------------------------------

def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:8.3f}B" if n >= 1e9 else f"{n / 1e6:8.1f}M"


def format_report(est: Estimate, cfg: Any) -> str:
    p, cl = est.plan, est.cluster
    m = cfg.model
    tp_, tn = est.tokens[True], est.tokens[False]
    lines = [
        f"run {cfg.name}: {cl.nodes} node(s) x {cl.gpus_per_node} GPUs ({cl.gpu_mem_gb:g} GB) = {cl.world_size} GPUs; "
        f"TP={p.tensor_parallel} x DP={p.data_parallel}; ZeRO-{p.zero_stage}; micro-batch {p.micro_batch} video(s) "
        f"x {tp_.frames // max(p.micro_batch, 1)} frames, {p.grad_accum} per step (global batch {cfg.train.batch_size})",
        "",
        f"{'parameters':<28}{'total':>10}{'per TP rank':>14}",
    ]
    for name, mp in est.params.items():
        lines.append(f"  {name:<26}{_count(mp.total):>10}{_count(mp.per_tp_rank):>14}")
    lines.append(f"  {'total':<26}{_count(sum(x.total for x in est.params.values())):>10}"
                 f"{_count(sum(x.per_tp_rank for x in est.params.values())):>14}")
    lines += ["", f"tokens per micro-batch{'':<14}{'pruned ' + format(est.prune_ratio, 'g'):>14}{'no pruning':>14}"]
    for label, attr in (("ViT before prune point", "vit_full"), ("ViT after prune point", "vit_kept"),
                        ("LLM visual tokens", "kept_groups"), ("LLM sequence (packed)", "llm_tokens")):
        lines.append(f"  {label:<34}{getattr(tp_, attr):>14,}{getattr(tn, attr):>14,}")
    ckpt_name = "with" if est.checkpointing else "without"
    lines += ["", f"per-GPU memory, GB ({ckpt_name} activation checkpointing){'':<2}{'pruned':>10}{'no pruning':>12}"]
    for name, b in est.model_state.items():
        lines.append(f"  {name:<44}{_gb(b):>10}{_gb(b):>12}")
    act_p, act_n = est.activations[(True, est.checkpointing)], est.activations[(False, est.checkpointing)]
    for name in act_p:
        lines.append(f"  activations: {name:<31}{_gb(act_p[name]):>10}{_gb(act_n[name]):>12}")
    lines.append(f"  {'overhead (CUDA context, NCCL, fragmentation)':<44}{_gb(cl.overhead_gb * GB):>10}"
                 f"{_gb(cl.overhead_gb * GB):>12}")
    lines.append(f"  {'total':<44}{_gb(est.total_bytes(True)):>10}{_gb(est.total_bytes(False)):>12}")
    other = not est.checkpointing
    lines.append(f"  activations {'with' if other else 'without'} checkpointing instead: "
                 f"{est.activation_total(True, other) / GB:.2f} GB pruned, {est.activation_total(False, other) / GB:.2f} GB "
                 f"unpruned (totals {est.total_bytes(True, other) / GB:.2f} / {est.total_bytes(False, other) / GB:.2f} GB)")
    v, l = m.vit, m.llm
    kv = l.kv_heads * (l.hidden // l.heads)
    lines += ["", "activation bytes per token per layer (bf16, memory-efficient attention, TP=t):",
              f"  ViT block  2*(4W + (4W + 2M)/t)          = {vit_block_activation_bytes(v.width, v.mlp_dim, p.tensor_parallel):,.0f}"
              f"  (W={v.width}, M={v.mlp_dim})",
              f"  LLM layer  2*(8h + (2h + 2kv + 4f)/t)    = "
              f"{llm_layer_activation_bytes(l.hidden, l.heads, l.kv_heads, l.ffn, p.tensor_parallel):,.0f}"
              f"  (h={l.hidden}, kv={kv}, f={l.ffn})",
              f"  with activation checkpointing: 2W = {checkpointed_layer_bytes(v.width):,.0f} (ViT), "
              f"2h = {checkpointed_layer_bytes(l.hidden):,.0f} (LLM), + one layer recomputed at a time"]
    fp, fn = est.flops[True], est.flops[False]
    lines += ["", f"FLOPs per optimizer step (global batch {cfg.train.batch_size}; train = "
                  f"{'4' if est.checkpointing else '3'} x forward){'':<2}{'pruned':>12}{'no pruning':>12}"]
    for part in ("vit_before", "vit_after", "scorer", "connector", "llm"):
        lines.append(f"  forward {part:<40}{getattr(fp, part):>12.3e}{getattr(fn, part):>12.3e}")
    tp_flops, tn_flops = est.train_flops_per_step(True), est.train_flops_per_step(False)
    lines.append(f"  {'train total':<48}{tp_flops:>12.3e}{tn_flops:>12.3e}")
    lines.append(f"  {'train per GPU':<48}{tp_flops / cl.world_size:>12.3e}{tn_flops / cl.world_size:>12.3e}")
    lines.append(f"  FLOP-ideal speed-up from pruning: {tn_flops / tp_flops:.2f}x")
    return "\n".join(lines)


def over_budget_message(est: Estimate) -> str:
    need = est.total_bytes(pruned=True) / GB
    return (f"estimated {need:.1f} GB per GPU exceeds --gpu-mem-gb {est.cluster.gpu_mem_gb:g} (micro-batch "
            f"{est.plan.micro_batch} videos); raise parallel.grad_accum_steps or use more --nodes (smaller "
            "micro-batch), raise parallel.tensor_parallel, lower train.batch_size or data.num_frames, or pass "
            "--activation-checkpointing if the trainer uses it")
