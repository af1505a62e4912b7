"""Data parallel for any family: FSDP2 / HSDP per block + root, or DDP; the mixed-precision policy.

Applied last in every family's plan (after TP, CP, AC and compile) so FSDP's hooks stay
outside the compiled graphs. The blocks are the children of ``model.layers``; the root holds
the rest (embedding, final norm, output head).
"""

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from torchtitan.config.job_config import Parallelism as ParallelismConfig
from torchtitan.config.job_config import Training as TrainingConfig
from torchtitan.parallelisms.expert_parallel import apply_moe_fsdp
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger


def apply_data_parallel(model: nn.Module, dims: ParallelDims, parallelism: ParallelismConfig,
                        training: TrainingConfig, compiled: bool) -> None:
    """FSDP/HSDP when dp_shard x cp > 1, DDP when only dp_replicate > 1, else nothing."""
    device_type = dims.mesh.device_type
    if dims.fsdp_enabled:
        apply_fsdp(
            model, dims, mp_policy(training, device_type),
            reshard_after_forward(parallelism.fsdp_reshard_after_forward, dims.pp_enabled),
            cpu_offload=training.enable_cpu_offload and device_type != "cpu",
        )
        if training.enable_cpu_offload and device_type == "cpu":
            logger.warning("training.enable_cpu_offload ignored: the parameters already live on the CPU")
    elif dims.dp_replicate > 1:
        if dims.tp_enabled or dims.pp_enabled:
            raise ValueError(
                "DDP (dp_replicate > 1 with dp_shard = 1) does not combine with tp or pp; use HSDP "
                "(dp_shard > 1) or FSDP instead"
            )
        apply_ddp(model, dims.submesh("dp_replicate"), compiled)


def mp_policy(training: TrainingConfig, device_type: str) -> MixedPrecisionPolicy:
    param = training.mixed_precision_param or ("bfloat16" if device_type == "cuda" else "float32")
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, param), reduce_dtype=getattr(torch, training.mixed_precision_reduce)
    )


def reshard_after_forward(policy: str, pp_enabled: bool) -> bool:
    """'always' / 'never'; 'default' reshards unless PP (microbatches would re-gather each time)."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy == "default":
        return not pp_enabled
    raise ValueError(f"parallelism.fsdp_reshard_after_forward {policy!r}: use default, always or never")


def apply_fsdp(model: nn.Module, dims: ParallelDims, mp: MixedPrecisionPolicy, reshard: bool,
               cpu_offload: bool = False) -> None:
    """fully_shard each block, then the root (embedding, final norm, output).

    The last block is not resharded after forward: backward starts with it right away,
    so its all-gather would be wasted (torchtitan does the same). Under expert parallelism
    the experts of each MoE block are sharded first, over the data-parallel ranks left
    outside the EP group (expert_parallel.apply_moe_fsdp), so the block skips them.
    """
    mesh = dims.fsdp_mesh()
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        block_reshard = reshard and i < len(blocks) - 1
        if dims.ep_enabled and getattr(block, "moe_enabled", False):
            apply_moe_fsdp(block, dims.expert_fsdp_mesh(), mp, block_reshard, dims.fsdp_gradient_divide_factor)
        fully_shard(block, reshard_after_forward=block_reshard, **kwargs)
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

