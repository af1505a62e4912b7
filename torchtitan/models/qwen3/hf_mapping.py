"""Bidirectional mapping between our Qwen3 state dict and HF `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`.

Only names change for the dense weights: our RoPE rotates halves like HF, so q/k rows map 1:1.
MoE experts: we hold stacked tensors (w1, w3 [E, F, D], w2 [E, D, F]). We export the per-expert
layout of the published checkpoints and of transformers' own ``save_pretrained``
(``mlp.experts.{e}.gate_proj.weight`` ...), which ``from_pretrained`` fuses on load (its
"qwen2_moe" weight conversion). We read that layout and also transformers 5.x's in-memory
``state_dict()`` one: ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows, then up rows) and
``mlp.experts.down_proj`` [E, D, F].
"""

import re
from collections import defaultdict

import torch

from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3.model import Qwen3ModelArgs

DEFAULT_MAX_SEQ_LEN = 40960  # Qwen3 config.json's max_position_embeddings, when the source does not say

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
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_PER_LAYER_INV = {hf: ours for ours, hf in _PER_LAYER.items()}
# Stacked expert tensor (ours) -> per-expert HF projection name.
_EXPERTS = {"moe.experts.w1": "gate_proj", "moe.experts.w2": "down_proj", "moe.experts.w3": "up_proj"}
_EXPERTS_INV = {hf: ours for ours, hf in _EXPERTS.items()}
_DROPPED_ON_EXPORT = ("moe.expert_bias",)  # our load-balancing state; HF routing has none
_OURS_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------- state dicts


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: Qwen3ModelArgs) -> dict[str, torch.Tensor]:
    """Our names/layout -> HF (per-expert checkpoint layout). Keys absent from `sd` (pipeline stages) are skipped."""
    hf_sd = {}
    for name, tensor in sd.items():
        if name in _TOP_LEVEL:
            if name == "output.weight" and args.tie_word_embeddings and "tok_embeddings.weight" in sd:
                continue  # tied: HF saves no lm_head.weight (a last pipeline stage alone still exports it)
            hf_sd[_TOP_LEVEL[name]] = tensor
            continue
        match = _OURS_LAYER_RE.match(name)
        if match is None:
            raise KeyError(f"no HF name for parameter {name!r}")
        layer, local = match.groups()
        prefix = f"model.layers.{layer}."
        if local in _PER_LAYER:
            hf_sd[prefix + _PER_LAYER[local]] = tensor
        elif local in _EXPERTS:
            # clone: per-expert views would share storage, which safetensors refuses to save.
            for e, w in enumerate(tensor.unbind(0)):
                hf_sd[f"{prefix}mlp.experts.{e}.{_EXPERTS[local]}.weight"] = w.clone()
        elif local not in _DROPPED_ON_EXPORT:
            raise KeyError(f"no HF name for parameter {name!r}")
    return hf_sd


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], args: Qwen3ModelArgs) -> dict[str, torch.Tensor]:
    """HF names/layout (per-expert checkpoint or fused in-memory experts) -> ours; inverse of `to_hf_state_dict`."""
    top_level_inv = {hf: ours for ours, hf in _TOP_LEVEL.items()}
    sd: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)  # our stacked name -> {expert: weight}
    for name, tensor in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older HF checkpoints saved this derived buffer; we recompute ours
        if name in top_level_inv:
            sd[top_level_inv[name]] = tensor
            continue
        match = _HF_LAYER_RE.match(name)
        if match is None:
            raise KeyError(f"unexpected HF parameter {name!r}")
        _read_layer_tensor(f"layers.{match.group(1)}.", match.group(2), tensor, sd, experts, name)
    for name, by_expert in experts.items():
        sd[name] = _stack_experts(name, by_expert, args)
    _resolve_output_head(sd, args)
    return sd


