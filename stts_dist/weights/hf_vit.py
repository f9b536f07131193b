"""Hugging Face SigLIP / SigLIP2 vision towers and DINOv2 -> :class:`stts_dist.model.vit.VideoViT`.

What maps exactly (our ViT computes the same patch features as the HF model's encoder layers):

- patch embedding: a Conv2d (SigLIP, DINOv2) or SigLIP2's Linear over ``(p, p, C)``-ordered
  patches, reshaped to the same Conv2d;
- the image normalisation of the checkpoint (``preprocessor_config.json``'s image_mean/std, else
  the family's default: SigLIP 0.5/0.5, DINOv2 ImageNet) is FOLDED into the patch embedding:
  our frames are in [-1, 1], so ``x_model = a_c * x + b_c`` per channel and
  ``W' = W * a_c``, ``bias' = bias + sum W * b_c`` (exact: the convolution has no padding);
- position embeddings: resized to our grid when the resolution differs, the way the HF model
  resizes them (bicubic, align_corners=False, float32 for SigLIP and DINOv2; bilinear with
  antialias for SigLIP2);
- blocks: pre-norm LayerNorm, q/k/v/out projections with biases, fc1/fc2;
- DINOv2's LayerScale is folded into the preceding projection (exact up to float rounding):
  ``ls * (W x + b) = (ls[:, None] * W) x + ls * b`` for ``attention.output.dense`` and ``mlp.fc2``.

What does not map, by design:

- DINOv2's CLS token is DROPPED: STTS prunes and packs per-frame patch tokens and the token
  budget counts patches only, so the ViT holds no extra token. The patches then attend only to
  each other, so features differ from DINOv2-with-CLS (docs/weights.md gives the measured
  difference); fine-tuning adapts. ``mask_token`` is a pre-training artefact and dropped too.
- The final LayerNorm (DINOv2 ``layernorm``, SigLIP ``post_layernorm``) and SigLIP's pooling
  head are dropped: the connector reads raw block outputs (``model.connector.layers``).
- Activation: SigLIP uses tanh-GELU like our ViT; DINOv2 uses exact (erf) GELU. A ViT whose MLPs
  expose ``approximate`` (the ``model.vit.gelu`` option proposed in docs/weights.md) runs it
  exactly; otherwise loading DINOv2 raises unless ``allow_activation_mismatch=True`` (then
  features differ by ~1e-3 relative).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stts_dist.model.vit import VideoViT
from stts_dist.weights.folder import SafetensorsFolder, WeightsError
from stts_dist.weights.placement import MemoryTensor, load_parameter

SIGLIP_TYPES = ("siglip", "siglip_vision_model")
SIGLIP2_TYPES = ("siglip2", "siglip2_vision_model")
DINOV2_TYPES = ("dinov2",)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_ACTS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}
_HINT = " (set model.vit.* from the checkpoint: `python tools/import_weights.py config VIT_DIR` prints them)"


def _family(cfg: dict[str, Any], where: str) -> str:
    mt = cfg.get("model_type")
    if mt in SIGLIP_TYPES:
        return "siglip"
    if mt in SIGLIP2_TYPES:
        return "siglip2"
    if mt in DINOV2_TYPES:
        return "dinov2"
    raise WeightsError(f"{where}: model_type '{mt}' is not a supported vision tower; supported: "
                       f"{SIGLIP_TYPES + SIGLIP2_TYPES + DINOV2_TYPES}")


def _vision_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["vision_config"] if isinstance(cfg.get("vision_config"), dict) else cfg


def vit_config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Our ``model.vit`` fields (ViTConfig) at the checkpoint's native resolution, plus
    ``family``, ``gelu`` ('tanh' | 'none') and ``grid`` (position-embedding grid side)."""
    family = _family(cfg, where)
    v = _vision_config(cfg)
    width, patch = int(v["hidden_size"]), int(v["patch_size"])
    if family == "dinov2":
        if v.get("use_swiglu_ffn"):
            raise WeightsError(f"{where}: DINOv2 with a SwiGLU FFN (giant) is not supported (the ViT MLP is fc1-GELU-fc2)")
        if int(v.get("num_register_tokens", 0) or 0):
            raise WeightsError(f"{where}: DINOv2 with register tokens is not supported")
        mlp = int(width * float(v.get("mlp_ratio", 4)))
        image = int(v.get("image_size", 518))
    else:
        mlp = int(v["intermediate_size"])
        image = int(v.get("image_size") or int(math.isqrt(int(v["num_patches"]))) * patch)
    act = v.get("hidden_act", "gelu" if family == "dinov2" else "gelu_pytorch_tanh")
    if act not in _ACTS:
        raise WeightsError(f"{where}: hidden_act={act} is not a GELU; the ViT MLP is GELU only")
    return {"image_size": image - image % patch, "patch_size": patch, "width": width,
            "depth": int(v["num_hidden_layers"]), "heads": int(v["num_attention_heads"]), "mlp_dim": mlp,
            "in_channels": int(v.get("num_channels", 3)), "layer_norm_eps": float(v.get("layer_norm_eps", 1e-6)),
            "family": family, "gelu": _ACTS[act]}


