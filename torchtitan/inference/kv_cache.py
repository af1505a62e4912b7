"""A static KV cache, installed by swapping each attention layer's kernel (``layer.attention.sdpa``).

    with kv_cache(model, batch_size=B, max_len=S):
        logits = model(prompt_BT, positions=positions_BT)   # prefill: writes slots 0..T-1
        logits = model(next_B1, positions=pos_B1)            # decode: one token per row

The model code is untouched: every attention layer calls ``sdpa(q, k, v, attn)`` with q/k/v after
RoPE (k/v repeated to the query heads) and ``attn.positions_BT``; the kernel swapped in here writes
k/v into its preallocated cache at those positions and attends over the cache. On exit the
original kernels are back, so the same model trains or evaluates afterwards.

The cache slot of a token is its RoPE position. A row of a batch may therefore stand at another
position than its neighbours (prompts of different lengths, right-padded): the query at position
p reads the slots 0..p of its own row, nothing else. Pad tokens of a shorter prompt sit at
positions after its last real token: no real token reads them during the prefill, and that row's
decode steps overwrite them one by one (a slot is written before it is read). So padding changes
no number: a batched prompt computes what it computes alone.

Per layer the cache holds [B, K_local, max_len, E] for keys and values: the kv heads only (the
repeated copies are dropped on write and SDPA's ``enable_gqa`` reads them per query head), which
makes the cache n_heads / n_kv_heads times smaller than one of query heads. Under tensor parallel
each rank's attention sees its own heads (plain local tensors), so each rank caches its own slice.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.layers import AttentionInputs


class _StepState:
    """What all layers of one forward share: the attended length and the mask, built once.

    Keyed on the positions tensor itself (every layer of one forward gets the same object).
    """

    def __init__(self):
        self._positions: Optional[torch.Tensor] = None
        self._length = 0
        self._mask: Optional[torch.Tensor] = None

    def length_and_mask(self, positions_BT: torch.Tensor, max_len: int) -> tuple[int, torch.Tensor]:
        if positions_BT is not self._positions:
            # One host sync per forward (not per layer): attend over slots 0..max position only.
            high, low = torch.stack([positions_BT.max(), positions_BT.min()]).tolist()
            length = high + 1
            if length > max_len or low < 0:
                raise ValueError(
                    f"positions run up to {length - 1}, outside the KV cache of {max_len} slots; "
                    f"build the cache with max_len >= prompt + new tokens"
                )
            slots_S = torch.arange(length, device=positions_BT.device)
            self._mask = (slots_S[None, None, :] <= positions_BT[:, :, None]).unsqueeze(1)  # [B, 1, T, S]
            self._positions, self._length = positions_BT, length
        return self._length, self._mask


class KVCacheAttention(nn.Module):
    """The attention kernel with a static cache; replaces ``attention.sdpa`` (see the module docstring)."""

    def __init__(self, n_rep: int, batch_size: int, max_len: int, step: _StepState):
        super().__init__()
        self.n_rep, self.batch_size, self.max_len, self.step = n_rep, batch_size, max_len, step
        # Allocated at the first call, when the local head count, head dim, dtype and device are known.
        self.k_cache_BKSE: Optional[torch.Tensor] = None
        self.v_cache_BKSE: Optional[torch.Tensor] = None

    def build_mask(self, attn: AttentionInputs):
        return None  # the mask is this kernel's own (from the positions)

    def forward(self, q_BHTE: torch.Tensor, k_BHTE: torch.Tensor, v_BHTE: torch.Tensor,
                attn: Optional[AttentionInputs] = None) -> torch.Tensor:
        if attn is None or attn.positions_BT is None:
            raise ValueError("the KV cache needs each token's position: call model(tokens, positions=positions_BT)")
        if attn.document_ids_BT is not None:
            raise ValueError("the KV cache holds one sequence per row: call the model without document_ids")
        positions_BT = attn.positions_BT
        # k/v come repeated to the query heads (head h reads kv head h // n_rep): keep one copy each.
        k_BKTE, v_BKTE = k_BHTE[:, :: self.n_rep], v_BHTE[:, :: self.n_rep]
        B, K, T, E = k_BKTE.shape
        assert B == self.batch_size, f"batch of {B} rows, but the KV cache was built for {self.batch_size}"
        if self.k_cache_BKSE is None:
            shape = (B, K, self.max_len, E)
            self.k_cache_BKSE = k_BKTE.new_zeros(shape)
            self.v_cache_BKSE = v_BKTE.new_zeros(shape)
        length, mask_B1TS = self.step.length_and_mask(positions_BT, self.max_len)
        slots_BKTE = positions_BT[:, None, :, None].expand(B, K, T, E)
        self.k_cache_BKSE.scatter_(2, slots_BKTE, k_BKTE)
        self.v_cache_BKSE.scatter_(2, slots_BKTE, v_BKTE)
        k_BKSE = self.k_cache_BKSE[:, :, :length]
        v_BKSE = self.v_cache_BKSE[:, :, :length]
        # A boolean mask rules out the flash kernels: torch picks efficient / math attention.
        return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, attn_mask=mask_B1TS, enable_gqa=self.n_rep > 1)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.attention for layer in model.layers.values() if layer is not None]


@contextmanager
def kv_cache(model: nn.Module, batch_size: int, max_len: int) -> Iterator[list[KVCacheAttention]]:
    """Swap every attention kernel of ``model`` for a ``KVCacheAttention`` of ``batch_size`` rows and
    ``max_len`` slots (prompt + new tokens) while inside; the original kernels are back on exit."""
    attentions = _attention_modules(model)
    originals = [a.sdpa for a in attentions]
    step = _StepState()
    caches = [
        KVCacheAttention(a.n_heads // a.n_kv_heads, batch_size, max_len, step) for a in attentions
    ]
    for attention, cache in zip(attentions, caches):
        attention.sdpa = cache
    try:
        yield caches
    finally:
        for attention, original in zip(attentions, originals):
            attention.sdpa = original
