"""Typed run configuration (OmegaConf structured configs).

A run is one YAML file under ``jobs/`` merged onto these dataclasses, plus dotted command-line
overrides (``train.steps=100 model.stts.prune_ratio=0.8``). Unknown keys and wrong types are
errors that name the key and the closest valid key; semantic checks (ratios, divisibility)
happen in :func:`validate`. No resolver is registered and no value is ever evaluated as code.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from stts_dist.balance.planner import METHODS as BALANCE_METHODS
from stts_dist.data.digits import DIGIT_STYLES, FOLLOW_UPS, TASKS
from stts_dist.stts.budget import METHODS as PRUNE_METHODS

ATTENTION_BACKENDS = ("auto", "bucketed", "padded", "block_diag", "flash_varlen")


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the key and the fix."""


@dataclass
class ViTConfig:
    image_size: int = 64          # square frames, pixels
    patch_size: int = 8
    width: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 512
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    gelu: str = "tanh"            # tanh (SigLIP) | exact (DINOv2)
    # how a ViT trained here starts its (learned) position embedding: "normal" (std 0.02, the
    # SigLIP/ViT recipe) or "sincos" (2-D sin-cos of the patch row and column at the scale of a
    # patch embedding, MAE's recipe). Imported weights replace it either way. A small ViT whose
    # pre-training objective does not need positions keeps 0.02 and its tokens cannot say where
    # they are (docs/stts.md row 18)
    pos_embed_init: str = "normal"


@dataclass
class ConnectorConfig:
    pool_size: int = 3            # g: one LLM token per g x g patch group
    pool_heads: int = 4
    # ViT layers whose outputs are concatenated (negative = from the end, -1 = last block).
    layers: list[int] = field(default_factory=lambda: [-1])
    # add a sinusoidal code of each visual token's frame index (within its video) to the token,
    # so the LLM reads when a kept token was seen (no parameters: any number of frames)
    frame_time_encoding: bool = False
    # add a 2-D sinusoidal code of each visual token's group row and column in its frame, so the
    # LLM reads where a kept token sits however many of its frame's tokens were pruned
    group_position_encoding: bool = False


@dataclass
class LLMConfig:
    vocab_size: int = 0           # 0: taken from the tokenizer
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 704
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_seq_len: int = 8192


@dataclass
class STTSConfig:
    method: str = "scorer"        # none | random | uniform | temporal_diff | scorer
    prune_ratio: float = 0.5      # fraction of a video's groups PRUNED (the paper's `topk`)
    prune_at: int = 1             # score after this ViT block; bias in prune_at+1; drop after it
    scorer_hidden: int = 256
    scorer_heads: int = 4
    scorer_init_std: float = 0.02  # truncated-normal std of the scorer's weights (reference: 0.02)
    scorer_pool_dim: int = 0       # >0: pool groups at this width (cheaper); 0: at the ViT width
    aux_loss_weight: float = 0.5  # lambda of the temporal novelty loss
    detach_aux_target: bool = False
    # features the temporal novelty (the scorer's target and temporal_diff) is measured on:
    # "block" = output of block prune_at (the reference); "embed" = the patch embeddings, before
    # any attention has mixed the frame (local by construction; see docs/stts.md)
    novelty_from: str = "block"
    key_bias: bool = True         # log-score key bias in block prune_at+1 (LM-gradient path)
    key_bias_floor: float = -2.0  # scores rescaled per frame to [exp(floor), 1]
    frame_separators: bool = True   # a <frame> token before each frame's kept tokens (docs/stts.md)
    attention_backend: str = "auto"
    # Adaptive ratio per video: each batch's pruning budget is shared out by content (pixel
    # novelty of each clip, measured when the batch is built: static clips pruned more, busy ones
    # less), the batch total equal to the fixed ratio's. Counts are still known before the ViT.
    adaptive: bool = False
    adaptive_strength: float = 1.0


STAGE0_OBJECTIVES = ("frame", "dense")   # stts_dist/train/vit_pretrain.py


