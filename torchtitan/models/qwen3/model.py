"""Qwen3 (dense and MoE) in pure PyTorch (no distributed code).

Same layout and contracts as the Llama model (``layers`` ModuleDict keyed "0".."n-1", a
non-persistent RoPE table ``freqs_cis``, ``init_weights`` after ``to_empty``, a swappable
``attention.sdpa``), plus what is Qwen3's own:
- ``q_norm`` / ``k_norm``: an RMSNorm over each head's ``head_dim``, applied before RoPE;
- ``head_dim`` is its own setting (0.6B: 1024 / 16 heads, but head_dim 128);
- RoPE rotates the two halves of a head (HF's ``rotate_half``), so HF q/k weights map 1:1;
- MoE blocks (``moe``) in place of the SwiGLU (``feed_forward``), except ``mlp_only_layers``;
- optional tied input / output embeddings (0.6B, 1.7B, 4B).

Shape suffixes: B batch, T sequence, D model dim, H query heads, K kv heads, E head dim,
F ffn hidden dim, V vocab.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from torchtitan.models.layers import (
    ATTENTION_BACKENDS,
    AttentionInputs,
    CausalSDPA,
    FeedForward,
    RMSNorm,
    block_init_std,
    decoder_forward,
    grouped_query_attention,
    precompute_rope_cos_sin,
    rope_rows,
)
from torchtitan.models.moe import MoE, MoEArgs


@dataclass
class Qwen3ModelArgs:
    dim: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128  # independent of dim / n_heads
    hidden_dim: int = 3072  # dense SwiGLU intermediate size (also MoE models' mlp_only_layers)
    vocab_size: int = 151936  # overwritten from the tokenizer at build time
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_seq_len: int = 4096  # length of the precomputed RoPE table
    tie_word_embeddings: bool = False
    depth_init: bool = True  # scale output-projection init by layer depth
    attention_backend: str = "auto"  # auto | flash | cudnn | efficient | math | flex
    moe: Optional[MoEArgs] = None  # None = dense
    mlp_only_layers: tuple[int, ...] = ()  # dense blocks inside an MoE model (HF mlp_only_layers)

    def __post_init__(self):
        # Rebuilt from dataclasses.asdict / JSON (a checkpoint's saved args): a dict and a list.
        if isinstance(self.moe, dict):
            self.moe = MoEArgs(**self.moe)
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}; pick a divisor"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and layer_id not in self.mlp_only_layers


# ----------------------------------------------------------------------------- layers


def apply_rotary_emb_half(x_BTHE: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + E/2]) by angle i (HF ``rotate_half``), computed in fp32.

    Same (cos, sin) table as Llama's interleaved rotation; only the pairing differs, which is
    why HF Qwen3 q/k weights need no row permutation.
    """
    rows_BT1C2 = rope_rows(freqs_cis, x_BTHE.shape[1]).float()  # broadcasts over the heads
    cos, sin = rows_BT1C2[..., 0], rows_BT1C2[..., 1]
    x1, x2 = x_BTHE.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x_BTHE)


