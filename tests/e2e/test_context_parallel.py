"""The backend-neutral CP attention against full causal attention, forward and backward."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from torchtitan.parallelisms.context_parallel import local_positions, shard_sequence
from torchtitan.parallelisms.utils import free_port as _free_port


def test_load_balanced_positions():
    # cp=2, T=8: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    x = torch.arange(8)[None, :]
    assert torch.equal(torch.cat([shard_sequence(x, 2, r) for r in range(2)], 1).sort().values, x)
    # every rank gets the same causal work: sum of (position + 1) over its queries
    work = [int((local_positions(64, 4, r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1


def test_seq_len_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 2 x cp = 4"):
        local_positions(10, 2, 0)


def _worker(rank: int, world: int, port: int, results):
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan.parallelisms.context_parallel import AllGatherCPAttention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        torch.manual_seed(0)
        B, H, T, E = 2, 3, 16, 8
        q, k, v, g = (torch.randn(B, H, T, E, dtype=torch.float64) for _ in range(4))
        q_full, k_full, v_full = (t.clone().requires_grad_() for t in (q, k, v))
        out_full = F.scaled_dot_product_attention(q_full, k_full, v_full, is_causal=True)
        (out_full * g).sum().backward()

        shard = lambda t: shard_sequence(t, world, rank, seq_dim=2)  # noqa: E731
        q_l, k_l, v_l = (shard(t).clone().requires_grad_() for t in (q, k, v))
        out = AllGatherCPAttention(mesh, T)(q_l, k_l, v_l)
        (out * shard(g)).sum().backward()
        errors = [
            (out - shard(out_full)).abs().max().item(),
            (q_l.grad - shard(q_full.grad)).abs().max().item(),
            (k_l.grad - shard(k_full.grad)).abs().max().item(),
            (v_l.grad - shard(v_full.grad)).abs().max().item(),
        ]
        results[rank] = errors
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_all_gather_cp_attention_matches_full_attention(world):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    for rank in range(world):
        assert max(results[rank]) < 1e-12, (rank, results[rank])  # out, dq, dk, dv in float64
