"""Layout-independent weight init: the same ``training.seed`` gives the same weights on any mesh.

Random ops on sharded DTensors do not reproduce single-device values on CPU, and a seed
checkpoint costs a save and a load. Instead every *unit* of the model (token embedding,
each block, final norm, output) is built whole, on its own, from the family's own classes
(``ModelSpec.model_cls`` and its ``block_cls``) and init code, with an RNG seeded from (seed, unit name); each rank then keeps the slice
its parameters hold (``distribute_tensor(..., src_data_rank=None)`` slices locally, no
communication). Peak extra memory is one unit. The single process takes the same path,
so every layout starts from exactly the single-device weights.
"""

import hashlib
from dataclasses import replace

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


# Wrappers that insert a level into parameter names (activation checkpointing, compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
_TOP_UNITS = ("tok_embeddings", "norm", "output")


def unit_seed(seed: int, unit: str) -> int:
    """A 63-bit seed from (seed, unit name): independent of layout, rank and build order."""
    digest = hashlib.sha256(f"{seed}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _build_full_unit(model_cls: type, args, unit: str, device: torch.device) -> nn.Module:
    """The unit built whole on ``device`` and initialized by the model's own init code."""
    if unit.startswith("layers."):
        with torch.device("meta"):
            block = model_cls.block_cls(int(unit.split(".", 1)[1]), args)
        block.to_empty(device=device)
        block.init_weights()
        return block
    # Embedding / norm / output init lives in the model's init_weights: run it on a shell
    # without layers that holds only this unit (the others are dropped before allocation).
    with torch.device("meta"):
        shell = model_cls(replace(args, n_layers=0))
    for other in _TOP_UNITS:
        if other != unit:
            setattr(shell, other, None)
    shell.to_empty(device=device)
    shell.init_weights(buffer_device=device)
    return getattr(shell, unit)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of ``full`` into ``param`` (a plain tensor or a DTensor)."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds ``full`` already, so each just slices its part.
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def _units(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level units, then the blocks. A unit whose parameters an earlier one holds (an output
    head tied to the embedding) is skipped: the weight is initialized once, as its owner's."""
    units, seen = {}, set()
    for name in _TOP_UNITS:
        module = getattr(model, name, None)
        if module is None or all(id(p) in seen for p in module.parameters()):
            continue
        seen.update(id(p) for p in module.parameters())
        units[name] = module
    for name, block in model.layers.named_children():
        units[f"layers.{name}"] = block
    return units


@torch.no_grad()
def init_model_weights(model: nn.Module, model_cls: type, args, seed: int, device: torch.device) -> None:
    """Initialize ``model`` (parallelized and materialized, possibly a pipeline stage) in place.

    ``device`` is where the full units are built (the compute device); RoPE tables are
    recomputed there too.
    """
    model.freqs_cis = model._precompute_freqs_cis(device)
    devices = [device] if device.type == "cuda" else []
    for unit, module in _units(model).items():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(unit_seed(seed, unit))
            full = _build_full_unit(model_cls, args, unit, device)
        # Persistent buffers too (an MoE router's balancing bias): to_empty left them undefined.
        full_state = {**dict(full.named_parameters()), **dict(full.named_buffers())}
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if _clean(name) in full_state:
                _copy_into(tensor, full_state[_clean(name)].to(tensor.dtype))
        del full, full_state
