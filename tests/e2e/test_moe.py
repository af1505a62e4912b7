"""Mixture of experts: routing vs Hugging Face, grouped GEMM vs loop, aux-loss gradients, statistics,
ParallelDims with ep, and EP / EP x TP / FSDP x EP on gloo vs one process (same global tokens)."""

import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torchtitan.models.moe import GroupedExperts, MoE, MoEArgs, load_balance_loss, moe_modules, z_loss
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.utils import free_port

DIM = 8


def _moe(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    args = dict(num_experts=4, top_k=2, hidden_dim=16)
    args.update(kw)
    moe = MoE(MoEArgs(**args), DIM)
    moe.init_weights(0.1)
    nn.init.normal_(moe.router.gate.weight, std=0.5)  # sharper routing than the init's
    return moe


# ---------------------------------------------------------------- routing
def _hf_routing(x_ND, gate_w, top_k):
    """Qwen3MoeTopKRouter as written in transformers 5.x (softmax fp32, topk, renormalise, cast)."""
    logits = F.linear(x_ND, gate_w)
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_matches_hf_routing(dtype):
    moe = _moe().to(dtype)
    x_ND = torch.randn(32, DIM, dtype=dtype)
    weights, experts, _, _ = moe.router(x_ND)
    ref_w, ref_e = _hf_routing(x_ND, moe.router.gate.weight, 2)
    assert torch.equal(experts, ref_e)
    assert weights.dtype == dtype and torch.equal(weights, ref_w)


def test_moe_matches_hf_qwen3_moe_block():
    qwen3 = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    cfg = qwen3.Qwen3MoeConfig(hidden_size=DIM, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                               norm_topk_prob=True, hidden_act="silu")
    hf = qwen3.Qwen3MoeSparseMoeBlock(cfg)
    moe = _moe()
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=1))
        hf.experts.down_proj.copy_(moe.experts.w2)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(moe(x), hf(x), atol=1e-6, rtol=1e-5)


def test_sigmoid_bias_steers_choice_not_weights():
    moe = _moe(score_func="sigmoid", load_balance_coeff=0.1, norm_topk_prob=False)
    x_ND = torch.randn(16, DIM)
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    weights, experts, scores, _ = moe.router(x_ND, moe.expert_bias)
    assert (experts == 3).any(dim=-1).all()  # the bias forces expert 3 in
    torch.testing.assert_close(weights, scores.gather(-1, experts))


def test_top_k_above_num_experts_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k=5.*num_experts=4"):
        MoEArgs(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="score_func"):
        MoEArgs(score_func="relu")


# ---------------------------------------------------------------- experts
def _experts_and_tokens(counts):
    torch.manual_seed(1)
    experts = GroupedExperts(DIM, 16, len(counts))
    experts.init_weights(0.1)
    counts_E = torch.tensor(counts)
    return experts, torch.randn(int(counts_E.sum()), DIM, requires_grad=True), counts_E


def _run(experts, x, counts_E, grouped: bool):
    experts.use_grouped_mm = grouped
    experts.zero_grad()
    x.grad = None
    out = experts(x, counts_E)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad.clone(), [p.grad.clone() for p in experts.parameters()]


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [0, 0, 0, 0]])
def test_grouped_mm_equals_loop_forward_and_backward(counts):
    """The custom grouped-GEMM backward vs autograd through the per-expert loop (empty experts too)."""
    experts, x, counts_E = _experts_and_tokens(counts)
    got, ref = _run(experts, x, counts_E, True), _run(experts, x, counts_E, False)
    for a, b in zip(got[:2] + tuple(got[2]), ref[:2] + tuple(ref[2])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for e, n in enumerate(counts):  # an expert without tokens gets a zero gradient
        if n == 0:
            assert all(g[e].abs().max() == 0 for g in got[2])


def test_grouped_mm_bf16_runs_forward_and_backward():
    experts, x, counts_E = _experts_and_tokens([3, 0, 5, 2])
    experts, x = experts.to(torch.bfloat16), x.detach().to(torch.bfloat16).requires_grad_(True)
    assert experts._grouped_mm_ok(x, experts.w1)
    got, ref = _run(experts, x, counts_E, True), _run(experts, x, counts_E, False)
    for a, b in zip(got[:2] + tuple(got[2]), ref[:2] + tuple(ref[2])):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_dropless_every_token_reaches_top_k_experts():
    moe = _moe()
    moe(torch.randn(3, 7, DIM))
    stats = moe.pop_stats()
    assert stats["tokens_per_expert"].sum() == 3 * 7 * 2 and stats["forwards"] == 1
    assert moe.pop_stats()["forwards"] == 0  # popped = reset


# ---------------------------------------------------------------- aux losses and statistics
def test_aux_loss_gradient_equals_adding_it_to_the_loss():
    coeffs = dict(aux_loss_coeff=0.3, z_loss_coeff=0.05, num_shared_experts=1)
    moe, ref = _moe(**coeffs), _moe(num_shared_experts=1)
    moe.aux_loss_scale = 0.5
    x = torch.randn(2, 6, DIM)
    moe(x).sum().backward()
    _, experts_NK, scores_NE, logits_NE = ref.router(x.view(-1, DIM))
    counts_E = torch.bincount(experts_NK.flatten(), minlength=4)
    aux = 0.5 * (0.3 * load_balance_loss(counts_E, scores_NE, "softmax") + 0.05 * z_loss(logits_NE))
    (ref(x).sum() + aux).backward()
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=name)
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_activation_checkpointing_counts_once_and_matches():
    moe, ref = _moe(aux_loss_coeff=0.1), _moe(aux_loss_coeff=0.1)
    x = torch.randn(2, 6, DIM)
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    ref(x).sum().backward()
    got, want = moe.pop_stats(), ref.pop_stats()
    assert got["forwards"] == 1
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    for p, q in zip(moe.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6)


