#!/usr/bin/env bash
# Launch training on this machine with torchrun.
#   NGPU        processes (default: the CUDA device count, else 1)
#   CONFIG_FILE TOML config (default: train_configs/debug_model.toml)
#   LOG_RANK    ranks whose output is shown (default: 0; e.g. 0,1)
# Extra arguments are config overrides: ./run_train.sh --training.steps 50
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
LOG_RANK=${LOG_RANK:-0}
# One thread per process: on small CPUs more threads fight each other (7x slower seen).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun --standalone --nproc_per_node="${NGPU}" \
  --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
  train.py --job.config_file "${CONFIG_FILE}" "$@"
