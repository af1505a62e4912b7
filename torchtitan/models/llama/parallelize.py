"""The parallel plan for Llama: which module gets which style, in the fixed order
tensor parallel -> activation checkpointing -> torch.compile -> FSDP/HSDP/DDP.

AC wraps the (TP-sharded) blocks, compile sees the AC-wrapped blocks, and FSDP wraps the
compiled blocks last so its hooks stay outside the compiled graphs. Context parallel swaps
the attention modules before this runs (parallelisms/context_parallel.py). How each step is
applied lives in ``parallelisms/``; only the block's TP plan is Llama's own.
"""

import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel

from torchtitan.config.job_config import ActivationCheckpoint as ACConfig
from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.config.job_config import Experimental as ExperimentalConfig
from torchtitan.config.job_config import Parallelism as ParallelismConfig
from torchtitan.config.job_config import Training as TrainingConfig
from torchtitan.parallelisms.activation_checkpoint import apply_ac
from torchtitan.parallelisms.compile import apply_compile
from torchtitan.parallelisms.data_parallel import apply_data_parallel
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.tensor_parallel import (
    apply_tp,
    block_styles,
    check_tp_degrees,
    enable_async_tp,
    validate_async_tp,
)


def parallelize_llama(
    model: nn.Module,
    parallel_dims: ParallelDims,
    ac: ACConfig,
    compile: CompileConfig,
    *,
    parallelism: ParallelismConfig | None = None,
    training: TrainingConfig | None = None,
    experimental: ExperimentalConfig | None = None,
    tp_styles: dict | None = None,
) -> nn.Module:
    """Apply TP -> AC -> compile -> FSDP/HSDP (or DDP) in place to a meta-device model (or stage).

    Sections left out take their defaults (as for a one-process run). ``tp_styles`` replaces the
    block's colwise / rowwise / prepare_input styles (float8 TP: ``Float8Training.tp_styles``).
    """
    parallelism = parallelism or ParallelismConfig()
    training = training or TrainingConfig()
    experimental = experimental or ExperimentalConfig()
    validate_async_tp(experimental, parallel_dims, compile, parallel_dims.mesh.device_type)
    if parallel_dims.tp_enabled:
        check_tp_degrees(model.model_args, parallel_dims.tp)
        tp_mesh = parallel_dims.submesh("tp")
        plan = llama_block_tp_plan(tp_styles)
        apply_tp(model, tp_mesh, parallelism.loss_parallel, lambda block: plan)
        if experimental.enable_async_tensor_parallel:
            enable_async_tp(tp_mesh)
    if ac.mode != "none":
        apply_ac(model, ac)
    if compile.enable:
        apply_compile(model, compile)
    apply_data_parallel(model, parallel_dims, parallelism, training, compile.enable)
    return model


def llama_block_tp_plan(tp_styles: dict | None = None) -> dict:
    """Attention and the MLP get the full sequence (PrepareModuleInput all-gathers T), so RoPE
    slices freqs_cis[:T] exactly as on one device; wo / w2 reduce-scatter back to T/tp."""
    colwise, rowwise, prepare_input = block_styles(tp_styles)
    return {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=Shard(1), use_local_output=False),
        "feed_forward.w3": colwise(),
    }