@dataclass
class PretrainedConfig:
    """Hugging Face folders to start from ("" = random init); the scorer is always new."""
    llm_path: str = ""
    vit_path: str = ""
    tokenizer_path: str = ""      # "" = llm_path's tokenizer when llm_path is set, else the task's words
    allow_activation_mismatch: bool = False
    # stage 0 (digits data only): > 0 and no vit_path -> pre-train the ViT to read digits for this
    # many steps first, cached under data.work_dir (stts_dist/train/stage0.py)
    digits_vit_steps: int = 0
    digits_vit_batch_size: int = 32
    digits_vit_lr: float = 5e-4
    # "frame": name the digit of one-digit frames; "dense": name the digit under every patch of
    # frames of 1..digits_vit_max_digits digits (one label per token; docs/stts.md, row 9)
    digits_vit_objective: str = "frame"
    digits_vit_max_digits: int = 1


@dataclass
class ModelConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    stts: STTSConfig = field(default_factory=STTSConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)


# Where a run's data comes from (stts_dist.train.sources prepares it, stts_dist.samples reads it): the digits task generated in
# memory or written as mp4 + sharded, a user's JSONL manifest (sharded first), a shard folder.
SOURCES = ("digits", "digits_mp4", "manifest", "shards")
DIGITS_SOURCES = ("digits", "digits_mp4")


@dataclass
class DataConfig:
    # digits: generated in memory | digits_mp4: the same written as mp4 + manifest, sharded with
    # Ray, read by the WebDataset loader | manifest: your JSONL manifest (sharded first) | shards
    source: str = "digits"
    path: str = ""                # shard folder or manifest.jsonl for source=shards|manifest
    work_dir: str = "data"        # where generated videos and shards are written
    fps: float = 0.0              # frame sampling when sharding videos; 0 = every native frame
    shard_cpus: int = 0           # CPUs of the local Ray sharding job; 0 = all
    num_frames: int = 8
    min_frames: int = 0           # digits sources, >0: clips of a seeded length in [min_frames, num_frames]
    train_samples: int = 4000
    eval_samples: int = 256
    # the trainer's held-out data for source=manifest|shards: a manifest (.jsonl, same format as
    # the training one) or a shard folder. Empty: no accuracy evaluation (the digits eval split is
    # not your data). The digits sources evaluate on their own held-out split.
    eval_path: str = ""
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: ["count", "last", "direction", "corner"])
    digit_style: str = "mnist"    # digits tasks: mnist (handwritten) | printed (a font, quicker to learn)
    # digits tasks whose training clips are also asked their mirror question as a second turn
    # (last: which digit appears first; direction: which moves right; corner: which ends bottom
    # right); held-out clips are asked one question. Empty: none
    follow_up_questions: list[str] = field(default_factory=list)
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 50
    scorer_lr: float = 1e-3
    scorer_warmup_steps: int = 100
    grad_clip: float = 1.0
    llm_lr: float = 0.0           # per-component learning rates; 0 = optim.lr
    vit_lr: float = 0.0
    connector_lr: float = 0.0
    freeze: list[str] = field(default_factory=list)   # parameter-name prefixes not trained, e.g. [vit]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    log_every: int = 10
    # console verbosity: quiet (progress bar, evaluations, checkpoints, the end) | info (+ a step
    # line every log_every steps) | debug (+ every step). Every step's metrics always go to
    # <out_dir>/train_log.jsonl.
    log_level: str = "info"
    eval_every: int = 0           # 0: evaluate at the end only
    save_every: int = 0           # 0: save at the end only
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    dtype: str = "auto"           # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    resume: bool = True
    progress_bar: bool = True     # rank 0, on a terminal (never drawn into a log file)
    eval_prune_ratios: list[float] = field(default_factory=lambda: [0.0, 0.5])
    # also evaluated at every ratio > 0 above, next to model.stts.method (e.g. [random]: the
    # accuracy and object recall of random selection at the same budget)
    eval_methods: list[str] = field(default_factory=list)
    # CPU ranks: glibc keeps large freed blocks for the next step instead of unmapping them
    # (stts_dist/host_allocator.py; without it every step page-faults its big tensors afresh)
    keep_freed_host_memory: bool = True


