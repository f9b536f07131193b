#!/usr/bin/env bash
# Slurm training job: one srun task per node runs torchrun, which starts NPROC_PER_NODE ranks of
# `python -m stts_dist.train --config $CONFIG $OVERRIDES`. Shared body of slurm/train_7b.sh (which
# sources it); also submittable on its own with the resources on the command line:
#
#   mkdir -p logs    # Slurm does not create the --output folder
#   CONFIG=jobs/tiny_dist.yaml sbatch --nodes=1 --cpus-per-task=2 slurm/train.sh
#
# Environment (all optional; sbatch passes the submitting shell's environment on):
#   CONFIG          run config, relative to the repository (default jobs/default.yaml)
#   OVERRIDES       "key=value key=value" appended to the command line (they win over CONFIG)
#   NPROC_PER_NODE  ranks per node (default: GPUs of the node; CPUs of the allocation without GPUs)
#   PYTHON          interpreter (default: .venv/bin/python of the repository, else python3)
#   REPO_DIR        repository root (default: the directory sbatch was called from)
#   MASTER_PORT     rendezvous port on the first node (default 20000 + job id % 10000)
#   CKPT_GRACE_S    seconds torchrun lets the ranks write their checkpoint after SIGUSR1/SIGTERM
#                   before it kills them (default 240; keep it below the --signal lead time)
#   TRAIN_ENTRYPOINT  what torchrun runs (default "-m stts_dist.train"; tests use a stand-in)
#
# Preemption / time limit: Slurm sends SIGUSR1 to this script 300 s before the end (--signal=
# B:USR1@300). The trap forwards it to srun, srun to torchrun on every node (it is in torchrun's
# --signals-to-handle), torchrun to its ranks; the trainer saves a checkpoint and exits 143. The
# script then requeues the job, which resumes from <train.out_dir>/checkpoints/latest.
#
#SBATCH --job-name=stts-train
#SBATCH --ntasks-per-node=1
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

log() { echo "[slurm/train.sh $(date +%H:%M:%S)] $*"; }
die() { echo "[slurm/train.sh] error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "no SLURM_JOB_ID: submit this script with sbatch (see docs/launch.md)"

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f "$REPO_DIR/stts_dist/train/cli.py" ]] \
    || die "REPO_DIR=$REPO_DIR is not the stts-dist repository: run sbatch from the repository root or set REPO_DIR"
cd "$REPO_DIR"
mkdir -p logs

CONFIG=${CONFIG:-jobs/default.yaml}
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG does not exist (relative to $REPO_DIR)"
OVERRIDES=${OVERRIDES:-}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
CKPT_GRACE_S=${CKPT_GRACE_S:-240}
read -r -a ENTRYPOINT <<< "${TRAIN_ENTRYPOINT:--m stts_dist.train}"
read -r -a USER_OVERRIDES <<< "$OVERRIDES"

# --- ranks and backend: one rank per GPU with NCCL; gloo and one rank per allocated CPU without GPUs.
# Decided on the first node; the nodes of one job are assumed alike.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    BACKEND=nccl
    DEFAULT_NPROC=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
else
    BACKEND=gloo
    DEFAULT_NPROC=${SLURM_CPUS_ON_NODE:-1}
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$DEFAULT_NPROC}
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE must be a positive integer"

# --- threads and communication. NCCL_SOCKET_IFNAME / NCCL_IB_HCA are site-specific: export them
# before sbatch if the defaults pick the wrong network.
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank raises, not hangs
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP: keep comm/compute order
export PYTHONUNBUFFERED=1
export STTS_LAUNCHER=slurm   # the trainer records how it was launched (MLflow tag launch_method)

# --- rendezvous (c10d) on the first node of the allocation. Its NodeAddr is what the other nodes
# can reach (the host name on most clusters, an IP on some).
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}
# Below Linux's ephemeral range (32768+), so outgoing connections never hold it.
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
NNODES=${SLURM_NNODES:-1}

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC_PER_NODE rank(s), backend $BACKEND," \
    "rendezvous $HEAD_ADDR:$MASTER_PORT, config $CONFIG ${OVERRIDES:+($OVERRIDES)}"

# --- signals: forward to srun (which forwards to every node's torchrun); remember preemption.
PREEMPTED=0
SRUN_PID=""
forward() {
    local sig=$1
    [[ $sig == USR1 ]] && PREEMPTED=1
    log "received SIG$sig: forwarding it to the ranks (they write a checkpoint and exit)"
    [[ -n "$SRUN_PID" ]] && kill -s "$sig" "$SRUN_PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

SRUN_ARGS=(--ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

srun "${SRUN_ARGS[@]}" \
    "$PYTHON" -m torch.distributed.run \
        --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
        --max-restarts=0 \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$CKPT_GRACE_S" \
        "${ENTRYPOINT[@]}" --config "$CONFIG" "parallel.backend=$BACKEND" "${USER_OVERRIDES[@]}" &
SRUN_PID=$!

# `wait` returns early when a trapped signal arrives: wait again until srun has really ended, then
# once more for its exit status (bash keeps it).
while true; do
    wait "$SRUN_PID" || true
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
RC=0
wait "$SRUN_PID" || RC=$?

if (( PREEMPTED )) && (( RC != 0 )); then
    log "ranks stopped after SIGUSR1 (exit $RC); requeueing job $SLURM_JOB_ID to resume from the latest checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed: resubmit the job by hand; it resumes from the latest checkpoint"
fi
log "training exited with code $RC"
exit "$RC"
