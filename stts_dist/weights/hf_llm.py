"""Hugging Face Llama / Qwen2 / SmolLM2 checkpoints <-> :class:`stts_dist.model.llm.LlamaLM`.

A Hugging Face folder (``config.json`` + ``*.safetensors``, sharded or not) maps one to one onto
our LLM: the parameter names are the HF names without the ``model.`` prefix, RoPE uses the same
rotate-half convention, grouped-query attention and Qwen2's q/k/v biases are native, and a tied
LM head is the embedding table. Under tensor parallelism every rank reads only its own rows or
columns of each matrix (sliced safetensors reads), and the vocabulary table is padded with zero
rows to a TP multiple.

Vocabulary: the model may have MORE rows than the checkpoint (our special tokens ``<video>``,
``<frame>``... appended by :class:`stts_dist.hf_tokenizer.HFTokenizer`); the new rows are
set to the mean of the pretrained rows (a neutral start that does not shift the output
distribution). Fewer rows is an error. Export writes the model's rows, so a model whose
vocabulary equals the checkpoint's round-trips bit for bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from stts_dist.model.llm import LlamaLM
from stts_dist.weights.folder import SafetensorsFolder, WeightsError, write_folder
from stts_dist.weights.placement import FolderTensor, RowsExtended, gather_parameter, load_parameter

SUPPORTED_TYPES = ("llama", "qwen2")
# Buffers some exporters include; they are recomputed, never learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HINT = " (set model.llm.* from the checkpoint: `python tools/import_weights.py config LLM_DIR` prints them)"


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def llm_config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Our ``model.llm`` fields (stts_dist/config.py LLMConfig) from a HF ``config.json``; raises
    :class:`WeightsError` for architectures our LLM cannot represent exactly."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise WeightsError(f"{where}: model_type '{mt}' is not supported; supported: {SUPPORTED_TYPES} "
                           f"(Llama, SmolLM/SmolLM2, Qwen2/Qwen2.5)")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    problems = []
    if head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}")
    scaling = cfg.get("rope_scaling") or {}
    rope_type = (cfg.get("rope_parameters") or {}).get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        problems.append(f"RoPE scaling '{rope_type}' (only plain RoPE is implemented)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')} (SwiGLU with silu only)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if mt == "llama" and cfg.get("attention_bias"):
        problems.append("attention_bias=true (a bias on o_proj; only q/k/v biases as in Qwen2 are supported)")
    if mt == "qwen2" and cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    if problems:
        raise WeightsError(f"{where}: this checkpoint cannot be represented by stts_dist's LLM: " + "; ".join(problems))
    return {
        "vocab_size": int(cfg["vocab_size"]), "hidden": hidden, "layers": int(cfg["num_hidden_layers"]),
        "heads": heads, "kv_heads": kv, "ffn": int(cfg["intermediate_size"]), "rope_theta": _rope_theta(cfg),
        "rms_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)), "qkv_bias": mt == "qwen2",
    }


def llm_overrides(path: str | Path) -> list[str]:
    """``model.llm.*=value`` overrides that build an LLM of the checkpoint's shape."""
    fields = llm_config_from_hf(SafetensorsFolder(path).config, str(Path(path) / "config.json"))
    return [f"model.llm.{k}={v}" for k, v in fields.items()]


def hf_names(layers: int, qkv_bias: bool, tie: bool) -> dict[str, str]:
    """Our LlamaLM parameter name -> HF tensor name, in the HF file order."""
    out = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(layers):
        p = f"layers.{i}."
        names = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
        if qkv_bias:
            names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        for n in names:
            out[p + n] = "model." + p + n
    out["norm.weight"] = "model.norm.weight"
    if not tie:
        out["lm_head.weight"] = "lm_head.weight"
    return out


def _model_fields(llm: LlamaLM) -> dict[str, Any]:
    attn = llm.layers[0].self_attn
    return {"hidden": llm.hidden, "layers": len(llm.layers), "heads": llm.heads,
            "kv_heads": attn.k_proj.out_features // attn.head_dim,
            "ffn": llm.layers[0].mlp.gate_proj.out_features, "rope_theta": float(llm.rope_theta),
            "rms_eps": float(llm.norm.eps), "tie_embeddings": bool(llm.tie_embeddings),
            "qkv_bias": attn.q_proj.bias is not None}


def check_llm_matches(llm: LlamaLM, fields: dict[str, Any], where: str) -> None:
    """Raise naming every ``model.llm`` key whose value differs from the checkpoint's."""
    have = _model_fields(llm)
    bad = [f"model.llm.{k}={have[k]} but the checkpoint has {fields[k]}" for k in have
           if (abs(have[k] - fields[k]) > 1e-12 * abs(fields[k]) if isinstance(fields[k], float) else have[k] != fields[k])]
    if bad:
        raise WeightsError(f"{where}: the LLM built from the config does not match the checkpoint: "
                           + "; ".join(bad) + _HINT)


