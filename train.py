"""Entry point: ``python -m torchtitan.tools.launch ... train.py --job.config_file FILE [--section.key value ...]``
(what run_train.sh and multinode_trainer.slurm run; plain ``torchrun`` or ``python train.py`` work too).
Without a config file it trains ``train_configs/debug_model.toml`` (beside this file), as run_train.sh does.

A user error (bad config, missing file, unwritable folder, corrupted checkpoint, non-finite loss)
ends the run with one ``error: ...`` line and exit code 1 instead of a traceback from deep
inside torch; ``TORCHTITAN_TRACEBACK=1`` re-raises it with the full traceback. Under a launcher
each failure is also written to the rank's torchelastic error file, from which
``torchtitan.tools.launch`` prints one summary (see there and torchtitan/tools/cli.py).
"""

import os
import signal
import sys
from pathlib import Path

from torchtitan.config.manager import ConfigManager
from torchtitan.tools.cli import main_with_user_errors, print_start_line, stop_background_saver
from torchtitan.tools.logging import init_logger, logger

# The default run, found from this file (not the cwd): `python train.py` trains what ./run_train.sh trains.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "train_configs" / "debug_model.toml"


def parse(argv: list[str] | None = None):
    """The config of this run: ``DEFAULT_CONFIG`` when the command line names no config file."""
    print_start_line("train.py", sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG)  # before torch: ~0.2 s
    manager = ConfigManager(default_config_file=DEFAULT_CONFIG)
    cfg = manager.parse_args(argv)
    if manager.used_default:
        init_logger()
        logger.info(f"no --config given: training the default config {DEFAULT_CONFIG} (what ./run_train.sh runs)")
    return manager, cfg


def run(argv: list[str] | None = None) -> None:
    """Parse the config and train (or estimate memory); errors propagate."""
    manager, cfg = parse(argv)
    if cfg.memory_estimation.enable:  # estimate instead of training: one process, fake tensors
        from torchtitan.tools.memory_estimation import run_estimation_from_launcher

        run_estimation_from_launcher(cfg)
        return
    manager.check_paths(cfg)  # every path the run reads, also those of features that are off
    created = check_dump_folder(cfg.job.dump_folder)
    # Expandable segments: activations of varying size stop fragmenting the CUDA caching
    # allocator (fewer OOMs and cudaMalloc retries at the same batch). A user's setting wins.
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    trainer = start_trainer(cfg, created)
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


def start_trainer(cfg, created: str | None):
    """The Trainer; if its start fails, a dump folder this start created is removed while it holds
    nothing (a refused or failed start leaves no empty folder behind)."""
    from torchtitan.trainer import Trainer  # imported here: config errors and --help need no torch

    try:
        return Trainer(cfg)
    except BaseException:
        if created is not None and os.environ.get("RANK", "0") == "0":  # the other ranks may not have failed yet
            from torchtitan.components.run_lock import release_all

            release_all()  # the run lock is the one file a start writes before it is accepted
            remove_empty_folders(created)
        raise


def remove_empty_folders(top: str) -> None:
    """Remove ``top`` and the folders under it, bottom-up, where they are empty (rmdir never removes a file)."""
    for folder, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def check_dump_folder(folder: str) -> str | None:
    """Create ``job.dump_folder`` and write a probe file: fail before any work, not at the first save.
    Returns the topmost folder this created (None if the folder existed), for ``start_trainer``.

    A write probe, not a permission-bit check: root ignores the bits, yet also fails here when
    the path runs through a regular file or a read-only mount.
    """
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    created = os.path.abspath(folder)
    while not os.path.exists(os.path.dirname(created)) and os.path.dirname(created) != created:
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        if created is not None:
            remove_empty_folders(created)
        raise ValueError(
            f"job.dump_folder={folder!r} is not a writable folder ({e.strerror or e}: {e.filename or folder}); "
            f"metrics and checkpoints go there: pass --job.dump_folder with a folder you can write"
        ) from None
    return created


def main(argv: list[str] | None = None) -> None:
    """Run; a user error ends in one ``error:`` line and exit code 1, and under a launcher every
    failure also leaves its report in torchelastic's error file (see torchtitan/tools/cli.py)."""
    main_with_user_errors(run, argv)


# The guard matters: process-based async checkpointing re-imports this module.
if __name__ == "__main__":
    main(sys.argv[1:])
elif __name__ == "__mp_main__":  # DCP's checkpoint process: in the terminal's process group, but the
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # trainer decides when a Ctrl-C stops it (after a save)
