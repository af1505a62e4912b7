"""Layers shared by the model families: RMSNorm, SwiGLU, RoPE tables, causal SDPA.

Pure PyTorch, no distributed code. A family's model file imports what it needs from here
(and keeps what is its own: Llama's interleaved RoPE pairs, Qwen3's q/k norms, ...).

Shape suffixes: B batch, T sequence, D model dim, H heads, E head dim, F ffn hidden dim.
"""

import math
from dataclasses import dataclass
from typing import Optional

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


def apply_rotary_emb(x_BTHE: torch.Tensor, freqs_cis_TE2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by Meta's complex multiply, computed in fp32.

    The table is stored as real (cos, sin) pairs (plain buffers shard, offload and checkpoint
    like any other) and viewed as complex here, without a copy: one complex multiply is ~3x
    faster than the same rotation spelled out in real arithmetic (fewer kernels, in eager).
    """
    B, T, H, E = x_BTHE.shape
    x_BTHC = torch.view_as_complex(x_BTHE.float().reshape(B, T, H, E // 2, 2))
    freqs_T1C = torch.view_as_complex(freqs_cis_TE2[:T].float()).unsqueeze(1)  # broadcasts over B and H
    return torch.view_as_real(x_BTHC * freqs_T1C).flatten(3).type_as(x_BTHE)


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


class CausalSDPA(nn.Module):
    """Causal scaled-dot-product attention; a module so a parallel plan can swap it (context parallel)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = SDPA_BACKENDS[backend]

    def forward(self, q_BHTE: torch.Tensor, k_BHTE: torch.Tensor, v_BHTE: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, is_causal=True)
        with sdpa_kernel(self.backend):
            return F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, is_causal=True)


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
                            n_rep: int) -> torch.Tensor:
    """Attention of [B, T, heads, E] q/k/v (after RoPE) -> [B, T, H x E], through ``sdpa`` (a module:
    context parallel swaps it). Query head h reads kv head h // n_rep (Meta's and HF's repeat_kv)."""
    B, T = q_BTHE.shape[:2]
    k_BTHE = k_BTKE.repeat_interleave(n_rep, dim=2) if n_rep > 1 else k_BTKE  # MHA: no copy
    v_BTHE = v_BTKE.repeat_interleave(n_rep, dim=2) if n_rep > 1 else v_BTKE
    out_BHTE = sdpa(q_BTHE.transpose(1, 2), k_BTHE.transpose(1, 2), v_BTHE.transpose(1, 2))
    return out_BHTE.transpose(1, 2).reshape(B, T, -1)


def block_init_std(layer_id: int, n_layers: int, depth_init: bool) -> float:
    """Init std of a block's output projections: scaled by the block's depth, or by the model's."""
    return 0.02 / (2 * (layer_id + 1)) ** 0.5 if depth_init else 0.02 / (2 * n_layers) ** 0.5


def decoder_forward(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens_BT (int) -> logits_BTV through ``tok_embeddings``, ``layers``, ``norm``, ``output``;
    a later pipeline stage (whose first / last modules are None) gets and returns h_BTD instead."""
    h_BTD = model.tok_embeddings(tokens) if model.tok_embeddings is not None else tokens
    if h_BTD.shape[1] > model.freqs_cis.shape[0]:
        raise ValueError(f"sequence length {h_BTD.shape[1]} exceeds max_seq_len {model.freqs_cis.shape[0]}")
    for layer in model.layers.values():
        h_BTD = layer(h_BTD, model.freqs_cis)
    h_BTD = model.norm(h_BTD) if model.norm is not None else h_BTD
    return model.output(h_BTD) if model.output is not None else h_BTD
