"""Tensor parallel pieces every family's plan shares: the residual-stream edges, degree checks, async TP.

A family's ``parallelize.py`` writes only its block plan (which Linear is colwise or rowwise);
``apply_tp`` puts it together with the plan of the embedding, final norm and output head,
which every decoder here shares (``tok_embeddings``, ``norm``, ``output``).
"""

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.config.job_config import Experimental as ExperimentalConfig
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger


def check_tp_degrees(args, tp: int) -> None:
    if args.n_heads % tp or args.n_kv_heads % tp:
        raise ValueError(
            f"tensor parallel degree parallelism.tp={tp} must divide both n_heads={args.n_heads} and "
            f"n_kv_heads={args.n_kv_heads} (each rank holds whole heads); pick a tp that divides both"
        )


def block_styles(styles: dict | None) -> tuple[type, type, type]:
    """(colwise, rowwise, prepare_input) styles for the blocks; float8 swaps them (see float8.py)."""
    styles = styles or {}
    return (
        styles.get("colwise", ColwiseParallel),
        styles.get("rowwise", RowwiseParallel),
        styles.get("prepare_input", PrepareModuleInput),
    )


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool,
             block_plan: Callable[[nn.Module], dict]) -> None:
    """Megatron-style TP with sequence parallel norms (activations between blocks are [B, T/tp, D]).

    ``block_plan(block)`` (the family's) gives each block's plan; this adds the embedding (rowwise,
    output Shard(1)), the final norm (sequence parallel) and the output head (colwise: vocab-
    sharded logits for loss_parallel, else all-gathered), and a pipeline stage's own edges.

    The residual stream between blocks stays a DTensor (Shard(1)): the embedding and the
    blocks' output projections keep ``use_local_output=False``. Why: with plain local tensors
    at the block boundary, a per-block torch.compile (torch 2.13, CPU) fails in backward with
    "'Tensor' object has no attribute '_local_tensor'": the graph's from_local/to_local at its
    edges hands a plain gradient to DTensor's redistribute backward. DTensor in, DTensor out
    traces cleanly and matches eager (tests/e2e/test_parallel.py, tp+sp+compile).

    The embedding, norms and output projection always use the plain styles (they stay in
    high precision under float8).
    """
    top_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    # Pipeline stages may lack some of these.
    parallelize_module(model, tp_mesh, {k: v for k, v in top_plan.items() if getattr(model, k, None) is not None})
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(block))
    # Pipeline stages send and receive plain [B, T/tp, D] tensors: convert at the stage's own
    # edges (its root module, never compiled) from and to the Shard(1) DTensors blocks use.
    if getattr(model, "tok_embeddings", None) is None:
        parallelize_module(model, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=False))
    if getattr(model, "output", None) is None:
        parallelize_module(model, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Shard(1), use_local_output=True))
    logger.info(f"tensor parallel (sequence parallel, loss_parallel={loss_parallel}) over tp={tp_mesh.size()}")


def validate_async_tp(exp: ExperimentalConfig, dims: ParallelDims, compile: CompileConfig, device_type: str) -> None:
    if not exp.enable_async_tensor_parallel:
        return
    problems = []
    if not dims.tp_enabled:
        problems.append(f"needs parallelism.tp > 1 (got tp={dims.tp})")
    if not compile.enable:
        problems.append("needs compile.enable (the matmul/collective fusion is an inductor pass)")
    if device_type != "cuda":
        problems.append(f"needs CUDA (symmetric memory has no {device_type} backend)")
    if problems:
        raise ValueError("experimental.enable_async_tensor_parallel " + "; ".join(problems))


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    logger.info("async tensor parallel enabled (symmetric memory on the tp group)")
