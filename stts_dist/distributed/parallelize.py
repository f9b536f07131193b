"""Apply megatron-core tensor parallelism to a built ``VideoVLM`` (the model code has none).

Declared here, applied in place: every attention/MLP projection of the LLM and of the ViT becomes
a column- or row-parallel layer holding this rank's slice of the SAME full weights the plain model
was initialised with (so any TP degree starts from identical numbers); the token embedding becomes
vocab-parallel and the LM head vocab-parallel too (tied heads share the table). The scorer, the
connector, norms and position embeddings are small and stay replicated, as in Megatron-LM's ViT.

Attention modules derive their head counts from the projection widths, so column-split q/k/v
projections give the local heads without touching the model code.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from stts_dist.distributed import tp_layers
from stts_dist.model.llm import LlamaLM
from stts_dist.model.vlm import VideoVLM

# (module attribute, kind) per block type
_VIT_PLAN = [("attn.q_proj", "col"), ("attn.k_proj", "col"), ("attn.v_proj", "col"), ("attn.out_proj", "row"),
             ("mlp.fc1", "col"), ("mlp.fc2", "row")]
_LLM_PLAN = [("self_attn.q_proj", "col"), ("self_attn.k_proj", "col"), ("self_attn.v_proj", "col"),
             ("self_attn.o_proj", "row"), ("mlp.gate_proj", "col"), ("mlp.up_proj", "col"), ("mlp.down_proj", "row")]


def _swap(root: nn.Module, path: str, kind: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    linear = getattr(parent, name)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{path} is {type(linear).__name__}, expected nn.Linear")
    new = (tp_layers.ColumnParallelLinear.from_linear(linear) if kind == "col"
           else tp_layers.RowParallelLinear.from_linear(linear, input_is_parallel=True))
    setattr(parent, name, new)


def _parallelize_llm(llm: LlamaLM) -> None:
    for layer in llm.layers:
        for path, kind in _LLM_PLAN:
            _swap(layer, path, kind)
    emb = tp_layers.VocabParallelEmbedding.from_embedding(llm.embed_tokens)
    llm.embed_tokens = emb
    if llm.tie_embeddings:
        llm.lm_head = tp_layers.TiedVocabParallelHead(emb)
    else:
        head = llm.lm_head
        padded = emb.padded_vocab_size
        full = torch.zeros(padded, head.in_features, dtype=head.weight.dtype)
        full[:head.out_features] = head.weight.detach()
        new = tp_layers.ColumnParallelLinear(head.in_features, padded, bias=False, dtype=head.weight.dtype)
        new.load_full_(full)
        llm.lm_head = new
    real = llm.real_vocab

    def cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return tp_layers.vocab_parallel_lm_loss(logits_local.float(), labels, vocab_size=real)

    def gather_logits(local: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp
        return mtp.gather_from_tensor_model_parallel_region(local)

    llm.cross_entropy = cross_entropy
    llm.gather_logits = gather_logits


def _reduce_key_bias_grad_over_tp(attn: nn.Module) -> None:
    """The STTS key bias is replicated on every TP rank but each rank adds it to its OWN heads
    only, so its gradient (the LM loss's path to the scorer) is partial per rank. Route it
    through megatron's copy region: identity forward, all-reduce over TP in backward."""
    forward = attn.forward

    def forward_with_tp_key_bias(x, plan=None, key_bias=None):
        if key_bias is not None:
            from megatron.core import tensor_parallel as mtp
            key_bias = mtp.copy_to_tensor_model_parallel_region(key_bias)
        return forward(x, plan, key_bias)

    attn.forward = forward_with_tp_key_bias


def parallelize_vlm(model: VideoVLM) -> VideoVLM:
    """In place; requires ``initialize_parallel`` first. Also correct (and a no-op numerically)
    at TP=1, so every distributed run uses the same code path."""
    for block in model.vit.blocks:
        for path, kind in _VIT_PLAN:
            _swap(block, path, kind)
        _reduce_key_bias_grad_over_tp(block.attn)
    _parallelize_llm(model.llm)
    return model


def full_state_dict(model: VideoVLM) -> dict[str, torch.Tensor]:
    """The model's parameters as the plain (TP=1) model names and shapes, gathered over the TP
    group. Call on every TP rank (it all-gathers); parameters must be materialised (outside
    ZeRO-3, or inside ``deepspeed.zero.GatheredParameters``)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (tp_layers.ColumnParallelLinear, tp_layers.RowParallelLinear)):
            out[prefix + "weight"] = module.full_weight()
            if module.bias is not None:
                out[prefix + "bias"] = module.full_bias() if isinstance(module, tp_layers.ColumnParallelLinear) else module.bias.detach().clone()
        elif isinstance(module, tp_layers.VocabParallelEmbedding):
            out[prefix + "weight"] = module.full_weight()
        elif isinstance(module, tp_layers.TiedVocabParallelHead):
            continue
        else:
            for pname, p in module.named_parameters(recurse=False):
                out[prefix + pname] = p.detach().clone()
    llm = model.llm
    real = llm.real_vocab
    out["llm.embed_tokens.weight"] = out["llm.embed_tokens.weight"][:real]
    if llm.tie_embeddings:
        out["llm.lm_head.weight"] = out["llm.embed_tokens.weight"]
    elif "llm.lm_head.weight" in out:
        out["llm.lm_head.weight"] = out["llm.lm_head.weight"][:real]
    return out
