#!/usr/bin/env bash
# Two processes on one machine (or two machines: set COORDINATOR to process 0's host:port on both) run one model
# with its experts split across all their devices. Only process 0 prints.
#   bash examples/multihost_local.sh MODEL_DIR [EP]
set -euo pipefail
MODEL=${1:?model directory}
EP=${2:-8}
COORDINATOR=${COORDINATOR:-127.0.0.1:12355}
NUM_PROCESSES=${NUM_PROCESSES:-2}
# On a CPU-only machine, give each process 4 virtual devices.
if [ "${JAX_PLATFORMS:-}" = "cpu" ]; then export XLA_FLAGS=--xla_force_host_platform_device_count=4; fi
pids=()
for ((rank = 0; rank < NUM_PROCESSES; rank++)); do
  MOEJAX_COORDINATOR_ADDRESS=$COORDINATOR MOEJAX_NUM_PROCESSES=$NUM_PROCESSES MOEJAX_PROCESS_ID=$rank \
    moejax generate "$MODEL" --ep "$EP" --prompt "def fibonacci(n):" --temperature 0 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
