"""AdamW and the learning-rate schedule, each built from its own config section."""

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from torchtitan.config.job_config import LRScheduler as LRSchedulerConfig
from torchtitan.config.job_config import Optimizer as OptimizerConfig

_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def build_optimizer(cfg: OptimizerConfig, params, device_type: str) -> torch.optim.Optimizer:
    if cfg.name not in _OPTIMIZERS:
        raise ValueError(f"optimizer.name {cfg.name!r} is not supported; use one of {sorted(_OPTIMIZERS)}")
    impl = cfg.implementation
    if impl == "auto":
        # fused: one kernel per parameter on CUDA and CPU. On CPU, foreach decomposes into ~10
        # elementwise passes per parameter, each an OpenMP region: 4-6x slower (BENCHMARKS.md).
        impl = "fused" if device_type in ("cuda", "cpu") else "foreach"
    kwargs = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )
    return _OPTIMIZERS[cfg.name](params, **kwargs)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, decay_type: str,
                  decay_ratio: float, min_lr_ratio: float) -> float:
    """The factor on the peak lr for optimizer step ``step`` (0-based count of steps already taken).

    warmup: (step + 1) / (warmup + 1), so the first step trains at lr/(warmup+1) instead of 0;
    then decay from 1 to ``min_lr_ratio`` at the last step:
    linear and cosine over all remaining steps; wsd (warmup-stable-decay) stays at 1 and
    decays linearly over the last ``decay_ratio`` of all steps.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay_type == "wsd":
        decay_steps = max(1, round(total_steps * decay_ratio))
        decay_start = max(warmup_steps, total_steps - decay_steps)
    else:
        decay_start = warmup_steps
    if step < decay_start:
        return 1.0
    span = max(1, total_steps - 1 - decay_start)
    progress = min(1.0, (step - decay_start) / span)
    if decay_type == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_type in ("linear", "wsd"):
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr_scheduler.decay_type {decay_type!r} is not one of linear, cosine, wsd")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(cfg: LRSchedulerConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.min_lr_ratio <= 1.0 or not 0.0 < cfg.decay_ratio <= 1.0:
        raise ValueError(
            "lr_scheduler: need warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and 0 < decay_ratio <= 1; got "
            f"warmup_steps={cfg.warmup_steps}, min_lr_ratio={cfg.min_lr_ratio}, decay_ratio={cfg.decay_ratio}"
        )
    fn = partial(
        lr_multiplier,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        decay_type=cfg.decay_type,
        decay_ratio=cfg.decay_ratio,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    fn(0)  # fail at build time, not at step N, on a bad decay_type
    return LambdaLR(optimizer, fn)
