"""The model registry: one ``ModelSpec`` per family, the only seam between a family and the rest.

The trainer, the layout-independent init, pipeline building, memory estimation, weight
conversion and every script ask ``get_spec(cfg.model.name)`` (or ``spec_for_hf_model_type``)
and never import a family. A family is one folder ``torchtitan/models/<family>/`` whose
``__init__.py`` calls ``register(ModelSpec(...))``; the registry imports every such folder
on first use, so adding a family edits nothing outside it.

What a family's model class must offer (both families here do):
- ``Model(args)`` builds on any device (the trainer builds on meta); ``model.model_args``;
- ``tok_embeddings``, ``layers`` (an ``nn.ModuleDict`` keyed "0".."n-1", so FQNs survive a
  pipeline split), ``norm``, ``output``; a pipeline stage sets the ones it lacks to None;
- ``freqs_cis`` (non-persistent RoPE table, dim 0 = position) and ``_precompute_freqs_cis(device)``;
- ``forward(tokens, positions=None, document_ids=None)`` (``layers.decoder_forward`` does it): RoPE
  positions and block-causal documents per token, and each block's attention kernel as the swappable
  submodule ``attention.sdpa`` called with ``(q, k, v, AttentionInputs)`` (context parallel and the
  KV cache of generation replace it);
- ``init_weights(buffer_device=None)`` initializing whatever is not None, and a class
  attribute ``block_cls`` with ``block_cls(layer_id, args)`` and ``block.init_weights()``
  (the layout-independent init builds each unit whole from these; see parallelisms/init.py);
- a mixture-of-experts family keeps its ``MoEArgs`` (models/moe.py) in ``args.moe`` (the ``[moe]``
  config section applies there) and says so with ``is_moe``.
"""

import dataclasses
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from torchtitan.parallelisms.pipeline import build_stage_model


@dataclass(frozen=True)
class HFAdapter:
    """How a family maps to Hugging Face transformers (config.json and the state dict)."""

    model_types: tuple[str, ...]  # config.json "model_type" values this family reads
    config_to_args: Callable[[dict], Any]
    args_to_config: Callable[[Any, Any], dict]  # (args, torch dtype) -> full config.json content
    to_hf_state_dict: Callable[[dict, Any], dict]
    from_hf_state_dict: Callable[[dict, Any], dict]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the framework needs to know about one model family."""

    name: str  # model.name in the config
    flavors: dict[str, Any]  # flavor name -> args (vocab_size and max_seq_len set at build time)
    args_cls: type
    model_cls: type
    # (flavor, vocab_size, max_seq_len, n_layers, dim, n_kv_heads, attention_backend) -> args;
    # 0 keeps the flavor's value. Unknown flavors raise a ValueError listing the valid ones.
    build_args: Callable[..., Any]
    # (model, parallel_dims, ac, compile, *, parallelism, training, experimental, tp_styles) -> model:
    # the family's ordered plan (TP, AC, compile, FSDP) built from parallelisms/.
    parallelize: Callable[..., nn.Module]
    # (model, args, seq_len) -> (parameter count, training FLOPs per token; MoE: active params)
    nparams_and_flops: Callable[[nn.Module, Any, int], tuple[int, int]]
    hf: HFAdapter
    # (meta model, layer names of the stage, is_first, is_last) -> meta stage part
    pipeline_split: Callable[[nn.Module, list[str], bool, bool], nn.Module] = build_stage_model
    args_from_dict: Callable[[dict], Any] | None = None  # default: args_cls(**d)
    # Families with MoE layers answer True; ep > 1 on a dense family is refused.
    is_moe: Callable[[Any], bool] = field(default=lambda args: False)
    # What makes two args "the same flavor" (default: equal once vocab, max_seq_len and the
    # attention backend are set aside).
    shape_key: Callable[[Any], Any] | None = None

    def args_from(self, d: dict):
        return self.args_from_dict(d) if self.args_from_dict else self.args_cls(**d)

    def match_flavor(self, args) -> str | None:
        """The flavor with these shapes (vocab, max_seq_len and attention backend ignored), or None."""
        key = self.shape_key or self._default_shape_key
        for name, flavor in self.flavors.items():
            if key(flavor) == key(args):
                return name
        return None

    @staticmethod
    def _default_shape_key(args):
        return dataclasses.replace(args, vocab_size=0, max_seq_len=0, attention_backend="auto")


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(spec: ModelSpec) -> ModelSpec:
    assert spec.name not in _REGISTRY, f"model family {spec.name!r} registered twice"
    _REGISTRY[spec.name] = spec
    return spec


def _load_families() -> None:
    """Import every package under torchtitan/models (each registers itself)."""
    global _loaded
    if _loaded:
        return
    import torchtitan.models as models

    for info in pkgutil.iter_modules(models.__path__):
        if info.ispkg:
            importlib.import_module(f"{models.__name__}.{info.name}")
    _loaded = True


def registered() -> dict[str, ModelSpec]:
    _load_families()
    return dict(_REGISTRY)


def model_option_help() -> dict[str, str]:
    """--help's text of model.name and model.flavor, from what is registered: every family's flavors."""
    specs = registered()
    flavors = "; ".join(f"{name}: {', '.join(spec.flavors)}" for name, spec in specs.items())
    return {"name": f"Model family, one of: {', '.join(specs)} (every package under torchtitan/models)",
            "flavor": f"Model size, one of the family's flavors ({flavors})"}


def get_spec(name: str) -> ModelSpec:
    specs = registered()
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.name {name!r} is not a registered model family.{hint} Registered: {', '.join(specs)}")
    return specs[name]


def spec_for_hf_model_type(model_type: str) -> ModelSpec:
    """The family whose Hugging Face adapter reads config.json's ``model_type``."""
    for spec in registered().values():
        if model_type in spec.hf.model_types:
            return spec
    known = sorted(t for s in registered().values() for t in s.hf.model_types)
    raise ValueError(
        f"config.json model_type {model_type!r} has no registered model family; this build reads: {', '.join(known)}"
    )


def args_of_flavor(family: str, flavors: dict, flavor: str, vocab_size: int, max_seq_len: int,
                   n_layers: int = 0, dim: int = 0, n_kv_heads: int = 0, attention_backend: str = "auto"):
    """A flavor's args with the tokenizer's vocab, the training seq_len and overrides (0 = keep):
    the ``build_args`` of a family whose args have these fields."""
    if flavor not in flavors:
        raise flavor_error(family, flavor, list(flavors))
    overrides = {"vocab_size": vocab_size, "max_seq_len": max_seq_len, "attention_backend": attention_backend}
    for key, value in (("n_layers", n_layers), ("dim", dim), ("n_kv_heads", n_kv_heads)):
        if value > 0:
            overrides[key] = value
    # replace() builds a new instance (shared defaults stay untouched) and re-runs validation.
    return dataclasses.replace(flavors[flavor], **overrides)


def flavor_error(family: str, flavor: str, valid: list[str]) -> ValueError:
    """The one message every family gives for an unknown flavor (case-insensitive did-you-mean)."""
    by_lower = {name.lower(): name for name in valid}
    close = difflib.get_close_matches(flavor.lower(), list(by_lower), n=1)
    hint = f" Did you mean {by_lower[close[0]]!r}?" if close else ""
    return ValueError(f"Unknown {family} flavor {flavor!r}.{hint} Valid flavors: {', '.join(valid)}")
