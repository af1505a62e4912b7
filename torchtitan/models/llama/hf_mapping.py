"""Bidirectional mapping between our Llama 3 state dict and HF `LlamaForCausalLM`.

Parameter names differ, and so does the RoPE layout: Meta (and this model) rotate
interleaved pairs (x[2i], x[2i+1]) of each head, while HF rotates the two halves
(x[i], x[i + E/2]) ("rotate_half"). The rows of wq and wk are therefore permuted per head on
export (`_meta_to_hf_rope_rows`, as in HF's convert_llama_weights_to_hf.py) and back on import.
"""

import re
from typing import Optional

import torch

from torchtitan.models.llama.flavors import llama3_configs
from torchtitan.models.llama.model import RoPEScalingArgs, TransformerModelArgs, compute_ffn_hidden_dim

DEFAULT_MAX_SEQ_LEN = 8192  # RoPE table length when the source does not say (a training run sets its own)

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_PER_LAYER_INV = {hf: ours for ours, hf in _PER_LAYER.items()}
_OURS_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _meta_to_hf_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, reorder rows from interleaved pairs [0, 1, 2, 3, ...] to halves [0, 2, ..., 1, 3, ...]."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_to_meta_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `_meta_to_hf_rope_rows`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(local_name: str, args: TransformerModelArgs) -> int:
    """Number of heads whose rows need the RoPE permutation, 0 for other weights."""
    return {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}.get(local_name, 0)


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: TransformerModelArgs) -> dict[str, torch.Tensor]:
    """Our names/layout -> HF LlamaForCausalLM. Keys absent from `sd` (pipeline stages) are skipped."""
    hf_sd = {}
    for name, tensor in sd.items():
        if name in _TOP_LEVEL:
            hf_sd[_TOP_LEVEL[name]] = tensor
            continue
        match = _OURS_LAYER_RE.match(name)
        if match is None or match.group(2) not in _PER_LAYER:
            raise KeyError(f"no HF name for parameter {name!r}")
        layer, local = match.groups()
        n_heads = _rope_heads(local, args)
        hf_sd[f"model.layers.{layer}.{_PER_LAYER[local]}"] = (
            _meta_to_hf_rope_rows(tensor, n_heads) if n_heads else tensor
        )
    return hf_sd


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], args: TransformerModelArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names/layout -> ours (exact inverse of `to_hf_state_dict`)."""
    top_level_inv = {hf: ours for ours, hf in _TOP_LEVEL.items()}
    sd = {}
    for name, tensor in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older HF checkpoints saved this derived buffer; we recompute ours
        if name in top_level_inv:
            sd[top_level_inv[name]] = tensor
            continue
        match = _HF_LAYER_RE.match(name)
        if match is None or match.group(2) not in _PER_LAYER_INV:
            raise KeyError(f"unexpected HF parameter {name!r}")
        layer, hf_local = match.groups()
        local = _PER_LAYER_INV[hf_local]
        n_heads = _rope_heads(local, args)
        sd[f"layers.{layer}.{local}"] = _hf_to_meta_rope_rows(tensor, n_heads) if n_heads else tensor
    # Tied checkpoints (e.g. Llama 3.2 1B/3B) have no lm_head; our model keeps a separate output.
    if "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    return sd


def to_hf_config(args: TransformerModelArgs) -> dict:
    """kwargs for `transformers.LlamaConfig` (transformers 5.x: RoPE settings live in `rope_parameters`)."""
    rope: dict = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def hf_config_to_args(config: dict) -> TransformerModelArgs:
    """HF LlamaConfig (config.json; transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``) -> ours."""
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("only Llama configs with silu and no attention/MLP biases convert to this model")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim={config['head_dim']} != hidden_size / num_attention_heads; unsupported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only default and llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = RoPEScalingArgs(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )  # fmt: skip
    multiple_of, multiplier = _ffn_params(dim, config["intermediate_size"])
    return TransformerModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))), rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN),
    )  # fmt: skip


def _ffn_params(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) giving FFN size `hidden`: a flavor's when one fits, else exact."""
    for f in llama3_configs.values():
        if compute_ffn_hidden_dim(dim, f.multiple_of, f.ffn_dim_multiplier) == hidden:
            return f.multiple_of, f.ffn_dim_multiplier
    base = int(2 * (4 * dim) / 3)
    # Rounding `base` (scaled down when larger) up to a multiple of `hidden` gives `hidden` itself.
    return hidden, None if base <= hidden else hidden / base


def hf_config(args: TransformerModelArgs, dtype: torch.dtype) -> dict:
    """config.json content that `LlamaForCausalLM.from_pretrained` reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **to_hf_config(args),
        "dtype": str(dtype).removeprefix("torch."),
    }