@dataclass
class ParallelConfig:
    # "auto": DeepSpeed when launched with WORLD_SIZE > 1 (torchrun/srun/Ray), else single-process.
    engine: str = "auto"          # auto | local | deepspeed
    tensor_parallel: int = 1      # megatron-core TP degree; data parallel = world / TP
    zero_stage: int = 3           # DeepSpeed ZeRO stage 1 | 2 | 3
    backend: str = "auto"         # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 60           # collective timeout: a dead rank cannot hang the others longer
    grad_accum_steps: int = 1
    stage3_param_persistence_threshold: int = 10000


@dataclass
class TrackingConfig:
    """``cfg.tracking``: where and how often to record the run (MLflow)."""
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlruns.db"   # or http(s)://host:port of an `mlflow server`
    # Artifact folder for experiments created on a local store. Ignored for an http(s) server
    # unless it is a URI (s3://...): the server then stores artifacts itself.
    artifact_location: str = "mlartifacts"
    experiment: str = "stts-dist"
    run_name: str = ""                           # "" -> cfg.name
    log_every: int = 10                          # log step metrics every N steps (and the last)
    visualize_every: int = 0                     # log a kept-token picture every N steps (0 = off)
    # MLflow's own system metrics (system/cpu_utilization_percentage, memory, GPU where present),
    # sampled every N seconds by mlflow.system_metrics; 0 = off
    system_metrics_every_s: float = 10.0


@dataclass
class FaultConfig:
    """Deliberate faults for drills and tests (never set in real runs)."""
    fail_at_step: int = -1        # raise at this step ...
    fail_rank: int = -1           # ... on this global rank (-1: every rank)


@dataclass
class BalanceConfig:
    """``cfg.balance``: pruning-aware token balancing across data-parallel ranks (docs/balancing.md).

    Every rank plans each step from index metadata alone and runs one micro-batch (one packed
    sequence) per step; samples that do not fit a budget are deferred to the next step."""
    # null (auto): on when the run's clips vary in length and there are >= 2 data-parallel ranks
    # (stts_dist/train/sources.py::resolve_balancing says which and why at start); true / false force it
    enabled: Optional[bool] = None
    method: str = "kk"                  # kk | lpt | naive (naive: sample i -> rank i mod DP)
    max_llm_tokens_per_micro: int = 0   # LLM tokens of one rank's packed sequence; 0 = unbounded
    max_vit_frames_per_micro: int = 0   # frames one rank's ViT runs per step; 0 = unbounded
    window: int = 0                     # new candidate samples per step; 0 = train.batch_size


@dataclass
class RunConfig:
    name: str = ""                 # "" -> derived from the data and the method (derived_run_name)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


# ---------------------------------------------------------------------------------------------

def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_valid_keys(node[k], full + "."))
    return keys


def _closest(key: str, schema: DictConfig) -> str:
    candidates = _valid_keys(schema)
    leaf = key.split(".")[-1]
    best = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not best:
        best = [c for c in candidates if c.split(".")[-1] in difflib.get_close_matches(
            leaf, [x.split(".")[-1] for x in candidates], n=1, cutoff=0.6)]
    return best[0] if best else "(none close; see stts_dist/config.py)"


def wrap_config_error(exc: OmegaConfBaseException, schema: DictConfig, where: str) -> ConfigError:
    """An OmegaConf merge error as a ConfigError naming the key (and the closest valid key)."""
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        return ConfigError(f"{where}: unknown config key '{key}'. Did you mean '{_closest(key, schema)}'?")
    if isinstance(exc, ValidationError):
        expected = ""
        try:
            expected = f" (expected {type(OmegaConf.select(schema, key)).__name__})"
        except Exception:
            pass
        return ConfigError(f"{where}: wrong type for config key '{key}'{expected}: {str(exc.msg).splitlines()[0]}")
    return ConfigError(f"{where}: {exc}")


_INTERPOLATION_START = re.compile(r"(\\*)\$\{")


def _literal(text: str) -> str:
    """OmegaConf's spelling of the literal ``text``: every ``${`` escaped (backslashes before it
    doubled), so reading the value gives ``text`` back and nothing is resolved."""
    return _INTERPOLATION_START.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)


def _has_interpolation(text: str) -> bool:
    """An unescaped ``${`` (preceded by an even number of backslashes) starts an interpolation."""
    return any(len(m.group(1)) % 2 == 0 for m in _INTERPOLATION_START.finditer(text))


