"""Llama 3: registers the family (flavors, model, parallel plan, HF adapter, FLOPs) with the registry."""

from torchtitan.models.llama import hf_mapping
from torchtitan.models.llama.flavors import build_model_args, llama3_configs
from torchtitan.models.llama.model import (
    RoPEScalingArgs,
    Transformer,
    TransformerModelArgs,
    compute_ffn_hidden_dim,
    get_nparams_and_flops,
)
from torchtitan.models.llama.parallelize import parallelize_llama
from torchtitan.models.registry import HFAdapter, ModelSpec, register

__all__ = [
    "LLAMA_SPEC",
    "RoPEScalingArgs",
    "Transformer",
    "TransformerModelArgs",
    "build_model_args",
    "compute_ffn_hidden_dim",
    "get_nparams_and_flops",
    "llama3_configs",
]


def _args_from_dict(d: dict) -> TransformerModelArgs:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RoPEScalingArgs(**d["rope_scaling"])
    return TransformerModelArgs(**d)


def _shape_key(a: TransformerModelArgs) -> tuple:
    # The FFN size, not multiple_of / ffn_dim_multiplier: HF and Meta files only give the size.
    return (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.norm_eps, a.rope_theta, a.rope_scaling)


LLAMA_SPEC = register(ModelSpec(
    name="llama3",
    flavors=llama3_configs,
    args_cls=TransformerModelArgs,
    model_cls=Transformer,
    build_args=build_model_args,
    parallelize=parallelize_llama,
    nparams_and_flops=get_nparams_and_flops,
    hf=HFAdapter(
        model_types=("llama",),
        config_to_args=hf_mapping.hf_config_to_args,
        args_to_config=hf_mapping.hf_config,
        to_hf_state_dict=hf_mapping.to_hf_state_dict,
        from_hf_state_dict=hf_mapping.from_hf_state_dict,
    ),
    args_from_dict=_args_from_dict,
    shape_key=_shape_key,
))
