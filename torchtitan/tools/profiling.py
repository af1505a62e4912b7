"""torch.profiler traces and CUDA memory snapshots, every ``profiling.profile_freq`` steps.

Both are context managers around the training loop that yield an object whose ``.step()`` the loop
calls after every train step (or ``None``-like no-ops when disabled), so the loop has no branches:

    with maybe_enable_profiling(cfg.profiling, dump, step) as prof, \\
         maybe_enable_memory_snapshot(cfg.profiling, dump, step, device) as mem:
        ...; prof.step(); mem.step()

Files: ``<dump>/<save_traces_folder>/iteration_N/rank{r}_trace.json`` (open in chrome://tracing or
https://ui.perfetto.dev) and ``<dump>/<save_memory_snapshot_folder>/iteration_N/rank{r}_memory_snapshot.pickle``
(drag into https://pytorch.org/memory_viz); an out-of-memory error dumps ``iteration_N_exit`` first.
N is the training step (1-based, as in the metrics), and the trace of ``iteration_N`` holds the
profiler's ``ProfilerStep#N``. Kineto's ``USDT: profiler_start/stop`` lines are off
(``KINETO_LOG_LEVEL=6`` unless set: set it lower to see kineto's messages again).
"""

import contextlib
import os
import time
import warnings

import torch

from torchtitan.config.job_config import Profiling
from torchtitan.tools.logging import logger

WARMUP = 1  # steps traced but thrown away before each recorded one (the profiler's own start-up)
ACTIVE = 1  # steps recorded per trace
MAX_SNAPSHOT_ENTRIES = 100_000  # allocation events kept by the CUDA allocator's history ring buffer


class _NoOp:
    def step(self) -> None:
        pass

    def dump_on_oom(self) -> None:
        pass


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def step_schedule(profile_freq: int, first_step: int):
    """torch.profiler's schedule over training steps: ``fn(step)`` records every step that is a multiple
    of ``profile_freq``. The profiler asks for step 0 when built and for ``step_num + 1`` after each
    ``step()``: its step_num starts at ``first_step``, the step about to run."""
    wait, warmup, active = profile_schedule(profile_freq)
    by_position = torch.profiler.schedule(wait=wait, warmup=warmup, active=active)
    return lambda step: by_position(max(step, first_step) - 1)  # position 0 = step 1


def profile_schedule(profile_freq: int) -> tuple[int, int, int]:
    """(wait, warmup, active) so that the last step of every ``profile_freq`` steps is recorded."""
    if profile_freq < 1:
        raise ValueError(f"profiling.profile_freq must be >= 1, got {profile_freq}")
    warmup = min(WARMUP, profile_freq - ACTIVE)  # profile_freq 1: record every step, no warm-up
    return profile_freq - warmup - ACTIVE, warmup, ACTIVE


@contextlib.contextmanager
def maybe_enable_profiling(cfg: Profiling, dump_folder: str, global_step: int = 0):
    """Yield a torch.profiler (``.step()`` after each train step) or a no-op when disabled.

    ``global_step`` is the step the run resumes from: the schedule counts from it, so traces land on
    steps that are multiples of ``profile_freq`` after a resume too.
    """
    if not cfg.enable_profiling:
        yield _NoOp()
        return
    trace_dir = os.path.join(dump_folder, cfg.save_traces_folder)
    rank = _rank()

    def trace_handler(prof: torch.profiler.profile) -> None:
        step = prof.step_num - 1  # called from step(), once step_num moved on to the next step
        folder = os.path.join(trace_dir, f"iteration_{step}")
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        prof.export_chrome_trace(os.path.join(folder, f"rank{rank}_trace.json"))
        logger.info(f"profiler trace of step {step} written to {folder} in {time.perf_counter() - t0:.2f} s")

    _quiet_profiler()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    logger.info(f"profiling: one trace every {cfg.profile_freq} steps into {trace_dir}")
    prof = torch.profiler.profile(activities=activities, schedule=step_schedule(cfg.profile_freq, global_step + 1),
                                  on_trace_ready=trace_handler, record_shapes=True)
    prof.step_num = global_step + 1  # before start(): it labels the first step ProfilerStep#<step_num>
    with prof:
        yield prof


def _quiet_profiler() -> None:
    """Neither kineto's USDT lines (two per trace, on stderr) nor torch's note that each trace holds
    its own cycle's events only, which is what a trace per period wants."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read when kineto starts: at the first profile
    warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")


class MemorySnapshot:
    """Record the CUDA allocator's history; dump it every ``freq`` steps and on out-of-memory."""

    def __init__(self, folder: str, freq: int, global_step: int):
        self.folder, self.freq, self.step_num = folder, freq, global_step
        self.rank = _rank()
        torch.cuda.memory._record_memory_history(max_entries=MAX_SNAPSHOT_ENTRIES)

    def step(self) -> None:
        self.step_num += 1
        if self.step_num % self.freq == 0:
            self._dump(f"iteration_{self.step_num}")

    def dump_on_oom(self) -> None:
        self._dump(f"iteration_{self.step_num + 1}_exit")  # the step that was running

    def _dump(self, name: str) -> None:
        folder = os.path.join(self.folder, name)
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        torch.cuda.memory._dump_snapshot(os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle"))
        logger.info(f"memory snapshot written to {folder} in {time.perf_counter() - t0:.2f} s")

    def close(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


@contextlib.contextmanager
def maybe_enable_memory_snapshot(cfg: Profiling, dump_folder: str, global_step: int, device: torch.device):
    """Yield a ``MemorySnapshot`` on CUDA when enabled, else a no-op (with a warning on CPU)."""
    if not cfg.enable_memory_snapshot:
        yield _NoOp()
        return
    if device.type != "cuda":
        logger.warning("profiling.enable_memory_snapshot is ignored: memory snapshots need CUDA "
                       f"(this run is on {device.type})")
        yield _NoOp()
        return
    snapshot = MemorySnapshot(os.path.join(dump_folder, cfg.save_memory_snapshot_folder),
                              cfg.profile_freq, global_step)
    try:
        yield snapshot
    finally:
        snapshot.close()
