#!/usr/bin/env bash
# The GPU measurements in one go (a few minutes on an H100/H200): bf16, pruned vs unpruned
# train-step and prefill throughput, peak memory, at T and 2T frames, with flash-attention varlen
# when the flash_attn package is present (else SDPA per frame bucket); then the same pair through
# the whole trainer (tools/bench_train.py: end-to-end step time and its per-phase shares).
#   device tool:  run(command="bash tools/gpu_check.sh", carry=[".whl"])
#   only the trainer pair (about 5 min):  run(command="BENCH_STTS=0 bash tools/gpu_check.sh", carry=[".whl"])
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
if python3 -c "import flash_attn" 2>/dev/null; then
  attn=flash_varlen; echo "flash_attn present: varlen kernel" | tee -a "$out/gpu_check.log"
else
  attn=auto; echo "flash_attn absent: bucketed SDPA" | tee -a "$out/gpu_check.log"
fi
export PYTHONUNBUFFERED=1
# paper-like proportions at GPU scale: a ViT-B-class tower at 224 px, 32 frames, 1B-class LLM
GPU_MODEL="model.vit.image_size=224 model.vit.patch_size=14 model.vit.width=768 model.vit.depth=12 model.vit.heads=12
  model.vit.mlp_dim=3072 model.connector.pool_size=2 model.llm.hidden=2048 model.llm.layers=16 model.llm.heads=16
  model.llm.kv_heads=8 model.llm.ffn=5632 model.stts.prune_at=1 data.num_frames=32 train.batch_size=4"
if [ "${BENCH_STTS:-1}" != 0 ]; then     # BENCH_STTS=0: the trainer pair below alone
  # shellcheck disable=SC2086  # GPU_MODEL: one override per word
  python3 tools/bench_stts.py --device cuda --repeats 5 --config jobs/bench_cpu.yaml $GPU_MODEL \
    2>&1 | tee -a "$out/gpu_check.log" | tail -3
fi
# The whole trainer on the same model (tools/bench_train.py): torchrun -m stts_dist.train on 1 GPU,
# DeepSpeed ZeRO-3, bf16, the digits loader, unpruned vs pruned runs interleaved, per-phase shares.
# BENCH_TRAIN=0 skips it; it needs deepspeed + megatron-core (carry their wheels in .whl if absent).
if [ "${BENCH_TRAIN:-1}" != 0 ]; then
  if python3 -c "import deepspeed, megatron.core" 2>/dev/null; then
    # shellcheck disable=SC2086
    timeout 480 python3 tools/bench_train.py --config jobs/bench_cpu.yaml --nproc 1 --device cuda \
      --steps 5 --warmup 2 --rounds 2 --run-timeout 200 $GPU_MODEL train.dtype=bf16 \
      model.stts.attention_backend=$attn data.source=digits data.num_workers=4 \
      2>&1 | tee -a "$out/gpu_check.log" | tail -4
  else
    echo "bench_train skipped: deepspeed / megatron-core not importable" | tee -a "$out/gpu_check.log"
  fi
fi
