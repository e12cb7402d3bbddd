#!/usr/bin/env bash
# Qwen3-235B-A22B (its FP8 checkpoint) on 2 nodes x 4 GPUs of 48 GB: tensor parallelism inside a node, one
# pipeline stage a node (47 layers each), as `moejax plan Qwen/Qwen3-235B-A22B --tp 4 --pp 2 --gpu-memory 48`
# plans it (29.6 GB of weights a GPU). Devices are numbered pipeline-outermost, so each stage is one node's GPUs
# and only the stage hand-offs cross the network.
#   sbatch examples/multihost_slurm_pipeline.sh /shared/models/Qwen3-235B-A22B-FP8
#SBATCH --job-name=moejax-pp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=01:00:00
set -euo pipefail
MODEL=${1:?model directory}
srun moejax generate "$MODEL" --tp 4 --pp 2 --max-model-len 4096 --prompt "Explain pipeline parallelism." \
    --max-tokens 128