def keep_values_literal(node: Any, where: str, prefix: str = "") -> None:
    """Config values are data, never resolved: an interpolation such as ``${oc.env:HOME}`` in a
    string field is kept as that text (so no resolver -- environment reads included -- ever runs,
    and a bad one cannot fail later); in a typed field it is a wrong type; ``???`` is an error."""
    from omegaconf import AnyNode, ListConfig, StringNode

    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    for k in keys:
        child = node._get_node(k)
        name = f"{prefix}{k}" if isinstance(node, DictConfig) else f"{prefix.rstrip('.')}[{k}]"
        raw = child._value()
        if raw == "???":
            raise ConfigError(f"{where}: config key '{name}' has no value ('???'); set it")
        if isinstance(raw, str) and "${" in raw:  # OmegaConf treats escaped ones as interpolations too
            if not isinstance(child, (StringNode, AnyNode)):
                raise ConfigError(f"{where}: wrong type for config key '{name}': '{raw}' is an interpolation; config "
                                  "values are never resolved, so write the value itself")
            if _has_interpolation(raw):
                node[k] = _literal(raw)
        elif isinstance(child, (DictConfig, ListConfig)) and raw is not None:
            keep_values_literal(child, where, name + ".")


def load_structured(schema_cls: type, path: Optional[str | Path] = None,
                    overrides: Optional[list[str]] = None, upgrade: Optional[Callable[[Any], None]] = None) -> Any:
    """YAML ``path`` merged onto the structured ``schema_cls``, then dotted ``key=value``
    overrides. Unknown keys and wrong types raise ConfigError naming the key (and the closest
    valid one). ``upgrade`` rewrites the loaded YAML in place first (keys whose type changed).
    Shared by every typed config of the project (runs, sharding jobs, loaders)."""
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    if path is not None and str(path):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}. Pass an existing YAML file, e.g. jobs/default.yaml")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # yaml syntax
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if upgrade is not None:
            upgrade(loaded)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise wrap_config_error(e, schema, str(p)) from e
        keep_values_literal(cfg, str(p))
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key=value, e.g. train.steps=100")
        key, value = ov.split("=", 1)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as e:
            raise wrap_config_error(e, schema, f"override '{ov}'") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{ov}': the value is not valid YAML ({str(e).splitlines()[0]})") from e
        keep_values_literal(cfg, f"override '{ov}'")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """A run: ``path`` (YAML under jobs/) onto :class:`RunConfig`, overrides, then :func:`validate`.
    Returns a typed OmegaConf object that behaves like a ``RunConfig``."""
    cfg = load_structured(RunConfig, path, overrides, upgrade_run_yaml)
    validate(cfg)
    if not cfg.name:
        cfg.name = derived_run_name(cfg)
    return cfg  # type: ignore[return-value]


def upgrade_run_yaml(loaded: Any) -> None:
    """Run files (and checkpoints' ``config.yaml``) written by an older version: a boolean
    ``data.follow_up_questions`` (true: every task's follow-up) is now the list of tasks."""
    if not OmegaConf.is_dict(loaded):
        return
    # read unresolved: an interpolation here is for load_structured to report as a ConfigError
    data = OmegaConf.to_container(loaded, resolve=False).get("data")
    if isinstance(data, dict) and isinstance(data.get("follow_up_questions"), bool):
        tasks = data.get("tasks")
        tasks = tasks if isinstance(tasks, list) and tasks else DataConfig().tasks
        loaded.data.follow_up_questions = [t for t in FOLLOW_UPS if t in tasks] if data["follow_up_questions"] else []


def model_config_changes(saved_yaml: str | Path, cfg: Any, limit: int = 5) -> list[str]:
    """``model.*`` keys whose value in the run file a checkpoint was saved with (``saved_yaml``,
    read unresolved) differs from ``cfg``'s, as ``"key: saved -> now"`` (at most ``limit``): a run
    resumed into the same ``train.out_dir`` continues the saved model whatever the new file says."""
    saved = {k: v for k, v in flatten(OmegaConf.load(saved_yaml)).items() if k.startswith("model.")}
    now = {k: v for k, v in flatten(cfg, resolve=True).items() if k.startswith("model.")}
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]][:limit]


