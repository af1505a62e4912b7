"""Weight conversion between our DCP checkpoints, Meta's original Llama 3 format and HF Llama.

Every path goes through our state dict (FQNs such as ``layers.0.attention.wq.weight``, Meta's
interleaved RoPE layout) plus a ``TransformerModelArgs``:

    Meta consolidated.NN.pth + params.json --load_meta_checkpoint-->  ours  --save_dcp--> DCP
    HF *.safetensors + config.json         --load_hf_checkpoint---->  ours  <--load_dcp_model_state-- DCP
    ours --save_hf_checkpoint--> model.safetensors (+ index) + config.json

Nothing here needs a process group: DCP reads and writes on one process. Nothing unpickles
without restriction: ``.pth`` shards go through ``torch.load(weights_only=True)`` and DCP
reads go through ``SafeLoadPlanner``. The scripts in ``scripts/convert_*.py`` wrap this module.
"""

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan.components.checkpoint import SafeFileSystemReader, SafeLoadPlanner
from torchtitan.models.llama import (
    RoPEScalingArgs,
    Transformer,
    TransformerModelArgs,
    compute_ffn_hidden_dim,
    llama3_configs,
)
from torchtitan.models.llama.hf_mapping import from_hf_state_dict, to_hf_config, to_hf_state_dict

MODEL_ARGS_FILE = "model_args.json"  # written beside converted DCP weights: export needs no flavor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DEFAULT_MAX_SEQ_LEN = 8192  # RoPE table length when the source does not say (a training run sets its own)

# ----------------------------------------------------------------------------- model args


def model_args_to_dict(args: TransformerModelArgs) -> dict:
    return dataclasses.asdict(args)


def model_args_from_dict(d: dict) -> TransformerModelArgs:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RoPEScalingArgs(**d["rope_scaling"])
    return TransformerModelArgs(**d)


def match_flavor(args: TransformerModelArgs) -> Optional[str]:
    """The flavor with these shapes and RoPE settings (vocab and max_seq_len ignored), or None."""
    for name, flavor in llama3_configs.items():
        if _shape_key(flavor) == _shape_key(args):
            return name
    return None


def _shape_key(a: TransformerModelArgs) -> tuple:
    return (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.norm_eps, a.rope_theta, a.rope_scaling)


def meta_params_to_args(
    params: dict, max_seq_len: int = _DEFAULT_MAX_SEQ_LEN, rope_scaling_factor: Optional[float] = None
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
        max_seq_len=config.get("max_position_embeddings", _DEFAULT_MAX_SEQ_LEN),
    )  # fmt: skip


def _ffn_params(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) giving FFN size `hidden`: a flavor's when one fits, else exact."""
    for f in llama3_configs.values():
        if compute_ffn_hidden_dim(dim, f.multiple_of, f.ffn_dim_multiplier) == hidden:
            return f.multiple_of, f.ffn_dim_multiplier
    base = int(2 * (4 * dim) / 3)
    # Rounding `base` (scaled down when larger) up to a multiple of `hidden` gives `hidden` itself.
    return hidden, None if base <= hidden else hidden / base