def test_expert_bias_update_and_moe_modules():
    moe = _moe(load_balance_coeff=0.01)
    moe.update_expert_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert "expert_bias" in moe.state_dict()
    model = nn.Module()
    model.layers = nn.ModuleDict({"0": nn.Module()})
    model.layers["0"].moe = moe
    model.layers["0"] = torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper(
        model.layers["0"])
    assert list(moe_modules(model)) == ["layers.0.moe"]


# ---------------------------------------------------------------- ParallelDims with ep
@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=16)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kw, match", [
    (dict(ep=0), "ep must be >= 1"),
    (dict(ep=3), "must divide dp_shard x cp"),
    (dict(ep=2, cp=4, dp_shard=2), "multiple of cp=4"),
])
def test_parallel_dims_ep_errors(kw, match):
    args = dict(dp_replicate=1, dp_shard=4, cp=1, tp=1, pp=1, world_size=4)
    args.update(kw)
    args["world_size"] = args["dp_shard"] * args["cp"]
    with pytest.raises(ValueError, match=match):
        ParallelDims(**args)


def test_parallel_dims_ep_mesh_names(fake_world):
    dims = ParallelDims(2, 4, 2, 1, 1, 16, ep=4)  # positional callers keep working
    mesh = dims.build_mesh("cpu")
    assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp")
    sizes = {n: dims.submesh(n).size() for n in ("dp", "dp_shard", "dp_shard_cp", "dp_cp", "ep")}
    assert sizes == {"dp": 8, "dp_shard": 4, "dp_shard_cp": 8, "dp_cp": 16, "ep": 4}
    assert dims.fsdp_mesh().mesh_dim_names == ("dp_replicate", "dp_shard_cp")
    assert tuple(dims.expert_fsdp_mesh().shape) == (2, 2) and dims.fsdp_gradient_divide_factor == 16
    plain = ParallelDims(2, 4, 2, 1, 1, 16)
    assert plain.build_mesh("cpu").mesh_dim_names == ("dp_replicate", "dp_shard", "cp") and not plain.ep_enabled


# ---------------------------------------------------------------- multi-process: EP, EP x TP, FSDP x EP
class _Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return x + self.moe(x)


class _TinyMoEModel(nn.Module):
    """One MoE in ``layers`` (what apply_moe_ep_tp and FSDP walk)."""

    def __init__(self, moe):
        super().__init__()
        self.layers = nn.ModuleDict({"0": _Block(moe)})

    def forward(self, x):
        return self.layers["0"](x)


def _global_problem(world: int):
    ref = _TinyMoEModel(_moe(seed=3, num_shared_experts=1))
    torch.manual_seed(4)
    x = torch.randn(world, 4, DIM)  # batch = one row per data-parallel rank
    g = torch.randn(world, 4, DIM)  # d loss / d output
    return ref, x, g


def _reference_grads(ref, x, g, scale: float):
    x = x.clone().requires_grad_(True)
    out = ref(x)
    ((out * g).sum() * scale).backward()
    return out.detach(), x.grad, {n: p.grad for n, p in ref.named_parameters()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check(case, got_out, want_out, got_grads, want_grads, group=None, sum_plain=False, what="output"):
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5, msg=f"{case}: {what}")
    for name, want in want_grads.items():
        got = got_grads[name]
        if sum_plain:  # data-parallel ranks each hold the gradient of their own tokens
            dist.all_reduce(got, group=group)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{case}: grad {name}")


def _ep_case(rank, world):
    """EP over all ranks, no FSDP: expert grads are complete shards, the rest summed over ranks."""
    from torchtitan.parallelisms.expert_parallel import apply_moe_ep_tp

    ref, x, g = _global_problem(world)
    model = copy.deepcopy(ref)
    want = _reference_grads(ref, x, g, 1.0)
    mesh = dist.device_mesh.init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    apply_moe_ep_tp(model, None, mesh, None)
    x_local = x[rank:rank + 1].clone().requires_grad_(True)
    out = model(x_local)
    (out * g[rank:rank + 1]).sum().backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    experts = {n: grads.pop(n) for n in list(grads) if ".experts." in n}
    _check("ep", out.detach(), want[0][rank:rank + 1], experts, {n: want[2][n] for n in experts})
    _check("ep", x_local.grad, want[1][rank:rank + 1], grads, {n: want[2][n] for n in grads}, sum_plain=True,
           what="input grad")