def derived_run_name(cfg: Any) -> str:
    """``<data>-<method>``: e.g. ``digits-stts50``, ``shapes-train-unpruned``, ``clips-random80``.
    The data part is ``digits`` for the built-in task, else the manifest's or shard folder's name
    (with its folder when the file name alone says little, like ``train.jsonl``)."""
    d, s = cfg.data, cfg.model.stts
    if d.source in DIGITS_SOURCES:
        data = "digits"
    else:
        p = Path(str(d.path).rstrip("/"))
        data = p.stem if p.suffix not in (".jsonl", ".json") or p.stem not in GENERIC_MANIFEST_NAMES \
            else f"{p.parent.name}-{p.stem}"
    method = "unpruned" if s.method == "none" or s.prune_ratio == 0 else \
        f"{'stts' if s.method == 'scorer' else s.method}{round(100 * s.prune_ratio)}"
    return f"{data}-{method}"


GENERIC_MANIFEST_NAMES = ("manifest", "train", "training", "data", "videos", "index")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Any) -> None:
    """Semantic checks that types alone cannot express, one section at a time; the first failing
    check raises :class:`ConfigError` naming the key and the fix."""
    _validate_model(cfg.model)
    _validate_data(cfg.data, cfg.model)
    _validate_train(cfg.train)
    _validate_parallel(cfg.parallel, cfg.model)
    _validate_balance(cfg.balance, cfg)
    _validate_tracking(cfg.tracking)


