"""Expert parallelism (EP), expert-tensor parallelism (EP x TP) and the MoE's TP plan, for any family.

A family's parallel plan calls ``apply_moe_ep_tp`` after its dense TP plan and ``apply_moe_fsdp``
before each block's ``fully_shard`` (``data_parallel.apply_fsdp`` does the latter).

Token dispatch (EP): ``MoE.forward`` sorts the token copies by global expert; the experts' input
hook sends each EP rank the rows of its experts (all-to-all; counts first, so every rank knows
its split sizes: one host sync per MoE layer) and regroups the received rows by local expert;
the output hook undoes both. Gradients flow through ``all_to_all_single_autograd``.

Gradients under TP (why the hooks below look as they do): inside the MoE every tp rank holds
all the tokens (Replicate) but, with the experts' hidden dim F split over tp, only a partial
sum of each expert's output. So every gradient that reaches the tokens or the routing weights
through the experts is partial over tp and is all-reduced in backward (``_AllReduceBackward``),
which keeps every tensor inside the MoE a plain, full ("Replicate") gradient; the partial expert
outputs are summed once, by the reduce-scatter at the MoE's output (Partial -> Shard(1)).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from torchtitan.models.moe import MoE

# Expert weights [E, F, D] / [E, D, F]: which dim holds the hidden size F (split over tp).
_TP_DIM = {"w1": 1, "w3": 1, "w2": 2}


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward; backward sums the (partial) gradient over ``group`` (Megatron's "f")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _replace_params(module: nn.Module, mesh: DeviceMesh, placements_of) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        dparam = nn.Parameter(distribute_tensor(param, mesh, placements_of(name)), param.requires_grad)
        module.register_parameter(name, dparam)


class _TokenDispatcher:
    """The all-to-all of one forward: its split sizes and local-expert permutation, kept from the
    input hook to the output hook (an activation-checkpoint recompute repeats both in order)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.ep = group, dist.get_world_size(group)
        self._state = None

    def dispatch(self, x_RD: torch.Tensor, counts_E: torch.Tensor):
        """Rows sorted by global expert -> (rows of my experts grouped by local expert, counts_L)."""
        counts_SL = torch.empty_like(counts_E)
        dist.all_to_all_single(counts_SL, counts_E.contiguous(), group=self.group)
        counts_SL = counts_SL.view(self.ep, -1)  # [source rank, my local expert]
        send = counts_E.view(self.ep, -1).sum(dim=1).tolist()  # host sync: the split sizes
        recv = counts_SL.sum(dim=1).tolist()
        x_recv_RD = all_to_all_single_autograd(x_RD, recv, send, self.group)
        perm = _rank_major_to_expert_major(counts_SL)
        self._state = (send, recv, perm)
        return x_recv_RD[perm], counts_SL.sum(dim=0)

    def combine(self, y_RD: torch.Tensor) -> torch.Tensor:
        send, recv, perm = self._state
        self._state = None
        y_rank_major_RD = torch.empty_like(y_RD).index_copy(0, perm, y_RD)
        return all_to_all_single_autograd(y_rank_major_RD, send, recv, self.group)


