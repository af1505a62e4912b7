"""Fail in seconds, naming the size and the limit, when a run cannot fit in memory.

Called by the trainer before anything sized by the config is allocated (data loader, model):
``--training.seq_len 100000000`` used to spend minutes filling a RoPE table and then the host's
memory until the OOM killer came; a 405B model on one GPU failed only at materialization.

The check uses lower bounds, so it never refuses a run that could fit (the memory estimator,
``scripts/run_memory_estimation.sh``, gives the full estimate of a layout):
- model state: fp32 weights and AdamW's two fp32 moments (12 bytes per parameter), spread at best
  over the ranks that shard the model (world size / dp_replicate); gradients (4 bytes per
  parameter) or the activations at the end of the forward, whichever is larger, on top;
- buffers (the RoPE table, one row per position up to ``training.seq_len``), whole on every rank;
- activations: at least each block's input in bf16 for one microbatch, plus the logits;
- one batch of token ids and positions (int64) in host memory;
- host memory the process holds already (its resident set: the torch libraries, the tokenizer).
Parameter and buffer sizes are exact: they come from the model built on the meta device.
Limits: the device's total memory (CUDA), and the host's physical memory or cgroup limit shared
by the processes of this host (``LOCAL_WORLD_SIZE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from torchtitan.components.model_builder import build_model_args
from torchtitan.config.job_config import JobConfig
from torchtitan.models.registry import get_spec
from torchtitan.parallelisms.parallel_dims import ParallelDims

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_ESTIMATOR = "scripts/run_memory_estimation.sh estimates the peak of a layout"


@dataclass
class Need:
    """Bytes one process needs for one purpose, and the config key that sizes them."""

    what: str
    nbytes: int
    key: str


def host_memory() -> tuple[int, str] | None:
    """(bytes of memory this host gives the job, where the number comes from), None if unknown."""
    try:
        total, source = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory of this host"
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or no such name
        return None
    for path in _CGROUP_LIMITS:  # a container's limit is the real one
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < total:
            total, source = int(text), f"cgroup limit in {path}"
    return total, source


def process_rss() -> int | None:
    """Bytes this process holds in RAM now (resident set: the torch libraries, the tokenizer, the data
    listing, Python objects), None where /proc is not readable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def model_needs(cfg: JobConfig, dims: ParallelDims, local_bs: int, vocab_size: int) -> dict[str, Need]:
    """What one rank needs at least for the model: "state", "grads", "activations", "buffers"."""
    spec = get_spec(cfg.model.name)
    args = build_model_args(cfg, spec, vocab_size)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = spec.model_cls(args)
    nparams = sum(p.numel() for p in model.parameters())
    shards = dims.world_size // dims.dp_replicate
    rows = local_bs if dims.pp == 1 else 1  # under PP a microbatch may be a single row
    tokens = rows * cfg.training.seq_len // dims.cp
    activations = tokens * args.dim * 2 * (len(model.layers) // dims.pp) // dims.tp
    if dims.pp == 1:
        activations += tokens * args.vocab_size * 2 // dims.tp  # the logits
    return {
        "state": Need(f"weights and AdamW state of {nparams:,} parameters over {shards} shard(s)",
                      12 * nparams // shards, "model.flavor"),
        "grads": Need("gradients", 4 * nparams // shards, "model.flavor"),
        "activations": Need("activations of one microbatch", activations,
                            "training.seq_len / training.local_batch_size"),
        "buffers": Need("buffers (RoPE table: training.seq_len rows)",
                        sum(b.numel() * b.element_size() for b in model.buffers()), "training.seq_len"),
    }


def batch_need(cfg: JobConfig, local_bs: int, accum_steps: int) -> Need:
    """One batch of this rank's rows: tokens and positions, int64, seq_len + 1 each (host memory)."""
    rows = local_bs * accum_steps
    return Need("one batch of token ids and positions", rows * (cfg.training.seq_len + 1) * 16,
                "training.seq_len / training.local_batch_size")


def check_memory_fits(cfg: JobConfig, dims: ParallelDims, device: torch.device, local_bs: int, accum_steps: int,
                      vocab_size: int) -> None:
    """Raise a ValueError naming the sizes, the limit and the key to change if the run cannot fit."""
    m = model_needs(cfg, dims, local_bs, vocab_size)
    # Never all at once: the activations are freed as the gradients appear in backward.
    grads_or_activations = max(m["grads"], m["activations"], key=lambda n: n.nbytes)
    batch = batch_need(cfg, local_bs, accum_steps)
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = host_memory()
    if device.type == "cuda":
        if cfg.training.enable_cpu_offload and dims.fsdp_enabled:  # sharded state and grads in host memory
            on_host, on_device = [batch, m["state"], m["grads"]], [m["activations"], m["buffers"]]
        else:
            on_host, on_device = [batch], [m["state"], grads_or_activations, m["buffers"]]
        total = torch.cuda.get_device_properties(device).total_memory
        _check(on_device, 1, total, "device memory", f"{torch.cuda.get_device_name(device)} total")
    else:
        on_host = [batch, m["state"], grads_or_activations, m["buffers"]]
    resident = process_rss()
    if resident:  # held already (torch, the tokenizer): no config key sizes it
        on_host.append(Need("this process's resident memory so far", resident, ""))
    if host is not None:
        _check(on_host, procs, host[0], "host memory", host[1])


def _check(needs: list[Need], procs: int, limit: int, where: str, source: str) -> None:
    per_proc = sum(n.nbytes for n in needs)
    if per_proc * procs <= limit:
        return
    needs = sorted((n for n in needs if n.nbytes), key=lambda n: -n.nbytes)
    items = ", ".join(f"{n.what} {_size(n.nbytes)}" for n in needs)
    times = f"; x {procs} processes on this host = {_size(per_proc * procs)}" if procs > 1 else ""
    top = next(n.key for n in needs if n.key)
    fix = ("use a smaller model.flavor or shard the model over more processes (parallelism.dp_shard, tp, pp)"
           if top == "model.flavor" else f"lower {top}")
    raise ValueError(
        f"the run cannot fit in {where}: each process needs at least {_size(per_proc)} ({items}{times}), but "
        f"there is {_size(limit)} ({source}); {fix} ({_ESTIMATOR})"
    )


def _size(nbytes: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while nbytes >= 1024 and i < len(units) - 1:
        nbytes, i = nbytes / 1024, i + 1
    return f"{nbytes:.1f} {units[i]}"
