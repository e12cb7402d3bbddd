#!/usr/bin/env bash
# DeepSeek-V3 (its FP8 checkpoint) on 2 nodes x 8 GPUs of 80 GB with DP attention: each of the 16 expert ranks
# holds 16 of the 256 routed experts of every layer and its own requests' MLA latents (one copy per request,
# not one per rank as tensor parallelism would keep); MoE tokens move between ranks with all-to-all. As
# `moejax plan deepseek-v3 --ep 16 --enable-dp-attention --gpu-memory 80 --max-model-len 4096` plans it.
#   sbatch examples/multihost_slurm_dp_attention.sh /shared/models/DeepSeek-V3
#SBATCH --job-name=moejax-dpa
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
set -euo pipefail
MODEL=${1:?model directory}
srun moejax generate "$MODEL" --ep 16 --enable-dp-attention --max-model-len 4096 \
    --prompt "Explain expert parallelism." --max-tokens 128