def _read_layer_tensor(prefix: str, hf_local: str, tensor: torch.Tensor, sd: dict, experts: dict, name: str) -> None:
    """One HF layer tensor into `sd`; per-expert ones into `experts`, stacked once all are read."""
    expert = _HF_EXPERT_RE.match(hf_local)
    if hf_local in _PER_LAYER_INV:
        sd[prefix + _PER_LAYER_INV[hf_local]] = tensor
    elif expert is not None:
        experts[prefix + _EXPERTS_INV[expert.group(2)]][int(expert.group(1))] = tensor
    elif hf_local == "mlp.experts.gate_up_proj":  # fused [E, 2F, D]: gate rows, then up rows
        sd[prefix + "moe.experts.w1"], sd[prefix + "moe.experts.w3"] = tensor.chunk(2, dim=1)
    elif hf_local == "mlp.experts.down_proj":
        sd[prefix + "moe.experts.w2"] = tensor
    else:
        raise KeyError(f"unexpected HF parameter {name!r}")


def _resolve_output_head(sd: dict[str, torch.Tensor], args: Qwen3ModelArgs) -> None:
    """Fill `output.weight`: our state dict names a tied matrix twice; a tied checkpoint may omit lm_head."""
    emb, lm_head = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    if args.tie_word_embeddings and emb is not None:
        if lm_head is not None and not torch.equal(lm_head, emb):
            raise ValueError("tie_word_embeddings is set but lm_head.weight differs from embed_tokens.weight")
        sd["output.weight"] = emb
    elif lm_head is None and emb is not None:
        sd["output.weight"] = emb.clone()  # a tied checkpoint read into an untied model


def _stack_experts(name: str, by_expert: dict[int, torch.Tensor], args: Qwen3ModelArgs) -> torch.Tensor:
    n = args.moe.num_experts if args.moe is not None else len(by_expert)
    if sorted(by_expert) != list(range(n)):
        raise ValueError(f"{name}: checkpoint holds experts {sorted(by_expert)[:8]}..., expected 0..{n - 1}")
    return torch.stack([by_expert[e] for e in range(n)])


# ----------------------------------------------------------------------------- config.json


def _refuse_unsupported(config: dict) -> None:
    if config.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported by this Qwen3 model (q/k/v/o have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported (only silu)")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        raise ValueError("sliding-window attention is not supported; set use_sliding_window=false")
    if config.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"decoder_sparse_step={config['decoder_sparse_step']} is not supported (only 1)")


def _rope_theta(config: dict) -> float:
    """transformers 5.x ``rope_parameters`` or 4.x ``rope_theta`` / ``rope_scaling``; only default RoPE."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only default)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _moe_args(config: dict) -> MoEArgs:
    return MoEArgs(
        num_experts=config.get("num_experts", config.get("num_local_experts")),
        top_k=config["num_experts_per_tok"],
        hidden_dim=config["moe_intermediate_size"],
        score_func="softmax",
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
    )


def config_to_args(config: dict) -> Qwen3ModelArgs:
    """HF Qwen3Config / Qwen3MoeConfig (config.json, transformers 4.x or 5.x keys) -> ours."""
    model_type = config.get("model_type", "qwen3")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"model_type {model_type!r} is not a Qwen3 config (expected qwen3 or qwen3_moe)")
    _refuse_unsupported(config)
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    is_moe = model_type == "qwen3_moe" and config.get("num_experts", config.get("num_local_experts", 0)) > 0
    return Qwen3ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or dim // n_heads, hidden_dim=config["intermediate_size"],
        vocab_size=config["vocab_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(config),
        max_seq_len=config.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        moe=_moe_args(config) if is_moe else None,
        mlp_only_layers=tuple(config.get("mlp_only_layers") or ()) if is_moe else (),
    )  # fmt: skip


def _moe_config(moe: MoEArgs, mlp_only_layers: tuple[int, ...]) -> dict:
    if moe.score_func != "softmax" or moe.num_shared_experts or moe.route_scale != 1.0:
        raise ValueError(
            f"HF Qwen3-MoE routes by softmax, no shared experts, route_scale 1; got score_func={moe.score_func!r}, "
            f"num_shared_experts={moe.num_shared_experts}, route_scale={moe.route_scale}"
        )
    return {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.hidden_dim,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(mlp_only_layers),
    }


def args_to_config(args: Qwen3ModelArgs, dtype: torch.dtype) -> dict:
    """config.json content that `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM.from_pretrained` reads."""
    moe = args.moe is not None
    return {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        **(_moe_config(args.moe, args.mlp_only_layers) if moe else {}),
        "dtype": str(dtype).removeprefix("torch."),
    }
