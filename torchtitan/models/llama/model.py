"""Llama 3 in pure PyTorch (no distributed code).

The layout and parameter names follow Meta's reference llama3 code and torchtitan, so
checkpoints and parallelization plans written against those names apply here unchanged.
Parallelism (TP, FSDP, PP, activation checkpointing, compile) is applied from outside.

Initialization contract: build on the meta device, parallelize, ``model.to_empty(device=...)``,
then ``model.init_weights()``. ``init_weights`` therefore recomputes every buffer (RoPE tables),
not only the parameters.

Shape suffixes: B batch, T sequence, D model dim, H query heads, K kv heads, E head dim,
F ffn hidden dim, V vocab.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from torchtitan.models.layers import (  # noqa: F401  (re-exported: older imports name llama.model)
    ATTENTION_BACKENDS,
    AttentionInputs,
    CausalSDPA,
    FeedForward,
    RMSNorm,
    RoPEScalingArgs,
    apply_rotary_emb,
    block_init_std,
    decoder_forward,
    grouped_query_attention,
    precompute_rope_cos_sin,
)


@dataclass
class TransformerModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no GQA)
    vocab_size: int = 128256  # overwritten from the tokenizer at build time
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[RoPEScalingArgs] = None  # None = plain RoPE
    max_seq_len: int = 8192  # length of the precomputed RoPE table
    depth_init: bool = True  # scale output-projection init by layer depth
    attention_backend: str = "auto"  # auto | flash | cudnn | efficient | math | flex

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return compute_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def compute_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size exactly as Meta's llama3 code (8B: 4096 -> 14336)."""
    # 2/3 of 4*dim keeps the parameter count of a 4*dim GELU MLP despite the third matrix.
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE on q and k."""

    def __init__(self, args: TransformerModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.sdpa = CausalSDPA(args.attention_backend)

    def init_weights(self, init_std: float):
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)

    def forward(self, x_BTD: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds a slice of the heads.
        q_BTHE = self.wq(x_BTD).view(B, T, -1, self.head_dim)
        k_BTKE = self.wk(x_BTD).view(B, T, -1, self.head_dim)
        v_BTKE = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        q_BTHE = apply_rotary_emb(q_BTHE, attn.rope)
        k_BTKE = apply_rotary_emb(k_BTKE, attn.rope)
        return self.wo(grouped_query_attention(self.sdpa, q_BTHE, k_BTKE, v_BTKE, self.n_heads // self.n_kv_heads, attn))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: TransformerModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        # Kept per block so the std stays right after pipeline splitting deletes other layers.
        self.weight_init_std = block_init_std(layer_id, args.n_layers, args.depth_init)

    def init_weights(self):
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)

    def forward(self, x_BTD: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), attn)
        return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Llama 3 decoder. Pipeline stages may set tok_embeddings / norm / output to None."""

    block_cls = TransformerBlock  # the layout-independent init builds each block whole from it

    def __init__(self, args: TransformerModelArgs):
        super().__init__()
        self.model_args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # Non-persistent: derived from args, so checkpoints never carry (or disagree on) it.
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        # ModuleDict keyed "0".."n-1": FQNs stay stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.init_weights()

    def _precompute_freqs_cis(self, device: Optional[torch.device] = None) -> torch.Tensor:
        a = self.model_args
        return precompute_rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device)

    def init_weights(self, buffer_device: Optional[torch.device] = None):
        """(Re)initialize all parameters and buffers; call after `to_empty` on a meta-built model."""
        buffer_device = buffer_device or self.freqs_cis.device
        self.freqs_cis = self._precompute_freqs_cis(buffer_device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            if layer is not None:
                layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            std = self.model_args.dim**-0.5
            cutoff = 3 * std
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-cutoff, b=cutoff)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens_BT (int) -> logits_BTV; a later pipeline stage gets and returns h_BTD instead.
        ``positions`` / ``document_ids`` [B, T]: RoPE positions and block-causal documents (layers.py)."""
        return decoder_forward(self, tokens, positions, document_ids)


def get_nparams_and_flops(model: nn.Module, args: TransformerModelArgs, seq_len: int) -> tuple[int, int]:
    """Parameter count and training FLOPs per token (forward + backward).

    flops_per_token = 6 * (nparams - nparams_embedding) + 12 * n_layers * n_heads * head_dim * seq_len
      - 6 * N: 2 FLOPs per multiply-add in the forward, twice that in the backward, for every
        non-embedding weight (the embedding is a lookup, not a matmul; the output layer counts).
      - 12 * L * H * E * T: the attention scores QK^T and the weighted sum with V (2 matmuls,
        2 * H * E * T FLOPs each per token in the forward, x3 for forward + backward).
    Causal masking is ignored, as in PaLM / torchtitan, so this is an upper bound for MFU.
    """
    nparams = sum(p.numel() for p in model.parameters())
    tok_embeddings = getattr(model, "tok_embeddings", None)
    nparams_embedding = tok_embeddings.weight.numel() if tok_embeddings is not None else 0
    attention_flops = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return nparams, 6 * (nparams - nparams_embedding) + attention_flops
