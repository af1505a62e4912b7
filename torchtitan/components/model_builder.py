"""Build the model of any registered family for a layout: meta model -> (pipeline split) ->
parallel plan -> materialize -> layout-independent seeded init.

The trainer and the memory estimator both build through ``build_model`` (the estimator on a
fake process group and fake tensors, with ``init_weights=False``), so an estimate always
describes the model the trainer would build.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from torchtitan.components.float8 import Float8Training
from torchtitan.config.job_config import JobConfig
from torchtitan.config.job_config import MoE as MoEConfig
from torchtitan.models.moe import MoEArgs
from torchtitan.models.registry import ModelSpec, get_spec
from torchtitan.parallelisms.context_parallel import ContextParallel
from torchtitan.parallelisms.init import init_model_weights
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.pipeline import Pipeline, build_pipeline
from torchtitan.tools.logging import logger


@dataclass
class BuiltModel:
    """What a rank holds: the whole model, or (under PP) its stage parts and the schedule."""

    spec: ModelSpec
    args: Any
    model: nn.Module | None  # None under PP: no rank holds the whole model
    parts: list[nn.Module]
    pipeline: Pipeline | None
    nparams: int
    flops_per_token: int


def build_model_args(cfg: JobConfig, spec: ModelSpec, tokenizer_vocab: int):
    """The family's args of ``cfg.model`` (flavor plus overrides), sized for the tokenizer."""
    m = cfg.model
    vocab_size = m.vocab_size or tokenizer_vocab
    if vocab_size < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            "use 0 (the tokenizer's size) or a larger value"
        )
    args = spec.build_args(
        m.flavor, vocab_size=vocab_size, max_seq_len=cfg.training.seq_len, n_layers=m.n_layers, dim=m.dim,
        n_kv_heads=m.n_kv_heads, attention_backend=m.attention_backend,
    )
    if spec.is_moe(args):
        args = dataclasses.replace(args, moe=moe_args(args.moe, cfg.moe))
    if cfg.parallelism.ep > 1 and not spec.is_moe(args):
        raise ValueError(
            f"parallelism.ep={cfg.parallelism.ep} needs a mixture-of-experts model, but {m.name} {m.flavor} is "
            f"dense; use parallelism.ep=1 or an MoE flavor (e.g. --model.name qwen3 --model.flavor debugmodel_moe)"
        )
    return args


def moe_args(flavor_moe: MoEArgs, cfg: MoEConfig) -> MoEArgs:
    """The flavor's MoE shape with the training choices of ``[moe]`` (losses, balancing, kernel)."""
    return dataclasses.replace(
        flavor_moe, score_func=cfg.score_func or flavor_moe.score_func, aux_loss_coeff=cfg.aux_loss_coeff,
        z_loss_coeff=cfg.z_loss_coeff, load_balance_coeff=cfg.load_balance_coeff, use_grouped_mm=cfg.grouped_mm,
    )


class ModelBuilder:
    """Holds what every part of the build needs (config, layout, device, CP, float8)."""

    def __init__(self, cfg: JobConfig, parallel_dims: ParallelDims, device: torch.device,
                 cp: ContextParallel | None, float8: Float8Training, init_weights: bool = True):
        self.cfg, self.parallel_dims, self.device = cfg, parallel_dims, device
        self.cp, self.float8, self.init_weights = cp, float8, init_weights
        self.spec = get_spec(cfg.model.name)

    def build(self, tokenizer_vocab: int, local_bs: int,
              pipeline_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> BuiltModel:
        """``pipeline_loss_fn`` is what the schedule calls per microbatch on the last stage."""
        args = build_model_args(self.cfg, self.spec, tokenizer_vocab)
        # Built on meta: no memory until the parallel plan has decided what each rank holds.
        with torch.device("meta"):
            model = self.spec.model_cls(args)
        nparams, flops_per_token = self.spec.nparams_and_flops(model, args, self.cfg.training.seq_len)
        self.float8.convert(model)  # before the parallel plan: TP, compile and FSDP see float8 modules
        logger.info(f"model {self.cfg.model.name} {self.cfg.model.flavor}: {nparams:,} params, {args}")
        if not self.parallel_dims.pp_enabled:
            model = self.parallelize_and_init(model)
            return BuiltModel(self.spec, args, model, [model], None, nparams, flops_per_token)
        # Each stage part goes through parallelize_and_init like a whole model: PP composes with TP and FSDP.
        pipeline = build_pipeline(
            model, self.parallel_dims, self.cfg.parallelism, local_bs, self.device, pipeline_loss_fn,
            self.parallelize_and_init, split_fn=self.spec.pipeline_split,
        )
        return BuiltModel(self.spec, args, None, pipeline.model_parts, pipeline, nparams, flops_per_token)

    def parallelize_and_init(self, model: nn.Module) -> nn.Module:
        """Meta model (or pipeline stage part) -> parallelized, materialized, seeded init."""
        cfg, args = self.cfg, model.model_args
        if self.cp is not None:  # swaps attention modules: before FSDP wraps the blocks
            self.cp.prepare_model(model)
        model = self.spec.parallelize(
            model, self.parallel_dims, cfg.activation_checkpoint, cfg.compile,
            parallelism=cfg.parallelism, training=cfg.training, experimental=cfg.experimental,
            tp_styles=self.float8.tp_styles(),
        )
        # FSDP CPU offload keeps the sharded parameters in host memory.
        offload = cfg.training.enable_cpu_offload and self.parallel_dims.fsdp_enabled
        model.to_empty(device="cpu" if offload else self.device)
        if self.init_weights:  # fake tensors (memory estimation) have no values to draw
            # The same seed gives the same weights however the model is laid out (see init.py).
            init_model_weights(model, self.spec.model_cls, args, cfg.training.seed, self.device)
        model.train()
        return model
