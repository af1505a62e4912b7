"""The local batch as a system choice: picked from the memory estimate, lowered once on an OOM.

``training.local_batch_size = 0`` (auto): the largest local batch whose estimated peak memory fits
the limit less the margin. Candidates are the divisors of this rank's rows (global / dp), so that
gradient accumulation (rows / local) is an integer and the global batch, the math, is the one
configured; under PP also multiples of the pipeline's microbatch count (the schedule splits each
local batch into that many). The choice is a function of the config alone: every rank, and every
resume, makes the same one.

``training.oom_retry``: an out-of-memory error in the forward/backward of the first steps of the
process lowers the local batch once (about half; accumulation up) and retries the same batch. The
batch was taken from the data iterator already and nothing was applied yet (the optimizer runs
after), so the data position and the updates are those of a run started at the lower batch.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Callable

import torch

from torchtitan.components.model_builder import build_model_args
from torchtitan.components.train_step import ForwardBackward
from torchtitan.config.job_config import JobConfig
from torchtitan.config.job_config import Parallelism as ParallelismConfig
from torchtitan.config.job_config import Training as TrainingConfig
from torchtitan.models.registry import get_spec
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.pipeline import num_stages_of, read_csv_schedule, resolve_schedule
from torchtitan.planner.memory import memory_for_job
from torchtitan.tools.logging import logger
from torchtitan.tools.memory_check import host_memory, process_rss

GIB = 1024**3
RETRY_STEPS = 3  # an OOM later than this is not a start-up sizing problem: it propagates
# CPU: peak resident bytes per byte of the estimated tensor peak. glibc malloc keeps freed blocks
# in its heap (its mmap threshold rises to 32 MiB after the first large free, so activations stop
# being returned), and the estimate is ~7% under the live tensors (torch.profiler). Measured on the
# debug model, 64 rows of seq 256, local 8 / 32: peak RSS 1.10 / 2.84 GiB for tensor estimates
# 0.43 / 1.43 GiB on ~0.35 GiB resident before: 1.74 per byte; with a fixed 128 KiB mmap threshold
# the same run peaks at 1.91 GiB (1.06 per byte) but trains 2x slower, so the slack is counted.
CPU_RSS_PER_TENSOR_BYTE = 1.8


# ---- auto: the largest local batch that fits -----------------------------------------


@dataclass(frozen=True)
class MemoryLimit:
    """Bytes one process may use, where that number comes from, and the fraction kept free."""

    limit: int
    source: str
    margin: float

    @property
    def usable(self) -> int:
        return int(self.limit * (1 - self.margin))

    def describe(self) -> str:
        return f"{size(self.usable)} (limit {size(self.limit)}, margin {self.margin:.0%})"


def size(nbytes: float) -> str:
    """GiB with one decimal; MiB below 0.1 GiB (tiny models would read 0.0 GiB)."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def memory_limit(training: TrainingConfig, device: torch.device) -> MemoryLimit:
    """``training.memory_limit_gib``, else the GPU's total memory, else (CPU) the host's memory or
    cgroup limit shared by this host's processes (``LOCAL_WORLD_SIZE``)."""
    if training.memory_limit_gib > 0:
        return MemoryLimit(int(training.memory_limit_gib * GIB), "training.memory_limit_gib", training.memory_margin)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return MemoryLimit(total, f"{torch.cuda.get_device_name(device)} total", training.memory_margin)
    host = host_memory()
    if host is None:
        raise ValueError("training.local_batch_size=0 (auto) cannot read this host's memory size; "
                         "set training.memory_limit_gib to the memory one process may use")
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return MemoryLimit(host[0] // procs, f"{host[1]} / {procs} process(es)", training.memory_margin)


def batch_candidates(rows: int, multiple_of: int = 1) -> list[int]:
    """Local batches for ``rows`` rows per rank, largest first: divisors of rows (integer
    accumulation) that are multiples of ``multiple_of`` (the pipeline's microbatches)."""
    return [b for b in range(rows, 0, -1) if rows % b == 0 and b % multiple_of == 0]


def choose_local_batch(rows: int, peak_of: Callable[[int], int], limit: MemoryLimit, multiple_of: int = 1,
                       fix: str = "") -> tuple[int, int]:
    """(local batch, its estimated peak bytes): the largest candidate whose peak fits the usable
    memory. No monotonicity is assumed: candidates are tried largest first until one fits."""
    candidates = batch_candidates(rows, multiple_of)
    if not candidates:
        raise ValueError(
            f"training.local_batch_size=0 (auto): no local batch divides the {rows} rows per rank into whole "
            f"multiples of the {multiple_of} pipeline microbatches; make global_batch_size / dp a multiple of "
            f"parallelism.pp_microbatches"
        )
    for local_bs in candidates:
        peak = peak_of(local_bs)
        if peak <= limit.usable:
            return local_bs, peak
    raise ValueError(
        f"training.local_batch_size=0 (auto): even a local batch of {local_bs} needs an estimated "
        f"{size(peak)}, over the usable {limit.describe()} from {limit.source}; "
        f"{fix or 'shard the model over more processes, turn on activation checkpointing or lower seq_len'}"
    )


def pipeline_microbatches(parallelism: ParallelismConfig) -> int:
    """The pipeline schedule's microbatches per local batch (what build_pipeline resolves), 1 without PP."""
    if parallelism.pp == 1:
        return 1
    plan = resolve_schedule(parallelism.pp_schedule)
    if plan.style == "csv":
        return read_csv_schedule(plan.csv_path)[2]
    num_stages = num_stages_of(plan, parallelism.pp, list(parallelism.pp_split_points), 0)
    return parallelism.pp_microbatches or (parallelism.pp if plan.style == "single" else num_stages)


def auto_local_batch(cfg: JobConfig, dims: ParallelDims, device: torch.device, vocab_size: int) -> int:
    """The local batch for ``training.local_batch_size = 0``, chosen and logged (the same on every rank)."""
    rows = cfg.training.global_batch_size // dims.dp
    args = build_model_args(cfg, get_spec(cfg.model.name), vocab_size)
    estimates = {}
    # On CPU the limit is the process's RAM: what it holds already counts, measured here (after the
    # tokenizer, before the data loader and the model, which the estimate covers).
    resident = (process_rss() or 0) if device.type == "cpu" else 0

    def peak_of(local_bs: int) -> int:
        estimates[local_bs] = memory_for_job(cfg, dims, args, local_bs, device.type)
        return host_peak(estimates[local_bs].total, resident) if device.type == "cpu" else estimates[local_bs].total

    limit = memory_limit(cfg.training, device)
    fix = ("use more GPUs (parallelism.dp_shard, tp, pp), activation_checkpoint.mode=full, a smaller "
           "training.seq_len, or raise training.memory_limit_gib")
    local_bs, peak = choose_local_batch(rows, peak_of, limit, pipeline_microbatches(cfg.parallelism), fix)
    how = (f"this process's resident {resident / 2**20:.0f} MiB + {CPU_RSS_PER_TENSOR_BYTE} x tensors (CPU allocator "
           f"slack), tensors " if device.type == "cpu" else "")
    logger.info(f"auto local batch: {local_bs} (accumulation {rows // local_bs}): estimated peak "
                f"{size(peak)} of {limit.describe()} from {limit.source}; {how}{estimates[local_bs].summary()}")
    return local_bs


def host_peak(tensor_bytes: int, resident: int) -> int:
    """A CPU process's peak resident bytes for a step whose tensors peak at ``tensor_bytes``."""
    return resident + int(CPU_RSS_PER_TENSOR_BYTE * tensor_bytes)


# ---- OOM: lower the local batch once and retry the step -------------------------------


def lower_local_batch(local_bs: int) -> int | None:
    """The largest divisor of ``local_bs`` up to its half (it divides the rows too), None at 1."""
    return next((b for b in range(local_bs // 2, 0, -1) if local_bs % b == 0), None)


class OOMRetry:
    """Runs a step's forward/backward; in the first ``RETRY_STEPS`` calls an OOM on any rank makes
    every rank discard the attempt, lower the local batch once and run the same batch again.

    Agreement: after each forward/backward (finished or failed) every rank all-reduces an OOM flag
    per rank on ``group`` (host side: gloo), so all take the same decision. Limitation: this works
    when the ranks that did not fail are not waiting for the failed one inside a collective (an OOM
    on every rank at the same point, as equal shapes give, or one after the step's last collective).
    An OOM on one rank only inside the forward/backward of an FSDP/TP run leaves its peers in the
    layer's collective: they wait until the collective timeout (``comm.*_timeout_seconds``) and the
    run fails as without the retry. Off under PP: the schedule's microbatch size is fixed when it is built."""

    def __init__(self, enabled: bool, group=None, steps: int = RETRY_STEPS):
        self.enabled, self.group, self.steps = enabled, group, steps
        self.calls, self.lowered = 0, False

    def armed(self) -> bool:
        return self.enabled and not self.lowered and self.calls < self.steps

    def __call__(self, step_fn: ForwardBackward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``step_fn(batch)``, retried once at a lower local batch after an OOM anywhere."""
        if not self.armed():
            return step_fn(batch)
        self.calls += 1
        lower = lower_local_batch(step_fn.local_bs)  # the same on every rank: the decision is too
        try:
            loss = step_fn(batch)
        except torch.OutOfMemoryError:
            failed = self._failed_ranks(True)
            if lower is None:
                raise
        else:
            failed = self._failed_ranks(False)
            if not failed:
                return loss
            del loss
            if lower is None:
                raise RuntimeError(f"rank(s) {failed} ran out of memory at local batch 1; see their error")
        # Out of the except block: the traceback, and the tensors its frames held, are gone.
        self._retry_with(step_fn, lower, failed)
        return step_fn(batch)

    def _failed_ranks(self, oom: bool) -> list[int]:
        """The ranks whose forward/backward ran out of memory (a collective: every rank calls it)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return [0] if oom else []
        flags = torch.zeros(torch.distributed.get_world_size(), dtype=torch.int32)
        flags[torch.distributed.get_rank()] = int(oom)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return flags.nonzero().flatten().tolist()

    def _retry_with(self, step_fn: ForwardBackward, local_bs: int, failed: list[int]) -> None:
        old_local, old_accum = step_fn.local_bs, step_fn.accum_steps
        step_fn.discard_step()
        gc.collect()  # the loop runs with automatic GC off; the failed attempt may hold cycles
        if step_fn.device.type == "cuda":
            torch.cuda.empty_cache()
        step_fn.set_local_batch(local_bs)
        self.lowered = True
        logger.warning(
            f"out of memory on rank(s) {failed} at local batch {old_local} (accumulation {old_accum}): retrying "
            f"the step at local batch {step_fn.local_bs} (accumulation {step_fn.accum_steps}), the same global "
            f"batch; set training.local_batch_size={step_fn.local_bs} to start there"
        )
