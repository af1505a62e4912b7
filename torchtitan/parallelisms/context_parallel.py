"""Context parallelism: the sequence is split across ``cp`` ranks.

Load balancing: the sequence is cut into ``2 x cp`` chunks and rank ``r`` holds chunks
``r`` and ``2cp - 1 - r`` (a head and a tail), so under the causal mask every rank does
the same attention work. Each rank passes the model the true positions of its tokens, so the
rotation of its tokens is the one they would get in the full sequence, and a block-causal
(document) mask compares the true positions and document ids of queries and keys.

Two attention back-ends:

* ``AllGatherCPAttention`` (any device, gloo included): each rank all-gathers K and V
  with autograd-aware functional collectives (the backward is a reduce-scatter of their
  gradients), restores the global chunk order and attends with a mask built from the
  true positions of its queries. Memory for K/V grows with the full sequence, compute
  stays balanced. torch's own ``context_parallel`` has no CPU kernel rules, so this is
  what makes CP run (and be tested) on CPU.
* On CUDA, torch's ``context_parallel`` (ring attention, ``cp_rotate_method``
  allgather | alltoall).
"""

import contextlib

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.models.layers import AttentionInputs, sdpa_document_mask


def chunk_order(cp: int) -> list[list[int]]:
    """For each rank, the two global chunk indices it holds (out of 2 x cp)."""
    return [[r, 2 * cp - 1 - r] for r in range(cp)]


def local_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions of this rank's tokens, in local order: [seq_len // cp]."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"training.seq_len={seq_len} must be divisible by 2 x cp = {2 * cp} for load-balanced "
            f"context parallelism; pick a multiple of {2 * cp}"
        )
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunk_order(cp)[rank]])


