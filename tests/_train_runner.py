"""Runs train.py's main in a child process for the tests; optionally dies mid-save.

    python tests/_train_runner.py [--kill-during-save STEP] -- <train.py args>

With --kill-during-save, the process SIGKILLs itself after DCP has written the data
files of the checkpoint for STEP but before it finished: what a crash or an OOM-killer
does to a real save.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _arm_kill(step: int) -> None:
    from torch.distributed.checkpoint import filesystem

    original = filesystem.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        result = original(self, plan, planner)
        if f"step-{step}" in str(self.fs.concat_path(self.path, "")):
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    filesystem.FileSystemWriter.write_data = write_then_die


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--kill-during-save"]:
        _arm_kill(int(args[1]))
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    from train import main

    main(args)
