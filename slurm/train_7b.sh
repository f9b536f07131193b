#!/usr/bin/env bash
# 7B-class STTS training (jobs/train_7b.yaml) on 4 nodes x 8 GPUs of 80 GB: TP=4 inside a node,
# DP=8 across, ZeRO-3. Sized with:  python tools/estimate_memory.py --config jobs/train_7b.yaml --nodes 4
#
#   mkdir -p logs && sbatch slurm/train_7b.sh              # from the repository root
#   CONFIG=jobs/train_7b.yaml OVERRIDES="train.steps=100" NPROC_PER_NODE=8 sbatch slurm/train_7b.sh
#   sbatch --nodes=8 slurm/train_7b.sh                     # more nodes: keep train.batch_size divisible by DP
#
# The job requeues itself on preemption / time limit after writing a checkpoint and resumes from it;
# everything else (rendezvous, signals, environment) is in slurm/train.sh, see docs/launch.md.
#
#SBATCH --job-name=stts-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

CONFIG=${CONFIG:-jobs/train_7b.yaml}
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$REPO_DIR/slurm/train.sh" ]]; then
    echo "[slurm/train_7b.sh] error: $REPO_DIR/slurm/train.sh not found: run sbatch from the repository root or set REPO_DIR" >&2
    exit 2
fi
# Sourced, not executed: the signal trap must live in this batch shell, which Slurm signals.
source "$REPO_DIR/slurm/train.sh"
