#!/usr/bin/env bash
# Launch training on this machine: torchrun through torchtitan.tools.launch (same options; a failure
# ends in one summary line per rank instead of torchrun's traceback).
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
# Split the cores between the processes: oversubscribed threads fight (7x slower seen on 2 cores).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NGPU ))
  [ "${OMP_NUM_THREADS}" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

exec python -m torchtitan.tools.launch --standalone --nproc_per_node="${NGPU}" \
  --local-ranks-filter "${LOG_RANK}" --role rank \
  train.py --job.config_file "${CONFIG_FILE}" "$@"
