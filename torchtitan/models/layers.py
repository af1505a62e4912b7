"""Layers shared by the model families: RMSNorm, SwiGLU, RoPE tables, (block-)causal attention.

Pure PyTorch, no distributed code. A family's model file imports what it needs from here
(and keeps what is its own: Llama's interleaved RoPE pairs, Qwen3's q/k norms, ...).

Shape suffixes: B batch, T sequence, D model dim, H heads, E head dim, F ffn hidden dim.
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class RoPEScalingArgs:
    """Llama 3.1 frequency scaling: stretches the low frequencies for long context."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# ----------------------------------------------------------------------------- RoPE


def _apply_rope_scaling(inv_freq: torch.Tensor, scaling: RoPEScalingArgs) -> torch.Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend between."""
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def precompute_rope_cos_sin(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    scaling: Optional[RoPEScalingArgs] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """RoPE table of shape (max_seq_len, head_dim // 2, 2) holding (cos, sin), in fp32.

    Stored as real numbers rather than Meta's complex `freqs_cis` because `model.to(bf16)`
    would silently drop the imaginary part of a complex buffer.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is not None:
        inv_freq = _apply_rope_scaling(inv_freq, scaling)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles_TE = torch.outer(positions, inv_freq)
    return torch.stack([angles_TE.cos(), angles_TE.sin()], dim=-1)


def rope_rows(freqs_cis: torch.Tensor, T: int) -> torch.Tensor:
    """The RoPE rows of T tokens as [1 or B, T, 1, E/2, 2] (broadcasts over the heads).

    ``freqs_cis`` is the model's table (rows 0..T-1 are used) or, with explicit positions, the
    rows already gathered per token, [B, T, E/2, 2].
    """
    if freqs_cis.dim() == 3:
        return freqs_cis[:T].unsqueeze(0).unsqueeze(2)
    return freqs_cis.unsqueeze(2)


def apply_rotary_emb(x_BTHE: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by Meta's complex multiply, computed in fp32.

    The table is stored as real (cos, sin) pairs (plain buffers shard, offload and checkpoint
    like any other) and viewed as complex here: one complex multiply is ~3x faster than the
    same rotation spelled out in real arithmetic (fewer kernels, in eager).
    """
    B, T, H, E = x_BTHE.shape
    x_BTHC = torch.view_as_complex(x_BTHE.float().reshape(B, T, H, E // 2, 2))
    freqs_BT1C = torch.view_as_complex(rope_rows(freqs_cis, T).float().contiguous())
    return torch.view_as_real(x_BTHC * freqs_BT1C).flatten(3).type_as(x_BTHE)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Meta's reference (stable under bf16)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


# "auto" lets torch pick per call (flash, then memory-efficient, then math on CUDA; a fused
# flash kernel on CPU). Pinning one makes an unsupported shape or dtype an error instead of
# a silent fall-back to the slow math kernel.
SDPA_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# "flex": FlexAttention (compiled, block-sparse) for document masks; plain causal attention stays on SDPA.
ATTENTION_BACKENDS = (*SDPA_BACKENDS, "flex")


@dataclass
class AttentionInputs:
    """What every attention layer of one forward shares besides its hidden states.

    Built once per forward by ``decoder_forward``; an attention kernel (``Attention.sdpa``, a module
    so that context parallel or a KV cache can swap it) reads what it needs.
    """

    rope: torch.Tensor  # the RoPE table [max_seq_len, E/2, 2], or per-token rows [B, T, E/2, 2]
    positions_BT: Optional[torch.Tensor] = None  # None: 0..T-1
    document_ids_BT: Optional[torch.Tensor] = None  # None: causal; else block-causal within equal ids
    mask: Any = None  # the kernel's document mask, built once per forward by its ``build_mask``


def document_ids_from_positions(positions_BT: torch.Tensor) -> torch.Tensor:
    """Document index of each token from in-document positions (a document starts at position 0)."""
    return (positions_BT == 0).cumsum(dim=1)


def sdpa_document_mask(q_doc_BT: torch.Tensor, k_doc_BS: torch.Tensor,
                       q_pos_T: Optional[torch.Tensor] = None, k_pos_S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, T, S]: True where query t may read key s (same document, s <= t).

    ``q_pos_T`` / ``k_pos_S`` are the tokens' places in the full sequence (context parallel holds the
    queries of two chunks); by default 0..T-1 and 0..S-1.
    """
    T, S = q_doc_BT.shape[1], k_doc_BS.shape[1]
    q_pos_T = torch.arange(T, device=q_doc_BT.device) if q_pos_T is None else q_pos_T
    k_pos_S = torch.arange(S, device=q_doc_BT.device) if k_pos_S is None else k_pos_S
    causal_TS = k_pos_S[None, :] <= q_pos_T[:, None]
    same_doc_BTS = q_doc_BT[:, :, None] == k_doc_BS[:, None, :]
    return (same_doc_BTS & causal_TS).unsqueeze(1)


@functools.cache
def _compiled_flex_attention():
    # Compiled once per process: eager FlexAttention is a slow reference implementation.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_mask(document_ids_BT: torch.Tensor):
    """FlexAttention BlockMask of block-causal attention: blocks with no allowed pair are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def block_causal(b, h, q_idx, kv_idx):
        return (document_ids_BT[b, q_idx] == document_ids_BT[b, kv_idx]) & (kv_idx <= q_idx)

    B, T = document_ids_BT.shape
    return create_block_mask(block_causal, B, None, T, T, device=document_ids_BT.device)


class CausalSDPA(nn.Module):
    """Causal (or, with document ids, block-causal) attention; a module so a plan can swap it.

    Plain causal: SDPA with ``is_causal`` (flash on CUDA). Block-causal: FlexAttention's block mask
    on CUDA ("auto" or "flex"), else SDPA with a boolean mask (CPU: FlexAttention has no CPU
    backward in torch 2.13). Both compute the same attention.
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        assert backend in ATTENTION_BACKENDS, backend
        self.flex = backend == "flex"
        self.auto = backend == "auto"
        self.backend = SDPA_BACKENDS.get(backend)

    def uses_flex(self, device: torch.device) -> bool:
        return self.flex or (self.auto and device.type == "cuda")

    def build_mask(self, attn: AttentionInputs):
        if attn.document_ids_BT is None:
            return None
        if self.uses_flex(attn.document_ids_BT.device):
            return flex_document_mask(attn.document_ids_BT)
        return sdpa_document_mask(attn.document_ids_BT, attn.document_ids_BT)

    def forward(self, q_BHTE: torch.Tensor, k_BHTE: torch.Tensor, v_BHTE: torch.Tensor,
                attn: Optional[AttentionInputs] = None) -> torch.Tensor:
        mask = attn.mask if attn is not None else None
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            return _compiled_flex_attention()(q_BHTE, k_BHTE, v_BHTE, block_mask=mask)
        kwargs = {"attn_mask": mask} if mask is not None else {"is_causal": True}
        if self.backend is None:
            return F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, **kwargs)
        with sdpa_kernel(self.backend):
            return F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, **kwargs)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def init_weights(self, init_std: float):
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))


