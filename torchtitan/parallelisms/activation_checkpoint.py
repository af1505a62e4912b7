"""Activation checkpointing of transformer blocks: full, every N-th block, or op-level selective.

Family-independent: it wraps the children of ``model.layers`` (every family keeps its blocks
in that ModuleDict), so wrapped FQNs are the block's plus ``_checkpoint_wrapped_module``.
"""

from collections import defaultdict

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan.config.job_config import ActivationCheckpoint as ACConfig
from torchtitan.tools.logging import logger

# Ops whose outputs the op-level policy keeps: recomputing them costs the most FLOPs per byte.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmuls
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten.max.default,
    torch.ops._c10d_functional.all_to_all_single.default,  # MoE token dispatch: never re-sent
    torch.ops.aten._grouped_mm.default,  # MoE experts
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
        # An MoE block under the op policy is checkpointed whole: its token dispatch reads the
        # all-to-all split sizes on the host, which the op-level replay cannot reproduce.
        kwargs = {"context_fn": context_fn} if context_fn and not getattr(block, "moe_enabled", False) else {}
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False, **kwargs))
    logger.info(f"activation checkpointing: {ac.mode} {ac.selective_ac_option if ac.mode == 'selective' else ''}")