def _tp_case(rank, world):
    """TP only: every rank holds all tokens of the batch and a slice of each expert's hidden dim."""
    from torch.distributed.tensor import DTensor, Shard

    from torchtitan.parallelisms.expert_parallel import apply_moe_ep_tp

    ref, x, g = _global_problem(1)
    model = copy.deepcopy(ref)
    want = _reference_grads(ref, x, g, 1.0)
    mesh = dist.device_mesh.init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    apply_moe_ep_tp(model, mesh, None, None)
    span = slice(2 * rank, 2 * rank + 2)
    x_local = x[:, span].clone().requires_grad_(True)
    out = model(DTensor.from_local(x_local, mesh, [Shard(1)]))
    (out.to_local() * g[:, span]).sum().backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    _check("tp", out.to_local().detach(), want[0][:, span], grads, want[2])
    torch.testing.assert_close(x_local.grad, want[1][:, span], atol=1e-5, rtol=1e-5, msg="tp: input grad")


def _ep_tp_case(rank, world):
    """EP2 x TP2: the sequence is Shard(1) over tp, the batch split over ep."""
    from torch.distributed.tensor import DTensor, Shard

    from torchtitan.parallelisms.expert_parallel import apply_moe_ep_tp

    dims = ParallelDims(1, 2, 1, 2, 1, world, ep=2)
    dims.build_mesh("cpu")
    ref, x, g = _global_problem(2)
    model = copy.deepcopy(ref)
    want = _reference_grads(ref, x, g, 1.0)
    apply_moe_ep_tp(model, dims.submesh("tp"), dims.ep_mesh(), dims.ep_tp_mesh())
    b, t = dims.coordinate("ep"), dims.coordinate("tp")
    x_local = x[b:b + 1, 2 * t:2 * t + 2].clone().requires_grad_(True)
    out = model(DTensor.from_local(x_local, dims.submesh("tp"), [Shard(1)]))
    assert isinstance(out, DTensor) and out.placements == (Shard(1),)
    (out.to_local() * g[b:b + 1, 2 * t:2 * t + 2]).sum().backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    experts = {n: grads.pop(n) for n in list(grads) if ".experts." in n}
    _check("ep_tp", out.to_local().detach(), want[0][b:b + 1, 2 * t:2 * t + 2], experts,
           {n: want[2][n] for n in experts})
    ep_group = dims.ep_mesh().get_group()
    _check("ep_tp", x_local.grad, want[1][b:b + 1, 2 * t:2 * t + 2], grads, {n: want[2][n] for n in grads},
           group=ep_group, sum_plain=True, what="input grad")


def _fsdp_ep_case(rank, world):
    """FSDP over 4 ranks, EP2 inside: experts' FSDP over the 2 ranks outside their EP group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from torchtitan.parallelisms.expert_parallel import apply_moe_ep_tp, apply_moe_fsdp

    dims = ParallelDims(1, world, 1, 1, 1, world, ep=2)
    dims.build_mesh("cpu")
    ref, x, g = _global_problem(world)
    model = copy.deepcopy(ref)
    want = _reference_grads(ref, x, g, 1.0 / world)  # FSDP averages over the ranks
    apply_moe_ep_tp(model, None, dims.ep_mesh(), None)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    block = model.layers["0"]
    apply_moe_fsdp(block, dims.expert_fsdp_mesh(), mp_policy, True, dims.fsdp_gradient_divide_factor)
    fully_shard(block, mesh=dims.fsdp_mesh(), mp_policy=mp_policy)
    fully_shard(model, mesh=dims.fsdp_mesh(), mp_policy=mp_policy)
    dp = dims.dp_rank
    x_local = x[dp:dp + 1].clone().requires_grad_(True)
    out = model(x_local)
    (out * g[dp:dp + 1]).sum().backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    _check("fsdp_ep", out.detach(), want[0][dp:dp + 1], grads, want[2])
    torch.testing.assert_close(x_local.grad, world * want[1][dp:dp + 1], atol=1e-5, rtol=1e-5)


_CASES = {"ep": _ep_case, "tp": _tp_case, "ep_tp": _ep_tp_case, "fsdp_ep": _fsdp_ep_case}


def _worker(rank, world, port, cases, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for case in cases:
            _CASES[case](rank, world)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise e
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(world: int, cases: list[str]):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, free_port(), cases, errors), nprocs=world, start_method="spawn")
    except Exception as e:  # noqa: BLE001
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        raise AssertionError("\n".join(msgs) or str(e)) from None


def test_ep2_and_tp2_match_one_process():
    _spawn(2, ["ep", "tp"])


def test_ep2_tp2_and_fsdp4_ep2_match_one_process():
    _spawn(4, ["ep_tp", "fsdp_ep"])