def _rank_major_to_expert_major(counts_SL: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder blocks received [source rank][local expert] into [local expert][source rank]."""
    sizes_rm = counts_SL.reshape(-1)
    starts_rm = (torch.cumsum(sizes_rm, 0) - sizes_rm).view_as(counts_SL)
    sizes_em, starts_em = counts_SL.t().reshape(-1), starts_rm.t().reshape(-1)
    block_starts_em = torch.cumsum(sizes_em, 0) - sizes_em
    total = int(sizes_rm.sum())
    within = torch.arange(total, device=counts_SL.device) - torch.repeat_interleave(block_starts_em, sizes_em)
    return torch.repeat_interleave(starts_em, sizes_em) + within


class ExpertParallel(ParallelStyle):
    """GroupedExperts over the 1-D ep mesh: experts split on dim 0, tokens dispatched by all-to-all."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check_divisible(module, device_mesh.size(0))
        dispatcher = _TokenDispatcher(device_mesh.get_group())
        _replace_params(module, device_mesh, lambda name: [Shard(0)])
        module.register_forward_pre_hook(lambda mod, args: dispatcher.dispatch(*args))
        module.register_forward_hook(lambda mod, args, out: dispatcher.combine(out))
        return module

    @staticmethod
    def _check_divisible(module: nn.Module, ep: int) -> None:
        if module.num_experts % ep:
            raise ValueError(
                f"moe num_experts={module.num_experts} is not divisible by the expert-parallel degree "
                f"{ep} (each EP rank holds num_experts / ep experts); pick parallelism.ep dividing it"
            )


class ExpertTensorParallel(ExpertParallel):
    """EP x TP on the 2-D [ep, tp] mesh: experts on dim 0 over ep, hidden dim F over tp.

    Tokens are replicated over tp; each tp slice does its own all-to-all over ep, and the
    expert output is a partial sum over tp (reduced at the MoE's output)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        assert device_mesh.ndim == 2, "ExpertTensorParallel takes the 2-D [ep, tp] mesh"
        self._check_divisible(module, device_mesh.size(0))
        dispatcher = _TokenDispatcher(device_mesh.get_group(0))
        tp_group = device_mesh.get_group(1)
        _replace_params(module, device_mesh, lambda name: [Shard(0), Shard(_TP_DIM[name])])

        def dispatch(mod, args):
            x_RD, counts_E = args
            return dispatcher.dispatch(_AllReduceBackward.apply(x_RD, tp_group), counts_E)

        module.register_forward_pre_hook(dispatch)
        module.register_forward_hook(lambda mod, args, out: dispatcher.combine(out))
        return module


class TensorParallelExperts(ParallelStyle):
    """All experts on every rank, hidden dim F split over tp; output a partial sum over tp."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        _replace_params(module, device_mesh, lambda name: [Shard(_TP_DIM[name])])
        module.register_forward_pre_hook(lambda mod, args: (_AllReduceBackward.apply(args[0], group), *args[1:]))
        return module


class ReplicatedRouter(ParallelStyle):
    """The router under TP: its gate weight a Replicate DTensor (so FSDP and the optimizer see one
    kind of parameter), plain tensors in and out. The routing weights multiply partial expert
    outputs, so their gradient is partial over tp: summed in backward."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        distribute_module(
            module.gate, device_mesh,
            partition_fn=lambda name, mod, mesh: _replace_params(mod, mesh, lambda n: [Replicate()]),
            input_fn=lambda mod, args, mesh: tuple(DTensor.from_local(a, mesh, [Replicate()]) for a in args),
            output_fn=lambda mod, out, mesh: out.to_local(),
        )

        def sum_weight_grads(mod, args, out):
            weights_NK, *rest = out
            return (_AllReduceBackward.apply(weights_NK, group), *rest)

        module.register_forward_hook(sum_weight_grads)
        return module


def moe_tp_plan() -> dict:
    """The MoE's edges and shared expert under TP (the experts are handled by ``apply_moe_ep_tp``).

    The MoE sees the whole sequence (Shard(1) -> Replicate, local) and returns a Shard(1)
    DTensor like the dense FFN's w2: its local output is a partial sum over tp (reduce-scatter).
    """
    return {
        "moe": PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Partial(),), desired_output_layouts=(Shard(1),), use_local_output=False,
        ),
        "moe.router": ReplicatedRouter(),
        "moe.shared_experts.w1": ColwiseParallel(),
        "moe.shared_experts.w3": ColwiseParallel(),
        "moe.shared_experts.w2": RowwiseParallel(output_layouts=Partial()),
    }


def apply_moe_ep_tp(model: nn.Module, tp_mesh: DeviceMesh | None, ep_mesh: DeviceMesh | None,
                    ep_tp_mesh: DeviceMesh | None) -> None:
    """TP plan of every block's ``moe`` and its experts' style: TP -> F split, EP -> experts split,
    both -> ExpertTensorParallel on ``ep_tp_mesh``. Call after the dense TP plan, on meta or real."""
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if not isinstance(moe, MoE):
            continue
        if tp_mesh is not None:
            plan = moe_tp_plan()
            if moe.shared_experts is None:
                plan = {k: v for k, v in plan.items() if not k.startswith("moe.shared_experts")}
            parallelize_module(block, tp_mesh, plan)
        if ep_mesh is not None and tp_mesh is not None:
            assert ep_tp_mesh is not None, "EP x TP needs the 2-D [ep, tp] mesh (ParallelDims.ep_tp_mesh())"
            parallelize_module(moe.experts, ep_tp_mesh, ExpertTensorParallel())
        elif ep_mesh is not None:
            parallelize_module(moe.experts, ep_mesh, ExpertParallel())
        elif tp_mesh is not None:
            parallelize_module(moe.experts, tp_mesh, TensorParallelExperts())


def apply_moe_fsdp(block: nn.Module, expert_fsdp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                   reshard: bool, gradient_divide_factor: float) -> None:
    """fully_shard the block's experts over the data-parallel ranks outside their EP group; call
    BEFORE the block's own fully_shard, which then skips these parameters.

    The all-to-all's backward already summed the expert grads over the EP group, so they are
    divided by the whole data-parallel size, not this smaller mesh's (``gradient_divide_factor``).
    """
    moe = getattr(block, "moe", None)
    if not isinstance(moe, MoE):
        return
    experts = moe.experts
    local_experts = experts.w1.to_local().shape[0] if isinstance(experts.w1, DTensor) else experts.num_experts
    # More FSDP ranks than local experts: shard each expert's rows (dim 1) instead of whole experts.
    shard_dim = 1 if _fsdp_size(expert_fsdp_mesh) > local_experts else 0
    fully_shard(experts, mesh=expert_fsdp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard,
                shard_placement_fn=lambda param: Shard(shard_dim))
    experts.set_gradient_divide_factor(gradient_divide_factor)
    if expert_fsdp_mesh.device_type == "cpu":
        # A custom factor makes FSDP reduce-scatter with PREMUL_SUM, which gloo lacks
        # ("Cannot use ReduceOp.PREMUL_SUM with Gloo"): sum, then divide separately.
        experts.set_force_sum_reduction_for_comms(True)


def _fsdp_size(mesh: DeviceMesh) -> int:
    # HSDP: (replicate, shard): only the last dim shards.
    return mesh.size(mesh.ndim - 1)
