"""Runs train.py's main in a child process for the tests; optionally dies mid-save.

    python tests/helpers/train_runner.py [--kill-during-save STEP] [--sigterm-at-step STEP]
                                  [--nan-at-step STEP] [--fail-at-step RANK STEP]
                                  [--kill-rank-at-step RANK STEP] -- <train.py args>

--kill-during-save: the process SIGKILLs itself after DCP has written the data files of
the checkpoint for STEP but before it finished: what a crash or an OOM-killer does to a save.
Works for every checkpoint.async_mode: with `async` the writer runs in a thread of this process;
with `async_with_pinned_mem` it runs in DCP's checkpoint process (spawned: it re-imports this
file as __mp_main__ and arms itself from the environment), which kills the trainer, then itself.
--sigterm-at-step: SIGTERM arrives during step STEP - 1, so the run stops after STEP, as a
preempted job would (the schedule still spans training.steps, unlike a shorter run).
--nan-at-step: the loss of step STEP is NaN, as after a bad batch or an overflow.
--fail-at-step: rank RANK raises a RuntimeError at the start of step STEP, on the first attempt
only (torchrun's TORCHELASTIC_RESTART_COUNT is 0): a restarted worker group runs through.
--kill-rank-at-step: rank RANK SIGKILLs itself at the start of step STEP (a node or OOM loss).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


_KILL_ENV = "TORCHTITAN_TEST_KILL_DURING_SAVE"


def _arm_kill(step: int) -> None:
    from torch.distributed.checkpoint import filesystem

    os.environ[_KILL_ENV] = str(step)  # inherited by DCP's checkpoint process
    original = filesystem.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        result = original(self, plan, planner)
        if Path(str(self.path)).name == f"step-{step}.tmp":
            result.wait()
            if __name__ == "__mp_main__":  # DCP's checkpoint process: the trainer dies first
                os.kill(os.getppid(), signal.SIGKILL)
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
        loss_fn = self.step_fn.loss_fn
        if self.train_state.step == step:  # the loop has already counted this step
            self.step_fn.loss_fn = lambda logits, labels: loss_fn(logits, labels) * float("nan")
        try:
            return original(self, *a, **kw)
        finally:
            self.step_fn.loss_fn = loss_fn

    Trainer.train_step = step_with_nan


def _at_step_start(rank: int, step: int, action) -> None:
    """Run ``action()`` on global rank ``rank`` just before step ``step``'s forward."""
    from torchtitan.trainer import Trainer

    original = Trainer.train_step

    def step_with_action(self, *a, **kw):
        if self.train_state.step == step and self.rank == rank:  # the loop has already counted it
            action()
        return original(self, *a, **kw)

    Trainer.train_step = step_with_action


def _arm_fail(rank: int, step: int) -> None:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return  # a restarted attempt: the fault was transient

    def fail():
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")

    _at_step_start(rank, step, fail)


def _arm_kill_rank(rank: int, step: int) -> None:
    _at_step_start(rank, step, lambda: os.kill(os.getpid(), signal.SIGKILL))


# flag -> (arming function, number of integer arguments)
_HOOKS = {"--kill-during-save": (_arm_kill, 1), "--sigterm-at-step": (_arm_sigterm, 1),
          "--nan-at-step": (_arm_nan, 1), "--fail-at-step": (_arm_fail, 2),
          "--kill-rank-at-step": (_arm_kill_rank, 2)}

if __name__ == "__mp_main__" and os.environ.get(_KILL_ENV):
    _arm_kill(int(os.environ[_KILL_ENV]))

if __name__ == "__main__":
    args = sys.argv[1:]
    while args and args[0] in _HOOKS:
        arm, nargs = _HOOKS[args[0]]
        arm(*map(int, args[1:1 + nargs]))
        args = args[1 + nargs:]
    if args[:1] == ["--"]:
        args = args[1:]
    from train import main

    main(args)
