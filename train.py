"""Entry point: ``python -m torchtitan.tools.launch ... train.py --job.config_file FILE [--section.key value ...]``
(what run_train.sh and multinode_trainer.slurm run; plain ``torchrun`` or ``python train.py`` work too).

A user error (bad config, missing file, unwritable folder, corrupted checkpoint, non-finite loss)
ends the run with one ``error: ...`` line and exit code 1 instead of a traceback from deep
inside torch; ``TORCHTITAN_TRACEBACK=1`` re-raises it with the full traceback. Under a launcher
each failure is also written to the rank's torchelastic error file, from which
``torchtitan.tools.launch`` prints one summary (see there and torchtitan/tools/cli.py).
"""

import os
import sys

from torchtitan.config.manager import ConfigManager
from torchtitan.tools.cli import main_with_user_errors, stop_background_saver


def run(argv: list[str] | None = None) -> None:
    """Parse the config and train (or estimate memory); errors propagate."""
    manager = ConfigManager()
    cfg = manager.parse_args(argv)
    if cfg.memory_estimation.enable:  # estimate instead of training: one process, fake tensors
        from torchtitan.tools.memory_estimation import run_estimation_from_launcher

        run_estimation_from_launcher(cfg)
        return
    manager.check_paths(cfg)  # every path the run reads, also those of features that are off
    check_dump_folder(cfg.job.dump_folder)
    # Expandable segments: activations of varying size stop fragmenting the CUDA caching
    # allocator (fewer OOMs and cudaMalloc retries at the same batch). A user's setting wins.
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    from torchtitan.trainer import Trainer  # imported here: config errors and --help need no torch

    trainer = Trainer(cfg)
    try:
        trainer.train()
    except BaseException:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            trainer.close()  # alone: finish a save in flight, then tear down
        else:
            # No final barrier: the other ranks may be inside a collective that will never
            # complete, and a barrier would wait for the whole comm timeout. Exit at once instead.
            stop_background_saver()
        raise
    trainer.close()


def check_dump_folder(folder: str) -> None:
    """Create ``job.dump_folder`` and write a probe file: fail before any work, not at the first save.

    A write probe, not a permission-bit check: root ignores the bits, yet also fails here when
    the path runs through a regular file or a read-only mount.
    """
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"job.dump_folder={folder!r} is not a writable folder ({e.strerror or e}: {e.filename or folder}); "
            f"metrics and checkpoints go there: pass --job.dump_folder with a folder you can write"
        ) from None


def main(argv: list[str] | None = None) -> None:
    """Run; a user error ends in one ``error:`` line and exit code 1, and under a launcher every
    failure also leaves its report in torchelastic's error file (see torchtitan/tools/cli.py)."""
    main_with_user_errors(run, argv)


# The guard matters: process-based async checkpointing re-imports this module.
if __name__ == "__main__":
    main(sys.argv[1:])
