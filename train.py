"""Entry point: ``torchrun ... train.py --job.config_file train_configs/debug_model.toml [--section.key value ...]``."""

import sys

from torchtitan.config.manager import ConfigManager
from torchtitan.trainer import Trainer


def main(argv: list[str] | None = None) -> None:
    cfg = ConfigManager().parse_args(argv)
    if cfg.memory_estimation.enable:  # estimate instead of training: one process, fake tensors
        from torchtitan.tools.memory_estimation import run_estimation_from_launcher

        run_estimation_from_launcher(cfg)
        return
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


# The guard matters: process-based async checkpointing re-imports this module.
if __name__ == "__main__":
    main(sys.argv[1:])