def _mean_row(folder: SafetensorsFolder, name: str, chunk: int = 8192) -> torch.Tensor:
    """Mean of a (rows, dim) table in float64, read in chunks (no full fp32 copy of a big table)."""
    rows = folder.shape(name)[0]
    total = torch.zeros(folder.shape(name)[1], dtype=torch.float64)
    for s in range(0, rows, chunk):
        total += folder.read(name, 0, s, min(rows, s + chunk)).double().sum(0)
    return (total / rows).float()


def load_hf_llm(llm: LlamaLM, path: str | Path) -> dict[str, Any]:
    """Load a HF Llama/Qwen2 folder into ``llm`` (plain or tensor-parallel, before ZeRO-3).

    Returns ``{"tensors": n, "new_vocab_rows": k, "config": fields}``. Raises
    :class:`WeightsError` naming the tensor for a missing, unexpected or mis-shaped tensor and
    the config key for an architecture mismatch."""
    folder = SafetensorsFolder(path)
    where = str(folder.path)
    fields = llm_config_from_hf(folder.config, where + "/config.json")
    check_llm_matches(llm, fields, where)
    names = hf_names(fields["layers"], fields["qkv_bias"], fields["tie_embeddings"])
    expected = set(names.values())
    missing = [n for n in names.values() if n not in folder]
    unexpected = [n for n in folder.names if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not (fields["tie_embeddings"] and n == "lm_head.weight")]
    if missing or unexpected:
        parts = ([f"missing tensor(s): {', '.join(missing[:4])}" + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")]
                 if missing else [])
        parts += ([f"unexpected tensor(s): {', '.join(unexpected[:4])}"
                   + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else "")] if unexpected else [])
        raise WeightsError(f"{where} does not hold a {folder.config.get('model_type')} LLM of the configured shape: "
                           + "; ".join(parts))
    ckpt_vocab = folder.shape("model.embed_tokens.weight")[0]
    real = llm.real_vocab
    if real < ckpt_vocab:
        raise WeightsError(f"{where}: the checkpoint has {ckpt_vocab} vocabulary rows but the model only {real}; "
                           f"set model.llm.vocab_size={ckpt_vocab} (or 0 with a tokenizer at least that large)")
    for ours, theirs in names.items():
        source = FolderTensor(folder, theirs)
        if ours in ("embed_tokens.weight", "lm_head.weight") and real > ckpt_vocab:
            source = RowsExtended(source, real, _mean_row(folder, theirs))
        load_parameter(llm, ours, source, theirs, _HINT, real_rows=real if ours == "lm_head.weight" else None)
    folder.close()
    return {"tensors": len(names), "new_vocab_rows": real - ckpt_vocab, "config": fields}


def hf_config_for(llm: LlamaLM, base: Optional[dict[str, Any]] = None, dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """The ``config.json`` for exporting ``llm``: ``base`` (the imported checkpoint's) with the
    vocabulary updated, or a fresh Llama (Qwen2 when q/k/v have biases) config."""
    f = _model_fields(llm)
    if base is not None:
        cfg = dict(base)
        check_llm_matches(llm, llm_config_from_hf(cfg), "export config")
        cfg["vocab_size"] = llm.real_vocab
        return cfg
    model_type = "qwen2" if f["qkv_bias"] else "llama"
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[
        dtype or llm.embed_tokens.weight.dtype]
    return {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type, "vocab_size": llm.real_vocab, "hidden_size": f["hidden"],
        "intermediate_size": f["ffn"], "num_hidden_layers": f["layers"], "num_attention_heads": f["heads"],
        "num_key_value_heads": f["kv_heads"], "head_dim": llm.head_dim, "hidden_act": "silu",
        "rms_norm_eps": f["rms_eps"], "rope_theta": f["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": f["rope_theta"]},
        "tie_word_embeddings": f["tie_embeddings"], "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": 32768, "torch_dtype": name, "dtype": name,
    }


def export_hf_llm(llm: LlamaLM, out_dir: str | Path, config: Optional[dict[str, Any]] = None,
                  dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 1024 ** 3,
                  extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write ``llm`` as a HF folder (``config.json`` + safetensors, sharded above
    ``max_shard_bytes``). ``config``: the imported checkpoint's ``config.json`` (round trip) or
    None for a fresh one. ``dtype``: tensor dtype on disk; default the config's ``torch_dtype`` /
    ``dtype``, else the model's. Under tensor parallelism call on EVERY rank (the shards are
    gathered); only global rank 0 writes."""
    cfg = hf_config_for(llm, config, dtype)
    if dtype is None:
        dtype = _DTYPE_NAMES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), llm.embed_tokens.weight.dtype)
    f = _model_fields(llm)
    tensors = {}
    for ours, theirs in hf_names(f["layers"], f["qkv_bias"], f["tie_embeddings"]).items():
        full = gather_parameter(llm, ours, real_rows=llm.real_vocab if ours == "lm_head.weight" else None)
        tensors[theirs] = full.to(dtype).contiguous()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return Path(out_dir)
    return write_folder(out_dir, tensors, cfg, max_shard_bytes, extra_files)
