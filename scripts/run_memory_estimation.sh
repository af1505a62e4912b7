#!/usr/bin/env bash
# Estimate per-device peak memory of a config without allocating the model (fake tensors,
# fake process group of NGPU x NNODES ranks, rank 0's view).
#   NGPU        devices per node (default 8)
#   NNODES      nodes (default 1)
#   CONFIG_FILE TOML config (default: train_configs/debug_model.toml)
#   MEASURE=1   also run the config for real on this machine (torchrun, NGPU processes,
#               2 train steps) and compare rank 0's measured peak with the estimate
# Extra arguments are config overrides: ./scripts/run_memory_estimation.sh --training.seq_len 4096
# No tokenizer file is needed (a note says where the vocab size came from); a config with
# compile.enable is estimated eager (a note says so). A bad input: one `error:` line, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EST_JSON=$(mktemp -t memory_estimate.XXXXXX.json)
trap 'rm -f "${EST_JSON}"' EXIT

python scripts/estimate_memory.py --ngpu "${NGPU}" --nnodes "${NNODES}" \
  --config "${CONFIG_FILE}" --json-out "${EST_JSON}" "$@"

if [ "${MEASURE:-0}" = "1" ]; then
  if [ "${NNODES}" != "1" ]; then
    echo "MEASURE=1 runs on this machine only: set NNODES=1" >&2
    exit 1
  fi
  torchrun --standalone --nproc_per_node="${NGPU}" --local-ranks-filter 0 --role rank \
    scripts/estimate_memory.py --measure --compare-to "${EST_JSON}" --config "${CONFIG_FILE}" "$@"
fi