def _validate_model(m: Any) -> None:
    s = m.stts
    for key, n in (("model.vit.image_size", m.vit.image_size), ("model.vit.patch_size", m.vit.patch_size),
                   ("model.vit.heads", m.vit.heads), ("model.llm.heads", m.llm.heads),
                   ("model.llm.kv_heads", m.llm.kv_heads), ("model.connector.pool_heads", m.connector.pool_heads)):
        _check(n >= 1, f"{key}={n} must be >= 1")
    _check(s.method in PRUNE_METHODS,
           f"model.stts.method='{s.method}' is not one of {PRUNE_METHODS}")
    _check(0.0 <= s.prune_ratio < 1.0,
           f"model.stts.prune_ratio={s.prune_ratio} must be in [0, 1) (it is the fraction pruned)")
    _check(s.attention_backend in ATTENTION_BACKENDS,
           f"model.stts.attention_backend='{s.attention_backend}' is not one of {ATTENTION_BACKENDS}")
    _check(0 <= s.prune_at < m.vit.depth - 1,
           f"model.stts.prune_at={s.prune_at} must be in [0, model.vit.depth-2={m.vit.depth - 2}]: "
           "the scorer needs one block after it for the key bias")
    _check(m.vit.image_size % m.vit.patch_size == 0,
           f"model.vit.image_size={m.vit.image_size} must be divisible by model.vit.patch_size={m.vit.patch_size}")
    _check(m.vit.gelu in ("tanh", "exact"), f"model.vit.gelu='{m.vit.gelu}' must be tanh or exact")
    _check(m.vit.width % m.vit.heads == 0, f"model.vit.width={m.vit.width} must be divisible by model.vit.heads={m.vit.heads}")
    _check(m.vit.pos_embed_init in ("normal", "sincos"),
           f"model.vit.pos_embed_init='{m.vit.pos_embed_init}' must be normal or sincos")
    _check(m.vit.pos_embed_init != "sincos" or m.vit.width % 4 == 0,
           f"model.vit.pos_embed_init=sincos needs model.vit.width divisible by 4 (a sine and a cosine for the row "
           f"and for the column), got {m.vit.width}; use pos_embed_init=normal or a width like {m.vit.width // 4 * 4 + 4}")
    _check(m.llm.hidden % m.llm.heads == 0, f"model.llm.hidden={m.llm.hidden} must be divisible by model.llm.heads={m.llm.heads}")
    _check(m.llm.heads % m.llm.kv_heads == 0, f"model.llm.heads={m.llm.heads} must be divisible by model.llm.kv_heads={m.llm.kv_heads}")
    _check((m.llm.hidden // m.llm.heads) % 2 == 0, "model.llm head dim (hidden/heads) must be even for RoPE")
    _check((s.scorer_pool_dim or m.vit.width) % s.scorer_heads == 0,
           f"the scorer's pooling width ({s.scorer_pool_dim or m.vit.width}) must be divisible by "
           f"model.stts.scorer_heads={s.scorer_heads}")
    _check(m.vit.width % m.connector.pool_heads == 0,
           f"model.vit.width={m.vit.width} must be divisible by model.connector.pool_heads={m.connector.pool_heads}")
    for layer in m.connector.layers:
        _check(-m.vit.depth <= layer < m.vit.depth,
               f"model.connector.layers entry {layer} is outside the ViT's {m.vit.depth} blocks")
    _check(m.connector.pool_size >= 1, "model.connector.pool_size must be >= 1")
    _check(s.novelty_from in ("block", "embed"), f"model.stts.novelty_from='{s.novelty_from}' must be block or embed")


def _validate_data(d: Any, m: Any) -> None:
    s = m.stts
    _check(d.source in SOURCES, f"data.source='{d.source}' must be one of {SOURCES}")
    _check(d.source in DIGITS_SOURCES or bool(d.path),
           f"data.source={d.source} needs data.path (a shard folder or a manifest .jsonl)")
    _check(d.num_frames >= 1, "data.num_frames must be >= 1")
    if d.eval_path:
        _check(d.source not in DIGITS_SOURCES,
               f"data.eval_path is for your own data (data.source=manifest|shards); data.source={d.source} "
               "evaluates on the digits task's own held-out split: drop data.eval_path")
        _check(Path(d.eval_path).exists(), f"data.eval_path={d.eval_path} does not exist; point it at a held-out "
               "manifest (.jsonl, like the training one) or a shard folder")
    if d.source in DIGITS_SOURCES:     # (a manifest's follow-up questions are its entries' "turns")
        no_mirror = [t for t in d.follow_up_questions if t not in FOLLOW_UPS or t not in d.tasks]
        _check(not no_mirror, f"data.follow_up_questions={list(d.follow_up_questions)}: {no_mirror} "
               f"{'is' if len(no_mirror) == 1 else 'are'} not among data.tasks={list(d.tasks)} with a follow-up "
               f"question; choose from {[t for t in FOLLOW_UPS if t in d.tasks]}")
        unknown = [t for t in d.tasks if t not in TASKS]
        _check(bool(d.tasks) and not unknown, f"data.tasks={list(d.tasks)}: unknown {unknown or 'empty list'}; "
               f"the moving-digits tasks are {list(TASKS)}")
        _check(d.digit_style in DIGIT_STYLES, f"data.digit_style='{d.digit_style}' must be one of {DIGIT_STYLES}")
        pre = m.pretrained
        _check(pre.digits_vit_objective in STAGE0_OBJECTIVES,
               f"model.pretrained.digits_vit_objective='{pre.digits_vit_objective}' must be one of {STAGE0_OBJECTIVES}")
        _check(1 <= pre.digits_vit_max_digits <= 3 and (pre.digits_vit_objective == "dense"
                                                         or pre.digits_vit_max_digits == 1),
               f"model.pretrained.digits_vit_max_digits={pre.digits_vit_max_digits}: 1 for the 'frame' objective "
               "(one digit named per frame), 1-3 for 'dense'")
    _check(d.min_frames <= d.num_frames,
           f"data.min_frames={d.min_frames} must be <= data.num_frames={d.num_frames}: lower it too "
           f"(data.min_frames=0 makes every generated clip data.num_frames long)")
    # Every video must be able to keep its whole first frame: int(G*r*T) <= G*(T-1).
    if s.method != "none" and s.prune_ratio > 0 and d.num_frames > 1:
        T = max(d.min_frames, 2) if d.min_frames else d.num_frames
        _check(s.prune_ratio <= (T - 1) / T,
               f"model.stts.prune_ratio={s.prune_ratio} cannot be met with {T}-frame videos while keeping "
               f"the first frame whole; use prune_ratio <= {(T - 1) / T:.3f} or more frames (data.num_frames)")


def _validate_train(t: Any) -> None:
    _check(t.batch_size >= 1, "train.batch_size must be >= 1")
    _check(t.steps >= 0, "train.steps must be >= 0")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device='{t.device}' must be auto, cpu or cuda")
    _check(t.log_level in ("quiet", "info", "debug"), f"train.log_level='{t.log_level}' must be quiet, info or debug")
    _check(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype='{t.dtype}' must be auto, fp32 or bf16")
    for r in t.eval_prune_ratios:
        _check(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r < 1.0,
               f"train.eval_prune_ratios entry {r} must be a number in [0, 1)")
    bad = [m for m in t.eval_methods if m not in PRUNE_METHODS]
    _check(not bad, f"train.eval_methods entries {bad} are not pruning methods; choose from {list(PRUNE_METHODS)}")


def _validate_parallel(par: Any, m: Any) -> None:
    _check(par.engine in ("auto", "local", "deepspeed"), f"parallel.engine='{par.engine}' must be auto, local or deepspeed")
    _check(par.tensor_parallel >= 1, "parallel.tensor_parallel must be >= 1")
    _check(par.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    _check(par.backend in ("auto", "nccl", "gloo"), f"parallel.backend='{par.backend}' must be auto, nccl or gloo")
    _check(par.timeout_s > 0, "parallel.timeout_s must be > 0")
    _check(par.grad_accum_steps >= 1, "parallel.grad_accum_steps must be >= 1")
    tp = par.tensor_parallel
    for what, n in (("model.llm.heads", m.llm.heads), ("model.llm.kv_heads", m.llm.kv_heads),
                    ("model.vit.heads", m.vit.heads), ("model.llm.ffn", m.llm.ffn), ("model.vit.mlp_dim", m.vit.mlp_dim)):
        _check(n % tp == 0, f"{what}={n} must be divisible by parallel.tensor_parallel={tp}")


def _validate_balance(b: Any, cfg: Any) -> None:
    s, d, par = cfg.model.stts, cfg.data, cfg.parallel
    _check(b.method in BALANCE_METHODS, f"balance.method='{b.method}' must be one of {BALANCE_METHODS}")
    for key in ("max_llm_tokens_per_micro", "max_vit_frames_per_micro", "window"):
        _check(getattr(b, key) >= 0, f"balance.{key}={getattr(b, key)} must be >= 0 (0 = "
               + ("train.batch_size)" if key == "window" else "unbounded)"))
    if b.enabled:
        _check(not s.adaptive, "balance.enabled=true plans with the fixed per-video budget int(G*r*T); "
               "model.stts.adaptive=true shares each batch's budget by content after the plan -- use one of them")
        _check(par.grad_accum_steps == 1, f"balance.enabled=true runs one micro-batch per rank per step; "
               f"parallel.grad_accum_steps={par.grad_accum_steps} must be 1 (raise balance.window instead)")
        _check(b.max_vit_frames_per_micro == 0 or b.max_vit_frames_per_micro >= d.num_frames,
               f"balance.max_vit_frames_per_micro={b.max_vit_frames_per_micro} is below data.num_frames="
               f"{d.num_frames}: the longest video would never fit; raise it to >= {d.num_frames} or use 0")


def _validate_tracking(tr: Any) -> None:
    _check(tr.log_every >= 1, f"tracking.log_every={tr.log_every} must be >= 1")
    if tr.enabled:
        _check(bool(str(tr.tracking_uri).strip()), "tracking.tracking_uri is empty; use e.g. sqlite:///mlruns.db "
               "or http://127.0.0.1:5000, or set tracking.enabled=false")
        _check(bool(str(tr.experiment).strip()), "tracking.experiment is empty; name the MLflow experiment")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def config_hash(cfg: Any) -> str:
    """Stable hash of the resolved config (checkpoint manifests record it)."""
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=False), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(cfg: Any, resolve: bool = False) -> dict[str, Any]:
    """``{"model.vit.width": 128, ...}`` for experiment trackers (``resolve``: interpolations
    replaced by their values)."""
    out: dict[str, Any] = {}

    def rec(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                rec(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    rec(OmegaConf.to_container(cfg, resolve=resolve), "")
    return out
