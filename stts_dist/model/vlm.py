"""The video VLM: ViT (with STTS inside) -> connector on kept groups -> LLM.

Only the kept groups' tokens enter the LLM ("unified" pruning: the ViT and LLM pruning are one
decision); each video contributes exactly ``G*T - int(G*r*T)`` of them, which is the number of
placeholders the prompt reserved. The model prunes to the :class:`TokenBudget` the batch was built
for (``VideoBatch.budget``): the prompt and the selection read the same object, so there is no
second ratio to reconcile. ``model.budget`` is the budget of the model's own config, the one
training uses and evaluation / inference derive their settings from.

Every forward calls the ViT, the scorer (method ``scorer``), the connector and the LLM exactly
once, also for a batch without any video (a zero-weight dummy frame), so ZeRO-3 sees the same
module call sequence on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from stts_dist.data.batch import VideoBatch
from stts_dist.ops.attention import VarlenPlan
from stts_dist.ops.position_encoding import group_position_encoding
from stts_dist.ops.time_encoding import frame_time_encoding
from stts_dist.model.connector import Connector
from stts_dist.model.llm import LlamaLM
from stts_dist.model.vit import VideoViT
from stts_dist.stts.budget import TokenBudget, group_grid
from stts_dist.stts.layout import FrameLayout
from stts_dist.model.pruned_vit import PruneSettings, ViTResult, run_vit_with_stts
from stts_dist.stts.scorer import TokenScorer


class VisualTokenMismatch(ValueError):
    """The prompt reserved a different number of visual placeholders than the ViT produced."""


class VLMOutput(dict):
    """``loss`` (:meth:`training_loss` at scale 1), ``lm_loss`` (mean CE over answer tokens),
    ``aux_loss`` (temporal novelty loss, 0 unless method scorer) -- all scalar tensors with graph
    -- and ``metrics`` (floats). A dict, so DeepSpeed ZeRO-3 finds the output tensors and hooks
    their backward; the ViT details and the aux weight ride along as attributes (not items)."""

    def __init__(self, lm_loss: torch.Tensor, aux_loss: torch.Tensor, aux_weight: float,
                 metrics: Optional[dict] = None, vit: Optional[ViTResult] = None):
        self.aux_weight = aux_weight
        super().__init__(loss=self.training_loss(lm_loss, aux_loss), lm_loss=lm_loss, aux_loss=aux_loss,
                         metrics=metrics or {})
        self.vit = vit

    def training_loss(self, lm_loss, aux_loss, lm_scale: float = 1.0):
        """The one place the objective is composed: ``lm_scale * lm_loss + aux_weight * aux_loss``.
        ``lm_scale`` rescales a rank's local LM mean to its share of the global batch's answer
        tokens (the distributed module's normalisation); 1 in one process. Call with this
        output's own ``lm_loss`` / ``aux_loss`` tensors, or floats (reduced values, for logging)."""
        return lm_loss * lm_scale + self.aux_weight * aux_loss

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class VideoVLM(nn.Module):
    def __init__(self, cfg, vocab_size: int):
        """cfg: ``ModelConfig`` (see stts_dist/config.py)."""
        super().__init__()
        v, c, l, s = cfg.vit, cfg.connector, cfg.llm, cfg.stts
        self.cfg = cfg
        self.vit = VideoViT(v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim, v.in_channels, v.layer_norm_eps, v.gelu,
                           v.pos_embed_init)
        self.scorer = TokenScorer(v.width, s.scorer_hidden, s.scorer_heads, c.pool_size, s.scorer_init_std,
                                  s.scorer_pool_dim)
        self.connector_layers = [i % v.depth for i in c.layers]
        self.connector = Connector(v.width, len(self.connector_layers), c.pool_size, c.pool_heads, l.hidden)
        vocab = l.vocab_size or vocab_size
        self.llm = LlamaLM(vocab, l.hidden, l.layers, l.heads, l.kv_heads, l.ffn, l.rope_theta, l.rms_eps,
                           l.tie_embeddings, l.qkv_bias)
        self.budget = TokenBudget.from_model_config(cfg)
        self.video_token_id: Optional[int] = None
        self.frame_token_id: Optional[int] = None
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("scorer"):
                continue  # the scorer has its own (truncated-normal) init
            if isinstance(m, nn.Linear):
                # 1/sqrt(fan_in) keeps activations O(1) at any width (0.02 at width ~2500); a
                # fixed 0.02 makes small models' visual tokens nearly identical at init.
                nn.init.trunc_normal_(m.weight, std=m.in_features ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def set_special_tokens(self, video_id: int, frame_id: int) -> None:
        self.video_token_id, self.frame_token_id = video_id, frame_id

    def prune_settings(self, budget: TokenBudget) -> PruneSettings:
        """How the ViT prunes to ``budget``: its method and counts plus this model's STTS knobs."""
        s = self.cfg.stts
        return PruneSettings(budget, s.prune_at, self.cfg.connector.pool_size, s.key_bias, s.key_bias_floor,
                             s.detach_aux_target, s.attention_backend, s.novelty_from)

    # ------------------------------------------------------------------------------------------
    def encode_visual(self, frames: torch.Tensor, layout: FrameLayout, settings: PruneSettings,
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, ViTResult, bool]:
        """-> (visual tokens (K, hidden) in (frame, group) order, ViTResult, is_dummy)."""
        dummy = layout.num_frames == 0
        if dummy:
            v = self.cfg.vit
            frames = torch.zeros(1, v.in_channels, v.image_size, v.image_size, device=frames.device, dtype=frames.dtype)
            layout = FrameLayout([1], [False])
        res = run_vit_with_stts(self.vit, self.scorer, frames, layout, settings, self.connector_layers, generator)
        tokens = self.connector(res.features, self.vit.grid, res.keep)
        if self.cfg.connector.frame_time_encoding:     # each kept token's frame, within its video
            frame_index = layout.frame_in_video(tokens.device).repeat_interleave(res.keep.sum(1))
            tokens = tokens + frame_time_encoding(frame_index, tokens.shape[1]).to(tokens.dtype)
        if self.cfg.connector.group_position_encoding:     # each kept token's row and column in its frame
            groups_per_row = group_grid(self.vit.grid, self.vit.grid, self.cfg.connector.pool_size)[1]
            code = group_position_encoding(res.keep.nonzero()[:, 1], groups_per_row, tokens.shape[1])
            tokens = tokens + code.to(tokens.dtype)
        return tokens, res, dummy

    def embed_prompt(self, batch: VideoBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """batch.input_ids (L,) -> (embeddings (L, hidden), the ``<frame>`` separator's embedding
        (1, hidden) or None when the batch's prompts have no separators). ONE call of the embedding
        module whatever the batch holds: under ZeRO-3 every rank must call the same modules the
        same number of times, and a rank with a text-only batch needs no separator."""
        input_ids = batch.input_ids
        if not batch.budget.frame_separators:
            return self.llm.embed_tokens(input_ids), None
        sep_id = torch.tensor([self.frame_token_id], device=input_ids.device, dtype=input_ids.dtype)
        both = self.llm.embed_tokens(torch.cat([input_ids, sep_id]))
        return both[:-1], both[-1:]

    def merge_visual(self, batch: VideoBatch, embeds: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor,
                     sep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Place visual tokens (and per-frame separators, ``sep`` from :meth:`embed_prompt`) at the
        ``<video>`` placeholders."""
        pos = (batch.input_ids == self.video_token_id).nonzero(as_tuple=True)[0]
        per_frame = keep.sum(1)
        if batch.budget.frame_separators:
            if sep is None:
                raise ValueError("frame separators are on: pass the separator embedding from embed_prompt()")
            pieces = []
            for chunk in torch.split(visual, per_frame.tolist()):
                pieces += [sep, chunk]
            visual = torch.cat(pieces) if pieces else visual
        if visual.shape[0] != pos.numel():
            produced = self._per_sample_counts(batch, per_frame)
            reserved = self._reserved_per_sample(batch)
            bad = [(i, r, p) for i, (r, p) in enumerate(zip(reserved, produced)) if r != p]
            detail = ", ".join(f"sample {batch.ids[i] if i < len(batch.ids) else i}: {r} placeholders vs {p} tokens"
                               for i, r, p in bad[:5])
            raise VisualTokenMismatch(
                f"the prompt reserves {pos.numel()} visual placeholders but the ViT kept {visual.shape[0]} tokens "
                f"({detail}). Build batches with SequenceBuilder, which reserves the budget's count per "
                f"video, G*T - int(G*r*T) (plus T separators), and do not edit their prompts.")
        return embeds.index_put((pos,), visual.to(embeds.dtype))

    def _per_sample_counts(self, batch: VideoBatch, per_frame: torch.Tensor) -> list[int]:
        layout = batch.layout
        return [int(per_frame[s:s + n].sum()) + batch.budget.separator_tokens(n)
                for s, n in zip(layout.starts, layout.lengths)]

    def _reserved_per_sample(self, batch: VideoBatch) -> list[int]:
        out, start = [], 0
        for n in batch.seq_lengths:
            out.append(int((batch.input_ids[start:start + n] == self.video_token_id).sum()))
            start += n
        return out

    def forward(self, batch: VideoBatch, generator: Optional[torch.Generator] = None,
                aux_weight: Optional[float] = None) -> VLMOutput:
        """Prunes to ``batch.budget`` (method and counts); ``generator`` seeds method ``random``."""
        if self.video_token_id is None:
            raise RuntimeError("call model.set_special_tokens(tokenizer.video_id, tokenizer.frame_id) first")
        settings = self.prune_settings(batch.budget)
        visual, res, dummy = self.encode_visual(batch.frames, batch.layout, settings, generator)
        embeds, sep = self.embed_prompt(batch)
        if dummy:
            # keep the graph identical on every rank: the dummy frame contributes exactly zero
            embeds = embeds + visual.sum() * 0.0 + (0.0 if sep is None else sep.sum() * 0.0)
        else:
            embeds = self.merge_visual(batch, embeds, visual, res.keep, sep)
        plan = VarlenPlan.build(batch.seq_lengths, embeds.device, causal=True, backend=settings.attention_backend)
        hidden = self.llm.forward_hidden(embeds, batch.positions, plan)
        lm_loss = self.llm.loss(hidden, batch.labels)
        # the novelty loss exists (and is weighted) only when the scorer selects; 0 otherwise
        w = (self.cfg.stts.aux_loss_weight if aux_weight is None else aux_weight) if batch.budget.method == "scorer" else 0.0
        n = max(batch.size, 1)
        metrics = {
            "vit_tokens_before": 0 if dummy else res.tokens_before / n,
            "vit_tokens_after": 0 if dummy else res.tokens_after / n,
            "llm_visual_tokens": 0 if dummy else int(res.keep.sum()) / n,
            "llm_tokens": sum(batch.seq_lengths) / n,
        }
        return VLMOutput(lm_loss, res.aux_loss, w, metrics, res)


def build_model(cfg, tokenizer) -> VideoVLM:
    model = VideoVLM(cfg, tokenizer.vocab_size)
    model.set_special_tokens(tokenizer.video_id, tokenizer.frame_id)
    return model