def vit_overrides(path: str | Path, image_size: int | None = None) -> list[str]:
    """``model.vit.*=value`` overrides for a ViT of the checkpoint's shape (``image_size``: your
    frame size, a multiple of the patch size; default the checkpoint's)."""
    f = vit_config_from_hf(SafetensorsFolder(path).config, str(Path(path) / "config.json"))
    keys = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "in_channels", "layer_norm_eps")
    if image_size is not None:
        f["image_size"] = image_size
    return [f"model.vit.{k}={f[k]}" for k in keys]


def _normalisation(folder: SafetensorsFolder, family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pre = folder.path / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        if "image_mean" in p and "image_std" in p:
            return tuple(map(float, p["image_mean"])), tuple(map(float, p["image_std"]))
    return (IMAGENET_MEAN, IMAGENET_STD) if family == "dinov2" else ((0.5,) * 3, (0.5,) * 3)


def fold_normalisation(weight: torch.Tensor, bias: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch conv ``weight`` (D, C, p, p), ``bias`` (D,) that expect ``(x01 - mean) / std`` ->
    the same conv on frames ``x`` in [-1, 1] (``x01 = (x + 1) / 2``). Computed in float64."""
    w, b = weight.double(), bias.double()
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = 1.0 / (2.0 * s)                 # a_c
    shift = (0.5 - m) / s                   # b_c
    w2 = w * scale[None, :, None, None]
    b2 = b + (w * shift[None, :, None, None]).sum((1, 2, 3))
    return w2.to(weight.dtype), b2.to(bias.dtype)


def resize_pos_embed(pos: torch.Tensor, grid: int, family: str) -> torch.Tensor:
    """pos: (N, D) on a sqrt(N) x sqrt(N) grid -> (grid*grid, D), resized like the HF model does."""
    n, d = pos.shape
    side = math.isqrt(n)
    if side * side != n:
        raise WeightsError(f"position embedding has {n} rows, not a square grid")
    if side == grid:
        return pos
    x = pos.float().reshape(1, side, side, d).permute(0, 3, 1, 2)
    if family == "siglip2":
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    else:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, d).to(pos.dtype)


def _prefix(folder: SafetensorsFolder, suffix: str, where: str) -> str:
    hits = [n[: -len(suffix)] for n in folder.names if n.endswith(suffix) and not n.startswith("text_model")]
    if len(hits) != 1:
        raise WeightsError(f"{where}: expected exactly one tensor named '*{suffix}', found {len(hits)}")
    return hits[0]


def hf_vit_tensors(path: str | Path, grid: int) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, Any]]:
    """Read a HF vision tower and convert it: ``{our VideoViT name: (checkpoint name, tensor)}``
    with full shapes, for a ViT whose patch grid is ``grid`` x ``grid``; and the config fields."""
    folder = SafetensorsFolder(path)
    where = str(folder.path)
    f = vit_config_from_hf(folder.config, where + "/config.json")
    family, width, p = f["family"], f["width"], f["patch_size"]
    t: dict[str, tuple[str, torch.Tensor]] = {}

    def get(name: str) -> torch.Tensor:
        if name not in folder:
            raise WeightsError(f"{where}: tensor '{name}' is missing (expected in a {family} checkpoint)")
        return folder.read(name)

    if family == "dinov2":
        pre = _prefix(folder, "embeddings.patch_embeddings.projection.weight", where)
        pw_name, pb_name = pre + "embeddings.patch_embeddings.projection.weight", pre + "embeddings.patch_embeddings.projection.bias"
        pos_name = pre + "embeddings.position_embeddings"
        pos = get(pos_name)[0, 1:]          # drop the CLS position (see module doc)
        pw, pb = get(pw_name), get(pb_name)
    else:
        pre = _prefix(folder, "embeddings.patch_embedding.weight", where)
        pw_name, pb_name = pre + "embeddings.patch_embedding.weight", pre + "embeddings.patch_embedding.bias"
        pos_name = pre + "embeddings.position_embedding.weight"
        pos = get(pos_name)
        pw, pb = get(pw_name), get(pb_name)
        if family == "siglip2":  # Linear over (p, p, C)-ordered patch pixels -> Conv2d (D, C, p, p)
            c = f["in_channels"]
            if tuple(pw.shape) != (width, p * p * c):
                raise WeightsError(f"tensor '{pw_name}' has shape {tuple(pw.shape)}, expected {(width, p * p * c)}")
            pw = pw.reshape(width, p, p, c).permute(0, 3, 1, 2).contiguous()
    mean, std = _normalisation(folder, family)
    if tuple(pw.shape)[1] != len(mean):
        raise WeightsError(f"{where}: {pw.shape[1]} input channels but image_mean has {len(mean)} entries")
    pw, pb = fold_normalisation(pw, pb, mean, std)
    t["patch_embed.weight"], t["patch_embed.bias"] = (pw_name, pw), (pb_name, pb)
    t["pos_embed"] = (pos_name, resize_pos_embed(pos, grid, family)[None])

    for i in range(f["depth"]):
        ours = f"blocks.{i}."
        if family == "dinov2":
            L = f"{pre}encoder.layer.{i}."
            names = {"norm1": "norm1", "attn.q_proj": "attention.attention.query", "attn.k_proj": "attention.attention.key",
                     "attn.v_proj": "attention.attention.value", "attn.out_proj": "attention.output.dense",
                     "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        else:
            L = f"{pre}encoder.layers.{i}."
            names = {"norm1": "layer_norm1", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                     "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.out_proj",
                     "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for o, h in names.items():
            for kind in ("weight", "bias"):
                t[f"{ours}{o}.{kind}"] = (L + h + "." + kind, get(L + h + "." + kind))
        if family == "dinov2":  # fold LayerScale into the projection that feeds it
            for proj, ls in (("attn.out_proj", "layer_scale1.lambda1"), ("mlp.fc2", "layer_scale2.lambda1")):
                gamma = get(L + ls)
                wn, w = t[f"{ours}{proj}.weight"]
                bn, b = t[f"{ours}{proj}.bias"]
                t[f"{ours}{proj}.weight"] = (wn, w * gamma[:, None])
                t[f"{ours}{proj}.bias"] = (bn, b * gamma)
    folder.close()
    return t, f


def model_activation(vit: VideoViT) -> str:
    """'tanh' or 'none': the GELU our ViT's MLPs compute (tanh unless they expose ``approximate``)."""
    return getattr(vit.blocks[0].mlp, "approximate", "tanh")


def check_vit_matches(vit: VideoViT, f: dict[str, Any], where: str) -> None:
    attn = vit.blocks[0].attn
    have = {"patch_size": vit.patch_size, "width": vit.width, "depth": len(vit.blocks),
            "heads": vit.width // attn.head_dim, "mlp_dim": vit.blocks[0].mlp.fc1.out_features,
            "in_channels": vit.patch_embed.in_channels, "layer_norm_eps": vit.blocks[0].norm1.eps}
    bad = [f"model.vit.{k}={v} but the checkpoint has {f[k]}" for k, v in have.items()
           if (abs(v - f[k]) > 1e-12 if isinstance(v, float) else v != f[k])]
    if bad:
        raise WeightsError(f"{where}: the ViT built from the config does not match the checkpoint: " + "; ".join(bad) + _HINT)


def load_hf_vit(vit: VideoViT, path: str | Path, allow_activation_mismatch: bool = False) -> dict[str, Any]:
    """Load a SigLIP / SigLIP2 / DINOv2 folder into ``vit`` (plain or tensor-parallel, before
    ZeRO-3). Returns ``{"tensors": n, "family": ..., "resized_pos_embed": bool, "config": fields}``."""
    where = str(Path(path))
    f = vit_config_from_hf(SafetensorsFolder(path).config, where + "/config.json")
    check_vit_matches(vit, f, where)
    act = model_activation(vit)
    if act != f["gelu"] and not allow_activation_mismatch:
        raise WeightsError(
            f"{where}: the checkpoint's MLPs use {'exact (erf)' if f['gelu'] == 'none' else 'tanh'} GELU but the "
            f"ViT computes {'tanh' if act == 'tanh' else 'exact'} GELU; set model.vit.gelu="
            f"{'exact' if f['gelu'] == 'none' else 'tanh'} (see docs/weights.md) or pass "
            f"allow_activation_mismatch=True to accept features that differ by ~1e-3")
    tensors, f = hf_vit_tensors(path, vit.grid)
    for ours, (theirs, value) in tensors.items():
        load_parameter(vit, ours, MemoryTensor(value), theirs, _HINT)
    return {"tensors": len(tensors), "family": f["family"], "resized_pos_embed": vit.grid != f["image_size"] // f["patch_size"],
            "config": f}


def export_hf_vit(vit: VideoViT, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``vit`` as a Hugging Face SigLIP vision tower (``siglip_vision_model``: config.json,
    model.safetensors, preprocessor_config.json) that :func:`load_hf_vit` -- and so
    ``model.pretrained.vit_path`` -- loads back exactly. Image mean/std 0.5 is SigLIP's [-1, 1]
    input range, the same as our frames, so the folded normalisation is the identity; the
    position embeddings are stored at this ViT's grid (no resize on load at the same size)."""
    from stts_dist.weights.folder import write_folder

    if model_activation(vit) != "tanh":
        raise WeightsError("export_hf_vit writes SigLIP (tanh GELU); this ViT computes exact GELU")
    attn = vit.blocks[0].attn
    config = {"model_type": "siglip_vision_model", "hidden_size": vit.width,
              "intermediate_size": vit.blocks[0].mlp.fc1.out_features, "num_hidden_layers": len(vit.blocks),
              "num_attention_heads": vit.width // attn.head_dim, "patch_size": vit.patch_size,
              "image_size": vit.grid * vit.patch_size, "num_channels": vit.patch_embed.in_channels,
              "layer_norm_eps": vit.blocks[0].norm1.eps, "hidden_act": "gelu_pytorch_tanh", **(extra_config or {})}
    pre = "vision_model."
    t: dict[str, torch.Tensor] = {
        pre + "embeddings.patch_embedding.weight": vit.patch_embed.weight,
        pre + "embeddings.patch_embedding.bias": vit.patch_embed.bias,
        pre + "embeddings.position_embedding.weight": vit.pos_embed[0],
    }
    names = {"norm1": "layer_norm1", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
             "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.out_proj",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    params = dict(vit.named_parameters())
    for i in range(len(vit.blocks)):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                t[f"{pre}encoder.layers.{i}.{theirs}.{kind}"] = params[f"blocks.{i}.{ours}.{kind}"]
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in t.items()}
    preprocessor = json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_processor_type": "SiglipImageProcessor"})
    return write_folder(out_dir, tensors, config, extra_files={"preprocessor_config.json": preprocessor})