def shard_sequence(x_BT: torch.Tensor, cp: int, rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This rank's load-balanced slice of a tensor along its sequence dim."""
    chunks = x_BT.chunk(2 * cp, dim=seq_dim)
    return torch.cat([chunks[c] for c in chunk_order(cp)[rank]], dim=seq_dim)


def unshard_sequence(gathered: torch.Tensor, cp: int, seq_dim: int) -> torch.Tensor:
    """The global order of chunks all-gathered rank-major along ``seq_dim`` (the inverse of sharding)."""
    chunks = gathered.chunk(2 * cp, dim=seq_dim)
    return torch.cat([chunks[i] for i in _global_order_index(cp)], dim=seq_dim)


def _global_order_index(cp: int) -> list[int]:
    """Position, in the all-gathered (rank-major) chunk list, of global chunk 0, 1, ..."""
    gathered = [c for pair in chunk_order(cp) for c in pair]
    return [gathered.index(c) for c in range(2 * cp)]


class AllGatherCPAttention(nn.Module):
    """Causal attention of local queries over all-gathered keys and values (see module doc)."""

    def __init__(self, cp_mesh: DeviceMesh, seq_len: int):
        super().__init__()
        self.cp_mesh = cp_mesh
        self.cp = cp_mesh.size()
        self.rank = cp_mesh.get_local_rank()
        self.seq_len = seq_len
        self.q_pos = local_positions(seq_len, self.cp, self.rank)
        # True = may attend: key position <= query position. [T_local, T]. A plain attribute, not
        # a buffer: the model is built on meta and to_empty would leave a buffer uninitialized.
        self.mask = torch.arange(seq_len)[None, :] <= self.q_pos[:, None]

    def _gather_global(self, x_BHTE: torch.Tensor) -> torch.Tensor:
        gathered = funcol.all_gather_tensor_autograd(x_BHTE.contiguous(), gather_dim=2, group=self.cp_mesh)
        return unshard_sequence(gathered, self.cp, seq_dim=2)

    def build_mask(self, attn: AttentionInputs):
        """Block-causal mask [B, 1, T_local, T] of local queries over all keys (once per forward)."""
        if attn.document_ids_BT is None:
            return None
        local_BT = attn.document_ids_BT.contiguous()
        global_BT = unshard_sequence(funcol.all_gather_tensor(local_BT, gather_dim=1, group=self.cp_mesh), self.cp, 1)
        q_pos = self.q_pos.to(local_BT.device)
        return sdpa_document_mask(local_BT, global_BT, q_pos, torch.arange(self.seq_len, device=local_BT.device))

    def forward(self, q_BHTE: torch.Tensor, k_BHTE: torch.Tensor, v_BHTE: torch.Tensor,
                attn: AttentionInputs | None = None) -> torch.Tensor:
        k_full, v_full = self._gather_global(k_BHTE), self._gather_global(v_BHTE)
        if self.mask.device != q_BHTE.device:
            self.mask = self.mask.to(q_BHTE.device)
        mask = attn.mask if attn is not None and attn.mask is not None else self.mask
        return F.scaled_dot_product_attention(q_BHTE, k_full, v_full, attn_mask=mask)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> None:
    """Swap each block's attention for the all-gather CP attention (before FSDP wraps the blocks)."""
    for block in model.layers.values():
        block.attention.sdpa = AllGatherCPAttention(cp_mesh, seq_len)


class ContextParallel:
    """What the trainer needs from CP: prepare the model, then shard every batch.

    ``backend``: "allgather" (ours, any device) or "torch" (torch's ring attention,
    CUDA only); "auto" picks torch's on CUDA and ours elsewhere.
    """

    def __init__(self, cp_mesh: DeviceMesh, seq_len: int, backend: str, rotate_method: str, device_type: str):
        if backend == "auto":
            backend = "torch" if device_type == "cuda" else "allgather"
        if backend == "torch" and device_type != "cuda":
            raise ValueError(
                "parallelism.cp_backend='torch' needs CUDA: torch's context_parallel has no CPU attention "
                "kernel rules. Use cp_backend='allgather' (or 'auto')"
            )
        if backend not in ("torch", "allgather"):
            raise ValueError(f"parallelism.cp_backend {backend!r}: use auto, allgather or torch")
        self.mesh, self.seq_len, self.backend, self.rotate_method = cp_mesh, seq_len, backend, rotate_method
        self.cp, self.rank = cp_mesh.size(), cp_mesh.get_local_rank()
        local_positions(seq_len, self.cp, 0)  # validates seq_len % (2 cp) now, not at the first step

    def prepare_model(self, model: nn.Module) -> None:
        if self.backend == "allgather":
            apply_cp(model, self.mesh, self.seq_len)

    def check_document_inputs(self, block_causal: bool, document_positions: bool) -> None:
        if self.backend == "torch" and (block_causal or document_positions):
            raise ValueError(
                "model.attention_mask='block_causal' and model.positions='document' under context parallel need "
                "parallelism.cp_backend='allgather' (torch's ring attention is causal-only here)"
            )

    def batch_context(self, model_parts: list[nn.Module], inputs_BT: torch.Tensor, labels_BT: torch.Tensor,
                      positions_BT: torch.Tensor | None = None, document_ids_BT: torch.Tensor | None = None):
        """(inputs, labels, model kwargs, context): this rank's share of the batch, the model's
        keyword inputs, and a context for forward + backward."""
        if self.backend == "allgather":
            shard = lambda x: shard_sequence(x, self.cp, self.rank)  # noqa: E731
            if positions_BT is None:  # the true places of this rank's tokens in the sequence
                local = local_positions(self.seq_len, self.cp, self.rank, device=inputs_BT.device)
                positions_BT = local.expand(inputs_BT.shape[0], -1)
            else:
                positions_BT = shard(positions_BT)
            kwargs = {"positions": positions_BT}
            if document_ids_BT is not None:
                kwargs["document_ids"] = shard(document_ids_BT)
            return shard(inputs_BT), shard(labels_BT), kwargs, contextlib.nullcontext()
        return inputs_BT, labels_BT, {}, self._torch_context(model_parts, inputs_BT, labels_BT)

    def _torch_context(self, model_parts, inputs_BT, labels_BT):
        # torch shards the listed buffers in place on entry (head-tail load balancing) and
        # restores those not in no_restore_buffers on exit; SDPA calls inside become ring attention.
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method(self.rotate_method)
        freqs = [m.freqs_cis for m in model_parts]
        return context_parallel(
            self.mesh,
            buffers=[inputs_BT, labels_BT, *freqs],
            buffer_seq_dims=[1, 1, *[0] * len(freqs)],
            no_restore_buffers={inputs_BT, labels_BT},
        )
