"""Runs train.py's main in a child process for the tests; optionally dies mid-save.

    python tests/_train_runner.py [--kill-during-save STEP] [--sigterm-at-step STEP]
                                  [--nan-at-step STEP] -- <train.py args>

--kill-during-save: the process SIGKILLs itself after DCP has written the data files of
the checkpoint for STEP but before it finished: what a crash or an OOM-killer does to a save.
--sigterm-at-step: SIGTERM arrives during step STEP - 1, so the run stops after STEP, as a
preempted job would (the schedule still spans training.steps, unlike a shorter run).
--nan-at-step: the loss of step STEP is NaN, as after a bad batch or an overflow.
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


def _arm_sigterm(step: int) -> None:
    from torchtitan.trainer import Trainer

    original = Trainer.train_step

    def step_then_signal(self, *a, **kw):
        result = original(self, *a, **kw)
        if self.train_state.step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    Trainer.train_step = step_then_signal


def _arm_nan(step: int) -> None:
    from torchtitan.trainer import Trainer

    original = Trainer.train_step

    def step_with_nan(self, *a, **kw):
        loss_fn = self.loss_fn
        if self.train_state.step == step:  # the loop has already counted this step
            self.loss_fn = lambda logits, labels: loss_fn(logits, labels) * float("nan")
        try:
            return original(self, *a, **kw)
        finally:
            self.loss_fn = loss_fn

    Trainer.train_step = step_with_nan


_HOOKS = {"--kill-during-save": _arm_kill, "--sigterm-at-step": _arm_sigterm, "--nan-at-step": _arm_nan}

if __name__ == "__main__":
    args = sys.argv[1:]
    while args and args[0] in _HOOKS:
        _HOOKS[args[0]](int(args[1]))
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    from train import main

    main(args)
