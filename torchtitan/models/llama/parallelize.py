"""The parallelization plan for Llama, applied in a fixed order to the meta-device model.

Order: tensor parallel -> activation checkpointing -> torch.compile -> FSDP/HSDP/DDP.
AC wraps the (TP-sharded) blocks, compile sees the AC-wrapped blocks, and FSDP wraps the
compiled blocks last so its hooks stay outside the compiled graphs.
"""

from collections import defaultdict

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan.config.job_config import ActivationCheckpoint as ACConfig
from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger


def parallelize_llama(model: nn.Module, parallel_dims: ParallelDims, ac: ACConfig, compile: CompileConfig) -> nn.Module:
    if parallel_dims.world_size > 1:
        raise ValueError(
            f"this build trains on one process only (world size {parallel_dims.world_size} requested); "
            f"run with NGPU=1"
        )
    if ac.mode != "none":
        apply_ac(model, ac)
    if compile.enable:
        apply_compile(model, compile)
    return model


# ---- activation checkpointing ----------------------------------------------------------

# Ops whose outputs the op-level policy keeps: recomputing them costs the most FLOPs per byte.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten.max.default,
}


def _op_sac_policy():
    """torchtitan's selective op policy: save attention outputs and every other matmul.

    Keeping only every second mm halves the saved matmul activations while recomputing the
    cheaper half of the FLOPs; the counter is per forward (and its recompute), so both agree.
    """
    mm_count = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == torch.ops.aten.mm.default:
            mm_count[mode] += 1
            if mm_count[mode] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _op_sac_context_fn():
    return create_selective_checkpoint_contexts(_op_sac_policy())


def apply_ac(model: nn.Module, ac: ACConfig) -> None:
    """Wrap blocks: 'full' = every block; 'selective' + N = every N-th block; + 'op' = op policy."""
    if ac.mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint.mode {ac.mode!r}: use none, full or selective")
    every = 1
    context_fn = None
    if ac.mode == "selective" and ac.selective_ac_option == "op":
        context_fn = _op_sac_context_fn
    elif ac.mode == "selective":
        if not ac.selective_ac_option.isdigit() or int(ac.selective_ac_option) < 1:
            raise ValueError(
                f"activation_checkpoint.selective_ac_option {ac.selective_ac_option!r}: use 'op' or a "
                f"positive integer N (checkpoint every N-th block)"
            )
        every = int(ac.selective_ac_option)
    for i, (name, block) in enumerate(model.layers.named_children()):
        if i % every:
            continue
        kwargs = {"context_fn": context_fn} if context_fn else {}
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False, **kwargs))
    logger.info(f"activation checkpointing: {ac.mode} {ac.selective_ac_option if ac.mode == 'selective' else ''}")


# ---- compile ---------------------------------------------------------------------------


def apply_compile(model: nn.Module, cfg: CompileConfig) -> None:
    """Compile each block on its own: same graph for every layer, so it compiles once."""
    for block in model.layers.children():
        block.compile(backend=cfg.backend, fullgraph=True)
    logger.info(f"compiled each transformer block with torch.compile (backend {cfg.backend})")
