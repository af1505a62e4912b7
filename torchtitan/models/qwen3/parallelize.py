"""The parallel plan for Qwen3 (dense and MoE), in the fixed order
tensor parallel (+ the MoE's TP / expert parallel) -> activation checkpointing -> torch.compile
-> FSDP/HSDP/DDP (experts sharded over the ranks outside their EP group first).

Context parallel swaps ``attention.sdpa`` before this runs. How each step is applied lives in
``parallelisms/``; what is Qwen3's own: the per-head q/k norms under TP, the tied embedding,
and which blocks are MoE.
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
from torchtitan.parallelisms.expert_parallel import apply_moe_ep_tp
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.tensor_parallel import (
    apply_tp,
    block_styles,
    check_tp_degrees,
    enable_async_tp,
    validate_async_tp,
)


def parallelize_qwen3(
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
    """Apply TP/EP -> AC -> compile -> FSDP/HSDP (or DDP) in place to a meta-device model (or stage)."""
    parallelism = parallelism or ParallelismConfig()
    training = training or TrainingConfig()
    experimental = experimental or ExperimentalConfig()
    dims = parallel_dims
    validate_async_tp(experimental, dims, compile, dims.mesh.device_type)
    tp_mesh = dims.submesh("tp") if dims.tp_enabled else None
    if tp_mesh is not None:
        check_tp_degrees(model.model_args, dims.tp)
        apply_tp(model, tp_mesh, parallelism.loss_parallel, lambda block: qwen3_block_tp_plan(block, tp_styles))
        tie_embeddings(model)  # TP gave the embedding and the head a parameter each
        if experimental.enable_async_tensor_parallel:
            enable_async_tp(tp_mesh)
    if tp_mesh is not None or dims.ep_enabled:
        ep_mesh = dims.ep_mesh() if dims.ep_enabled else None
        ep_tp_mesh = dims.ep_tp_mesh() if dims.ep_enabled and tp_mesh is not None else None
        apply_moe_ep_tp(model, tp_mesh, ep_mesh, ep_tp_mesh)
    if ac.mode != "none":
        apply_ac(model, ac)
    if compile.enable:
        apply_compile(model, compile)
    apply_data_parallel(model, dims, parallelism, training, compile.enable)
    return model


def tie_embeddings(model: nn.Module) -> None:
    """Re-tie a tied output head after TP: both are Shard(0) over the vocab, one parameter again."""
    if model.model_args.tie_word_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight


def qwen3_block_tp_plan(block: nn.Module, tp_styles: dict | None = None) -> dict:
    """Like Llama's, plus q_norm / k_norm on the local heads: the input is sharded over heads
    (dim 2 of [B, T, H, E]), the norm weight replicated, so its gradient is summed over tp.
    A MoE block's ``moe`` gets its own plan (parallelisms/expert_parallel.py)."""
    colwise, rowwise, prepare_input = block_styles(tp_styles)
    plan = {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "attention.wo": rowwise(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
    }
    if not block.moe_enabled:
        plan.update({
            "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": colwise(),
            "feed_forward.w2": rowwise(output_layouts=Shard(1), use_local_output=False),
            "feed_forward.w3": colwise(),
        })
    return plan
