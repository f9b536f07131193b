"""Pretrained weights: Hugging Face LLM and vision-tower folders in and out of our model.

- :mod:`.folder`: read/write HF folders (config.json + safetensors, sharded or not), sliced reads
- :mod:`.placement`: copy full tensors into plain or tensor-parallel parameters (this rank's slice)
- :mod:`.hf_llm`: Llama / Qwen2 / SmolLM2 <-> ``LlamaLM`` (import and bit-exact export)
- :mod:`.hf_vit`: SigLIP / SigLIP2 / DINOv2 -> ``VideoViT``
- :mod:`.gguf_import`, :mod:`.onnx_dinov2`: the small real models shipped by pip packages -> HF folders
- (the pretrained tokenizer lives in :mod:`stts_dist.hf_tokenizer`, below this package)
- :mod:`.finetune`: ``load_pretrained`` and per-component optimizer groups

See docs/weights.md.
"""
from stts_dist.weights.folder import SafetensorsFolder, WeightsError

__all__ = ["SafetensorsFolder", "WeightsError"]
