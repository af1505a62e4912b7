"""Meta's original Llama 3 checkpoint format (consolidated.NN.pth + params.json) -> our state dict.

Model-parallel shards are merged along the dims fairscale split them; ``params.json`` becomes
our args. Nothing unpickles without restriction: shards go through ``torch.load(weights_only=True)``.
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from torchtitan.models.llama.flavors import llama3_configs
from torchtitan.models.llama.hf_mapping import DEFAULT_MAX_SEQ_LEN
from torchtitan.components.weight_conversion import check_state_dict
from torchtitan.models.llama import LLAMA_SPEC
from torchtitan.models.llama.model import RoPEScalingArgs, TransformerModelArgs


def match_flavor(args: TransformerModelArgs) -> Optional[str]:
    return LLAMA_SPEC.match_flavor(args)


def meta_params_to_args(
    params: dict, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, rope_scaling_factor: Optional[float] = None
) -> TransformerModelArgs:
    """Meta's params.json -> our args.

    params.json says only ``use_scaled_rope``; the factor lives in Meta's code (8 for Llama 3.1,
    32 for 3.2). Order: ``rope_scaling_factor`` argument, then params.json's own
    ``rope_scaling_factor``, then the matching flavor's, then 8.
    """
    args = TransformerModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=params["vocab_size"],
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 500000.0)),
        max_seq_len=max_seq_len,
    )  # fmt: skip
    if not params.get("use_scaled_rope", False):
        return args
    factor = rope_scaling_factor or params.get("rope_scaling_factor")
    if factor is None:
        for scaling in (s for s in (f.rope_scaling for f in llama3_configs.values()) if s is not None):
            if match_flavor(dataclasses.replace(args, rope_scaling=scaling)) is not None:
                return dataclasses.replace(args, rope_scaling=scaling)
        factor = 8.0
    return dataclasses.replace(args, rope_scaling=RoPEScalingArgs(factor=float(factor)))




# Meta's model-parallel layout (fairscale): the dim each shard splits, None = replicated.
# ParallelEmbedding splits the embedding dim; ColumnParallelLinear the output rows (dim 0);
# RowParallelLinear the input columns (dim 1).
_META_SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}


def _meta_split_dim(name: str) -> Optional[int]:
    local = name.split(".", 2)[2] if name.startswith("layers.") else name
    if local not in _META_SPLIT_DIM:
        raise KeyError(f"unexpected parameter {name!r} in Meta checkpoint")
    return _META_SPLIT_DIM[local]


def merge_meta_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Model-parallel shards (consolidated.00, .01, ...) -> one full state dict in our FQNs."""
    merged = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue  # derived buffer; we recompute RoPE from the args
        parts = [s[name] for s in shards]
        dim = _meta_split_dim(name)
        if dim is None:
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(f"{name} should be replicated across model-parallel shards but differs")
            merged[name] = parts[0]
        else:
            merged[name] = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
    return merged


def load_meta_checkpoint(
    folder: str | Path, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, rope_scaling_factor: Optional[float] = None
) -> tuple[dict[str, torch.Tensor], TransformerModelArgs]:
    folder = Path(folder)
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not (folder / "params.json").is_file() or not paths:
        raise ValueError(f"{folder} is not a Meta Llama checkpoint: expected params.json and consolidated.NN.pth")
    args = meta_params_to_args(json.loads((folder / "params.json").read_text()), max_seq_len, rope_scaling_factor)
    # mmap: shards are not read into memory until concatenated; weights_only: no arbitrary unpickling.
    shards = [_load_pth(p) for p in paths]
    sd = merge_meta_shards(shards)
    check_state_dict(sd, args)
    return sd, args


def _load_pth(path: Path) -> dict:
    """A ``.pth`` shard with tensors only: anything else in its pickle is refused, never run."""
    import pickle

    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        raise ValueError(
            f"{path}: refused to unpickle (it holds more than tensors, loaded with weights_only=True): "
            f"{first[0][:300] if first else type(e).__name__}. Only use checkpoints from a source you trust; "
            f"re-download this one"
        ) from e