def grouped_query_attention(sdpa: nn.Module, q_BTHE: torch.Tensor, k_BTKE: torch.Tensor, v_BTKE: torch.Tensor,
                            n_rep: int, attn: AttentionInputs) -> torch.Tensor:
    """Attention of [B, T, heads, E] q/k/v (after RoPE) -> [B, T, H x E], through ``sdpa`` (a module:
    context parallel swaps it). Query head h reads kv head h // n_rep (Meta's and HF's repeat_kv)."""
    B, T = q_BTHE.shape[:2]
    k_BTHE = k_BTKE.repeat_interleave(n_rep, dim=2) if n_rep > 1 else k_BTKE  # MHA: no copy
    v_BTHE = v_BTKE.repeat_interleave(n_rep, dim=2) if n_rep > 1 else v_BTKE
    out_BHTE = sdpa(q_BTHE.transpose(1, 2), k_BTHE.transpose(1, 2), v_BTHE.transpose(1, 2), attn)
    return out_BHTE.transpose(1, 2).reshape(B, T, -1)


def block_init_std(layer_id: int, n_layers: int, depth_init: bool) -> float:
    """Init std of a block's output projections: scaled by the block's depth, or by the model's."""
    return 0.02 / (2 * (layer_id + 1)) ** 0.5 if depth_init else 0.02 / (2 * n_layers) ** 0.5


def decoder_forward(model: nn.Module, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                    document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """tokens_BT (int) -> logits_BTV through ``tok_embeddings``, ``layers``, ``norm``, ``output``;
    a later pipeline stage (whose first / last modules are None) gets and returns h_BTD instead.

    ``positions`` [B, T]: each token's RoPE position (None: 0..T-1). ``document_ids`` [B, T]: a token
    attends only to earlier tokens of its own document (None: the whole causal prefix).
    """
    h_BTD = model.tok_embeddings(tokens) if model.tok_embeddings is not None else tokens
    if h_BTD.shape[1] > model.freqs_cis.shape[0]:
        raise ValueError(f"sequence length {h_BTD.shape[1]} exceeds max_seq_len {model.freqs_cis.shape[0]}")
    # Gathered per token only when given: the default slices the table, as before positions existed.
    rope = model.freqs_cis if positions is None else model.freqs_cis[positions]
    attn = AttentionInputs(rope, positions, document_ids)
    blocks = [layer for layer in model.layers.values() if layer is not None]
    if document_ids is not None and blocks:  # once per forward, not once per layer
        attn.mask = blocks[0].attention.sdpa.build_mask(attn)
    for layer in blocks:
        h_BTD = layer(h_BTD, attn)
    h_BTD = model.norm(h_BTD) if model.norm is not None else h_BTD
    return model.output(h_BTD) if model.output is not None else h_BTD