class Attention(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm on q and k, then RoPE."""

    def __init__(self, args: Qwen3ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, eps=args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, eps=args.norm_eps)
        self.sdpa = CausalSDPA(args.attention_backend)

    def init_weights(self, init_std: float):
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()

    def forward(self, x_BTD: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds a slice of the heads.
        q_BTHE = self.q_norm(self.wq(x_BTD).view(B, T, -1, self.head_dim))
        k_BTKE = self.k_norm(self.wk(x_BTD).view(B, T, -1, self.head_dim))
        v_BTKE = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        q_BTHE = apply_rotary_emb_half(q_BTHE, attn.rope)
        k_BTKE = apply_rotary_emb_half(k_BTKE, attn.rope)
        return self.wo(grouped_query_attention(self.sdpa, q_BTHE, k_BTKE, v_BTKE, self.n_heads // self.n_kv_heads, attn))


class Qwen3Block(nn.Module):
    def __init__(self, layer_id: int, args: Qwen3ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.moe_enabled = args.is_moe_layer(layer_id)
        if self.moe_enabled:
            self.moe = MoE(args.moe, args.dim)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        # Kept per block so the std stays right after pipeline splitting deletes other layers.
        self.weight_init_std = block_init_std(layer_id, args.n_layers, args.depth_init)

    def init_weights(self):
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        (self.moe if self.moe_enabled else self.feed_forward).init_weights(self.weight_init_std)

    def forward(self, x_BTD: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), attn)
        mlp = self.moe if self.moe_enabled else self.feed_forward
        return h_BTD + mlp(self.ffn_norm(h_BTD))


# ----------------------------------------------------------------------------- model


class Qwen3Model(nn.Module):
    """Qwen3 decoder. Pipeline stages may set tok_embeddings / norm / output to None."""

    block_cls = Qwen3Block  # the layout-independent init builds each block whole from it

    def __init__(self, args: Qwen3ModelArgs):
        super().__init__()
        self.model_args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # Non-persistent: derived from args, so checkpoints never carry (or disagree on) it.
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        # ModuleDict keyed "0".."n-1": FQNs stay stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): Qwen3Block(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def to_empty(self, *, device, recurse: bool = True):
        # nn.Module.to_empty gives each module a new Parameter, which unties a shared one (a plain
        # or TP-only model; FSDP2 keeps the tie itself): tie again so the meta-built model stays tied.
        super().to_empty(device=device, recurse=recurse)
        if self.model_args.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        return self

    def _precompute_freqs_cis(self, device: Optional[torch.device] = None) -> torch.Tensor:
        a = self.model_args
        return precompute_rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, None, device)

    def _init_output_weight(self, weight: torch.Tensor):
        std = self.model_args.dim**-0.5
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def init_weights(self, buffer_device: Optional[torch.device] = None):
        """(Re)initialize all parameters and buffers; call after `to_empty` on a meta-built model."""
        buffer_device = buffer_device or self.freqs_cis.device
        self.freqs_cis = self._precompute_freqs_cis(buffer_device)
        tied = self.model_args.tie_word_embeddings
        if self.tok_embeddings is not None:
            # Tied: the shared matrix gets the output head's init, whichever unit holds it (the
            # layout-independent init builds the embedding alone, a last pipeline stage the head alone).
            if tied:
                self._init_output_weight(self.tok_embeddings.weight)
            else:
                nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            if layer is not None:
                layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not (tied and self.tok_embeddings is not None):
            self._init_output_weight(self.output.weight)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens_BT (int) -> logits_BTV; a later pipeline stage gets and returns h_BTD instead.
        ``positions`` / ``document_ids`` [B, T]: RoPE positions and block-causal documents (layers.py)."""
        return decoder_forward(self, tokens, positions, document_ids)


def inactive_expert_nparams(model: nn.Module, args: Qwen3ModelArgs) -> int:
    """Routed-expert parameters one token does not use: (1 - top_k / num_experts) of each MoE's experts."""
    if args.moe is None:
        return 0
    a = args.moe
    inactive = 0
    for block in model.layers.values():
        if block is not None and block.moe_enabled:
            expert_params = sum(p.numel() for p in block.moe.experts.parameters())
            inactive += expert_params * (a.num_experts - a.top_k) // a.num_experts
    return inactive


def get_nparams_and_flops(model: nn.Module, args: Qwen3ModelArgs, seq_len: int) -> tuple[int, int]:
    """Total parameter count and training FLOPs per token (forward + backward), from ACTIVE params.

    flops_per_token = 6 * (active params - embedding) + 12 * n_layers * n_heads * head_dim * seq_len
    as in Llama's `get_nparams_and_flops`; an MoE layer counts only top_k of its routed experts
    (its router and shared experts count whole). The embedding is a lookup and is left out, unless
    tied: then the shared matrix is also the output matmul and counts (once).
    """
    nparams = sum(p.numel() for p in model.parameters())  # a tied matrix appears once
    emb = getattr(model, "tok_embeddings", None)
    out = getattr(model, "output", None)
    emb_is_output = emb is not None and out is not None and out.weight is emb.weight
    nparams_embedding = emb.weight.numel() if emb is not None and not emb_is_output else 0
    active = nparams - inactive_expert_nparams(model, args)
    attention_flops = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return nparams, 6 * (active - nparams_embedding) + attention_flops
