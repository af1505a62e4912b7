"""Qwen3, dense and mixture-of-experts: registers the family with the model registry."""

from torchtitan.models.qwen3 import hf_mapping
from torchtitan.models.qwen3.flavors import build_model_args, qwen3_configs
from torchtitan.models.qwen3.model import Qwen3Model, Qwen3ModelArgs, get_nparams_and_flops
from torchtitan.models.qwen3.parallelize import parallelize_qwen3
from torchtitan.models.registry import HFAdapter, ModelSpec, register
from torchtitan.parallelisms.pipeline import build_stage_model

__all__ = ["QWEN3_SPEC", "Qwen3Model", "Qwen3ModelArgs", "build_model_args", "qwen3_configs"]


def pipeline_split(model, layer_names: list[str], first: bool, last: bool):
    """Stages as for any decoder; a tied embedding cannot be split (first and last stage would
    each hold a copy that drifts apart), so it is refused."""
    if model.model_args.tie_word_embeddings and not (first and last):
        raise ValueError(
            "pipeline parallel with tie_word_embeddings: the embedding (first stage) and the output head (last "
            "stage) would be two copies; use an untied flavor (Qwen3 8B and larger) or parallelism.pp=1"
        )
    return build_stage_model(model, layer_names, first, last)


QWEN3_SPEC = register(ModelSpec(
    name="qwen3",
    flavors=qwen3_configs,
    args_cls=Qwen3ModelArgs,
    model_cls=Qwen3Model,
    build_args=build_model_args,
    parallelize=parallelize_qwen3,
    nparams_and_flops=get_nparams_and_flops,
    hf=HFAdapter(
        model_types=("qwen3", "qwen3_moe"),
        config_to_args=hf_mapping.config_to_args,
        args_to_config=hf_mapping.args_to_config,
        to_hf_state_dict=hf_mapping.to_hf_state_dict,
        from_hf_state_dict=hf_mapping.from_hf_state_dict,
    ),
    pipeline_split=pipeline_split,
    is_moe=lambda args: args.moe is not None,
))
