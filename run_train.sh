#!/usr/bin/env bash
# Launch training on this machine: torchrun through torchtitan.tools.launch (same options; it prints
# what starts, checks the config and layout before any rank exists, and a failure ends in one
# summary line per rank instead of torchrun's traceback).
#   NGPU        processes (default: the CUDA device count, else 1)
#   CONFIG_FILE TOML config (default: train_configs/debug_model.toml)
#   LOG_RANK    ranks whose output is shown (default: 0; e.g. 0,1)
#   OMP_NUM_THREADS  threads per process (default: the cores split between the processes)
# Extra arguments are config overrides: ./run_train.sh --training.steps 50
# Ctrl-C: the ranks finish their step, save a checkpoint and stop (exit 130); Ctrl-C again stops them
# at once. SIGTERM (preemption): the same, and exit 0.
set -euo pipefail
cd "$(dirname "$0")"

CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
LOG_RANK=${LOG_RANK:-0}

# "devices" is resolved by the launcher (which imports torch anyway), not here: a second torch
# import would delay the first line by a second or more.
exec python -m torchtitan.tools.launch --standalone --nproc_per_node="${NGPU:-devices}" \
  --local-ranks-filter "${LOG_RANK}" --role rank \
  train.py --job.config_file "${CONFIG_FILE}" "$@"
