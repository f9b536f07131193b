#!/usr/bin/env bash
# The GPU measurements in one go (a few minutes on an H100/H200): bf16, pruned vs unpruned
# train-step and prefill throughput, peak memory, at T and 2T frames, with flash-attention varlen
# when the flash_attn package is present (else SDPA per frame bucket).
#   device tool:  run(command="bash tools/gpu_check.sh", carry=[".whl"])
# Writes $OUT/gpu_check.log (or ./gpu_check.log) and prints the JSON lines to record in
# docs/benchmarks.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu_check.log"
python3 -c "import flash_attn" 2>/dev/null && echo "flash_attn present: varlen kernel" | tee -a "$out/gpu_check.log" \
  || echo "flash_attn absent: bucketed SDPA" | tee -a "$out/gpu_check.log"
export PYTHONUNBUFFERED=1
# paper-like proportions at GPU scale: a ViT-B-class tower at 224 px, 32 frames, 1B-class LLM
python3 tools/bench_stts.py --device cuda --repeats 5 --config jobs/bench_cpu.yaml \
  model.vit.image_size=224 model.vit.patch_size=14 model.vit.width=768 model.vit.depth=12 model.vit.heads=12 \
  model.vit.mlp_dim=3072 model.connector.pool_size=2 model.llm.hidden=2048 model.llm.layers=16 model.llm.heads=16 \
  model.llm.kv_heads=8 model.llm.ffn=5632 model.stts.prune_at=1 data.num_frames=32 train.batch_size=4 \
  2>&1 | tee -a "$out/gpu_check.log" | tail -3
