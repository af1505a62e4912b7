"""The parallelization plan for Llama, applied in a fixed order to the meta-device model.

Order: tensor parallel -> activation checkpointing -> torch.compile -> FSDP/HSDP/DDP.
AC wraps the (TP-sharded) blocks, compile sees the AC-wrapped blocks, and FSDP wraps the
compiled blocks last so its hooks stay outside the compiled graphs.
"""

from collections import defaultdict

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan.config.job_config import ActivationCheckpoint as ACConfig
from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.config.job_config import Experimental as ExperimentalConfig
from torchtitan.config.job_config import Parallelism as ParallelismConfig
from torchtitan.config.job_config import Training as TrainingConfig
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger


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
    device_type = parallel_dims.mesh.device_type
    if parallel_dims.tp_enabled:
        check_tp_degrees(model.model_args, parallel_dims.tp)
    validate_async_tp(experimental, parallel_dims, compile, device_type)
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.submesh("tp")
        apply_tp(model, tp_mesh, loss_parallel=parallelism.loss_parallel, styles=tp_styles)
        if experimental.enable_async_tensor_parallel:
            enable_async_tp(tp_mesh)
    if ac.mode != "none":
        apply_ac(model, ac)
    if compile.enable:
        apply_compile(model, compile)
    if parallel_dims.fsdp_enabled:
        apply_fsdp(
            model, fsdp_mesh(parallel_dims), mp_policy(training, device_type),
            reshard_after_forward(parallelism.fsdp_reshard_after_forward, parallel_dims.pp_enabled),
            cpu_offload=training.enable_cpu_offload and device_type != "cpu",
        )
        if training.enable_cpu_offload and device_type == "cpu":
            logger.warning("training.enable_cpu_offload ignored: the parameters already live on the CPU")
    elif parallel_dims.dp_replicate > 1:
        if parallel_dims.tp_enabled or parallel_dims.pp_enabled:
            raise ValueError(
                "DDP (dp_replicate > 1 with dp_shard = 1) does not combine with tp or pp; use HSDP "
                "(dp_shard > 1) or FSDP instead"
            )
        apply_ddp(model, parallel_dims.submesh("dp_replicate"), compile.enable)
    return model


# ---- tensor parallel ---------------------------------------------------------------------


def check_tp_degrees(args, tp: int) -> None:
    if args.n_heads % tp or args.n_kv_heads % tp:
        raise ValueError(
            f"tensor parallel degree parallelism.tp={tp} must divide both n_heads={args.n_heads} and "
            f"n_kv_heads={args.n_kv_heads} (each rank holds whole heads); pick a tp that divides both"
        )


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, styles: dict | None = None) -> None:
    """Megatron-style TP with sequence parallel norms (activations between blocks are [B, T/tp, D]).

    Attention and the MLP get the full sequence (PrepareModuleInput all-gathers T), so RoPE
    slices freqs_cis[:T] exactly as on one device; wo / w2 reduce-scatter back to T/tp.

    The residual stream between blocks stays a DTensor (Shard(1)): the embedding, wo and w2
    keep ``use_local_output=False``. Why: with plain local tensors at the block boundary, a
    per-block torch.compile (torch 2.13, CPU) fails in backward with "'Tensor' object has no
    attribute '_local_tensor'": the graph's from_local/to_local at its edges hands a plain
    gradient to DTensor's redistribute backward. DTensor in, DTensor out traces cleanly and
    matches eager (tests/test_parallel.py, tp+sp+compile).

    ``styles`` swaps the block's styles (float8: cast before the all-gather); the embedding,
    norms and output projection always use the plain ones (they stay in high precision).
    """
    styles = styles or {}
    colwise = styles.get("colwise", ColwiseParallel)
    rowwise = styles.get("rowwise", RowwiseParallel)
    prepare_input = styles.get("prepare_input", PrepareModuleInput)
    top_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            # Vocab-sharded logits for loss_parallel; else all-gathered full logits.
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    # Pipeline stages may lack some of these.
    parallelize_module(model, tp_mesh, {k: v for k, v in top_plan.items() if getattr(model, k, None) is not None})
    block_plan = {
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
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
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


# ---- activation checkpointing ----------------------------------------------------------

# Ops whose outputs the op-level policy keeps: recomputing them costs the most FLOPs per byte.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmuls
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
    """Compile each block on its own: same graph for every layer, so it compiles once.

    Under TP the blocks take and return Shard(1) DTensors (see apply_tp), which is what keeps
    per-block compile working together with sequence parallel.
    """
    for block in model.layers.children():
        block.compile(backend=cfg.backend, fullgraph=True)
    logger.info(f"compiled each transformer block with torch.compile (backend {cfg.backend})")


# ---- data parallel -----------------------------------------------------------------------


def fsdp_mesh(dims: ParallelDims) -> DeviceMesh:
    """1-D dp_shard_cp mesh for FSDP; for HSDP the 2-D (dp_replicate, dp_shard_cp) mesh."""
    if dims.dp_replicate == 1:
        return dims.submesh("dp_shard_cp")
    if dims.cp == 1:
        return dims.mesh["dp_replicate", "dp_shard"]  # real dims only, nothing flattened
    # Flatten (dp_shard, cp) under the root and slice it with dp_replicate.
    return dims.mesh["dp_replicate", "dp_shard_cp"]


def mp_policy(training: TrainingConfig, device_type: str) -> MixedPrecisionPolicy:
    param = training.mixed_precision_param or ("bfloat16" if device_type == "cuda" else "float32")
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, param), reduce_dtype=getattr(torch, training.mixed_precision_reduce)
    )


def reshard_after_forward(policy: str, pp_enabled: bool) -> bool | None:
    """'always' / 'never'; 'default' reshards unless PP (microbatches would re-gather each time).

    None means FSDP's own choice per block (see apply_fsdp for the last block).
    """
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy == "default":
        return not pp_enabled
    raise ValueError(f"parallelism.fsdp_reshard_after_forward {policy!r}: use default, always or never")


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy, reshard: bool,
               cpu_offload: bool = False) -> None:
    """fully_shard each block, then the root (embedding, final norm, output).

    The last block is not resharded after forward: backward starts with it right away,
    so its all-gather would be wasted (torchtitan does the same).
    """
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    kind = "HSDP" if mesh.ndim == 2 else "FSDP"
    logger.info(f"{kind} over mesh {mesh.mesh_dim_names} {tuple(mesh.shape)}, {mp}, offload={cpu_offload}")


def apply_ddp(model: nn.Module, mesh: DeviceMesh, compiled: bool) -> None:
    from torch.distributed._composable.replicate import replicate

    if compiled:
        # Let dynamo split compiled graphs at DDP bucket boundaries so all-reduces overlap.
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    replicate(model, device_mesh=mesh, bucket_cap_mb=100)
    logger.info(f"DDP over dp_replicate={mesh.size()}")
