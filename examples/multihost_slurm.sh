#!/usr/bin/env bash
# One task per node, all GPUs of a node per task; jax.distributed.initialize reads SLURM's variables.
#   sbatch examples/multihost_slurm.sh /shared/models/Qwen3-235B-A22B
#SBATCH --job-name=moejax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
set -euo pipefail
MODEL=${1:?model directory}
# 2 nodes x 8 GPUs: 8-way tensor parallelism inside a node, experts split over the 2 nodes' 16 GPUs.
srun moejax generate "$MODEL" --tp 8 --ep 2 --prompt "Explain mixture-of-experts routing." --max-tokens 128