def check_state_dict(sd: dict[str, torch.Tensor], args: TransformerModelArgs) -> None:
    """Same keys and shapes as `Transformer(args)`, or a ValueError naming the first difference."""
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit {args}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, t in expected.items():
        if tuple(sd[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: shape {tuple(sd[name].shape)} but the model args give {tuple(t.shape)}")


def _cast(sd: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return sd if dtype is None else {k: v.to(dtype) for k, v in sd.items()}


# ----------------------------------------------------------------------------- Meta format

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
    folder: str | Path, max_seq_len: int = _DEFAULT_MAX_SEQ_LEN, rope_scaling_factor: Optional[float] = None
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


# ----------------------------------------------------------------------------- DCP


def save_dcp(sd: dict[str, torch.Tensor], args: TransformerModelArgs, folder: str | Path) -> Path:
    """A weights-only DCP checkpoint ({"model": sd}) plus model_args.json; no process group needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    with warnings.catch_warnings():  # "no process group: single-process save" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": sd}, checkpoint_id=str(folder))
    (folder / MODEL_ARGS_FILE).write_text(json.dumps(model_args_to_dict(args), indent=2) + "\n")
    return folder


def load_dcp_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The "model" entry of a DCP checkpoint (training or weights-only) as full CPU tensors.

    Only the model's tensors are read: the optimizer state (2x the model) is never loaded.
    """
    reader = SafeFileSystemReader(str(folder))  # .metadata is a pickle: restricted unpickler
    metadata = reader.read_metadata()
    sd = {
        fqn.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    if not sd:
        raise ValueError(f"{folder} has no 'model' tensors; is it a DCP checkpoint written by this framework?")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, storage_reader=reader, planner=SafeLoadPlanner())
    return sd


def dcp_model_args(folder: str | Path, sd: dict[str, torch.Tensor], flavor: str = "") -> TransformerModelArgs:
    """Args of a DCP checkpoint: `flavor` if given, else its model_args.json (converted weights),
    else the config.toml a training run saves in each checkpoint. Sizes come from the tensors."""
    folder = Path(folder)
    vocab_size, dim = sd["tok_embeddings.weight"].shape
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    if not flavor and (folder / MODEL_ARGS_FILE).is_file():
        args = model_args_from_dict(json.loads((folder / MODEL_ARGS_FILE).read_text()))
    else:
        max_seq_len = _DEFAULT_MAX_SEQ_LEN
        if not flavor:
            cfg = _read_training_config(folder)
            flavor, max_seq_len = cfg["model"]["flavor"], cfg["training"]["seq_len"]
        if flavor not in llama3_configs:
            raise ValueError(f"unknown flavor {flavor!r}; valid: {', '.join(llama3_configs)}")
        args = dataclasses.replace(
            llama3_configs[flavor], vocab_size=vocab_size, dim=dim, n_layers=n_layers, max_seq_len=max_seq_len
        )
    check_state_dict(sd, args)
    return args


def _read_training_config(folder: Path) -> dict:
    from torchtitan.config.manager import load_toml

    path = folder / "config.toml"
    if not path.is_file():
        raise ValueError(f"{folder} has neither {MODEL_ARGS_FILE} nor config.toml: pass the model flavor")
    return load_toml(path)


# ----------------------------------------------------------------------------- Hugging Face


def load_hf_checkpoint(
    folder: str | Path, dtype: Optional[torch.dtype] = None
) -> tuple[dict[str, torch.Tensor], TransformerModelArgs]:
    """HF Llama folder (config.json + model.safetensors or sharded with an index) -> ours."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: not a Hugging Face model folder")
    args = hf_config_to_args(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors weights (.bin checkpoints are not read: unsafe pickle)")
    hf_sd = {}
    for name in files:
        hf_sd.update(load_file(folder / name))
    sd = _cast(from_hf_state_dict(hf_sd, args), dtype)
    check_state_dict(sd, args)
    return sd, args


def hf_config(args: TransformerModelArgs, dtype: torch.dtype) -> dict:
    """config.json content that `LlamaForCausalLM.from_pretrained` reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **to_hf_config(args),
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_hf_checkpoint(
    sd: dict[str, torch.Tensor],
    args: TransformerModelArgs,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Ours -> HF folder: model.safetensors, or model-0000i-of-0000n.safetensors + index json, + config.json."""
    from safetensors.torch import save_file

    check_state_dict(sd, args)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf_state_dict(sd, args).items()}
    shards = _shard_by_bytes(hf_sd, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers expects this tag on safetensors files
    if len(shards) == 1:
        save_file(hf_sd, folder / "model.safetensors", metadata=metadata)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: hf_sd[n] for n in names}, folder / file, metadata=metadata)
            weight_map.update(dict.fromkeys(names, file))
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")
    return folder


def _shard_by_bytes(sd: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Consecutive names grouped into shards of at most `max_bytes` (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
