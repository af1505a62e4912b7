"""Load a model of any registered family from any checkpoint we read, ready for inference.

    im = load_for_inference(config, checkpoint, device=None, tp=1, dtype=None, tokenizer=None, max_seq_len=0)
    im.model(tokens_BT, positions=None) -> logits_BTV      # eval mode, on im.device, TP-sharded if tp > 1
    im.tokenizer, im.args, im.spec, im.max_seq_len

(scripts/generate.py and scripts/eval.py build on this; keep the names and the signature.)

``checkpoint`` may be
- a DCP training checkpoint ``<dump>/checkpoint/step-N``, or the ``<dump>/checkpoint`` folder itself
  (then its newest complete step), saved by any layout (FSDP, TP, PP, EP: DCP reshards on load);
- a weights-only DCP export (``checkpoint.model_weights_only``, the seed checkpoint) or a converted
  one (scripts/convert_{hf,llama}_to_dcp.py, with its ``model_args.json``);
- a Hugging Face folder (``config.json`` + ``*.safetensors``);
- a Meta Llama folder (``params.json`` + ``consolidated.NN.pth``).

The model config: ``config`` (a run's ``config.toml``: model, [moe], tokenizer, seq_len) if given,
else what the checkpoint carries (the ``config.toml`` every training checkpoint holds,
``model_args.json``, ``config.json``, ``params.json``). A checkpoint whose tensors do not fit that
config is refused naming the first mismatch. The tokenizer: ``tokenizer`` (a tokenizer file or
a folder with ``tokenizer.json``), else the config's, else the checkpoint folder's own
(``tokenizer.json``, ``tokenizer.model``, or those a conversion put in its ``tokenizer/``); None when
nothing names one.

``max_seq_len`` (0 = the checkpoint's: the training seq_len, config.json's max_position_embeddings)
is the longest prompt + completion. Under ``tp > 1`` the process group must have exactly ``tp``
ranks (torchrun --nproc_per_node tp); it is created here if torchrun started us and nobody did.
"""

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.components.checkpoint import CheckpointManager, ModelState
from torchtitan.components.model_builder import build_model_args
from torchtitan.components.tokenizer import Tokenizer, build_tokenizer
from torchtitan.components.weight_conversion import (
    MODEL_ARGS_FILE,
    find_tokenizer,
    hf_config_to_args,
    load_hf_checkpoint,
    model_args_from_dict,
    spec_of,
)
from torchtitan.config.job_config import ActivationCheckpoint, Checkpoint, Comm, Compile, JobConfig, Parallelism
from torchtitan.config.manager import ConfigManager
from torchtitan.models.llama.meta_checkpoint import load_meta_checkpoint, meta_params_to_args
from torchtitan.models.registry import ModelSpec, get_spec
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.utils import init_distributed

_STEP_DIR = re.compile(r"^step-(\d+)$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KINDS_HINT = (
    "a training checkpoint (<dump>/checkpoint or its step-N), a weights-only DCP export, a Hugging Face "
    "folder (config.json + *.safetensors) or a Meta folder (params.json + consolidated.*.pth)"
)


@dataclass
class InferenceModel:
    model: nn.Module  # eval mode, no grads, on ``device``; TP-sharded (replicated logits) when tp > 1
    tokenizer: Optional[Tokenizer]
    args: Any  # the family's model args
    spec: ModelSpec
    max_seq_len: int  # longest prompt + completion (the RoPE table)
    device: torch.device
    source: str  # what was loaded, e.g. "DCP training checkpoint outputs/checkpoint/step-200"
    tp_mesh: Optional[DeviceMesh] = None

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0


@dataclass(frozen=True)
class CheckpointSource:
    kind: str  # "dcp" | "hf" | "meta"
    path: Path

    def describe(self) -> str:
        if self.kind != "dcp":
            return {"hf": "Hugging Face folder", "meta": "Meta Llama folder"}[self.kind] + f" {self.path}"
        if (self.path / "config.toml").is_file():
            return f"DCP checkpoint {self.path}"
        return f"DCP export {self.path}"


def find_checkpoint(path: str | Path) -> CheckpointSource:
    """What kind of checkpoint ``path`` is (a checkpoint folder resolves to its newest complete step)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist: pass {_KINDS_HINT}")
    if (path / ".metadata").is_file():
        return CheckpointSource("dcp", path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return CheckpointSource("hf", path)
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return CheckpointSource("meta", path)
    steps = sorted((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))) \
        if path.is_dir() else []
    complete = [p for _, p in steps if (p / ".metadata").is_file()]
    if complete:
        return CheckpointSource("dcp", complete[-1])
    what = f"only incomplete saves ({', '.join(p.name for _, p in steps)})" if steps else "no checkpoint files"
    raise ValueError(f"checkpoint {str(path)!r} holds {what}: pass {_KINDS_HINT}")


def load_for_inference(config: Optional[str], checkpoint: str | Path, device: Optional[torch.device] = None,
                       tp: int = 1, dtype: Optional[torch.dtype] = None, tokenizer: Optional[str] = None,
                       max_seq_len: int = 0) -> InferenceModel:
    """The model of ``checkpoint`` (see the module docstring); dtype None = bfloat16 on CUDA, else float32."""
    source = find_checkpoint(checkpoint)
    cfg = _job_config(config, source)
    tok = _load_tokenizer(tokenizer, cfg, source)
    spec, args = _model_args(cfg, source, tok)
    if max_seq_len > 0:
        args = dataclasses.replace(args, max_seq_len=max_seq_len)
    _check_tp(args, tp)
    if tok is not None and tok.n_words > args.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.n_words} tokens but the model only {args.vocab_size} embedding rows: "
            f"pass the tokenizer the model was trained with (--tokenizer or the run's --config)"
        )
    device = device or _default_device(tp)
    dims = _tp_dims(tp, device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = _build(spec, args, device, dtype, dims)
    _load_weights(model, source, args, sharded=dims is not None)
    model.eval().requires_grad_(False)
    tp_mesh = dims.submesh("tp") if dims is not None else None
    return InferenceModel(model, tok, args, spec, args.max_seq_len, device, source.describe(), tp_mesh)


# ----------------------------------------------------------------------------- config and args


def _job_config(config: Optional[str], source: CheckpointSource) -> Optional[JobConfig]:
    """The run's config: the one given, else the config.toml a training checkpoint carries."""
    path = Path(config) if config else None
    if path is None and source.kind == "dcp" and (source.path / "config.toml").is_file():
        path = source.path / "config.toml"
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"config {str(path)!r} does not exist: pass the config.toml of the run (<dump>/config.toml)")
    return ConfigManager().parse_args(["--job.config_file", str(path)])


def _model_args(cfg: Optional[JobConfig], source: CheckpointSource, tok: Optional[Tokenizer]) -> tuple[ModelSpec, Any]:
    if cfg is not None:
        spec = get_spec(cfg.model.name)
        vocab = tok.n_words if tok is not None else cfg.model.vocab_size
        return spec, build_model_args(cfg, spec, vocab)
    if source.kind == "hf":
        args = hf_config_to_args(json.loads((source.path / "config.json").read_text()))
    elif source.kind == "meta":
        args = meta_params_to_args(json.loads((source.path / "params.json").read_text()))
    elif (source.path / MODEL_ARGS_FILE).is_file():
        args = model_args_from_dict(json.loads((source.path / MODEL_ARGS_FILE).read_text()))
    else:
        raise ValueError(
            f"{source.path} has neither config.toml nor {MODEL_ARGS_FILE}, so nothing says its model: "
            f"pass the run's config with --config <dump>/config.toml"
        )
    return spec_of(args), args


def _load_tokenizer(path: Optional[str], cfg: Optional[JobConfig], source: CheckpointSource) -> Optional[Tokenizer]:
    if path:
        return build_tokenizer(path)  # a file of any format we read, or a folder with tokenizer.json
    if cfg is not None:
        return build_tokenizer(cfg.tokenizer.path, cfg.tokenizer.cache_dir)
    carried = find_tokenizer(source.path)  # HF and Meta folders' own; a converted DCP's tokenizer/
    return build_tokenizer(str(carried)) if carried is not None else None


def _check_tp(args, tp: int) -> None:
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if args.n_heads % tp or args.n_kv_heads % tp:
        fits = [d for d in range(1, args.n_kv_heads + 1) if args.n_heads % d == 0 and args.n_kv_heads % d == 0]
        raise ValueError(
            f"--tp {tp} must divide n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads} (each rank holds whole "
            f"heads): pick --tp from {', '.join(map(str, fits))}"
        )


# ----------------------------------------------------------------------------- devices and TP


def _default_device(tp: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if tp > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def _tp_dims(tp: int, device: torch.device) -> Optional[ParallelDims]:
    """A tp-only layout over every rank (None for tp = 1); joins the process group torchrun set up."""
    if tp == 1:  # also inside a process group: each rank then holds the whole model
        return None
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    if world != tp:
        raise ValueError(
            f"--tp {tp} needs exactly {tp} processes but there are {world}: run "
            f"`torchrun --nproc_per_node {tp} scripts/generate.py ... --tp {tp}`"
            + (f" (or pass --tp {world})" if world > 1 else "")
        )
    if not dist.is_initialized():
        init_distributed(Comm(trace_buf_size=0), ".")
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=tp, pp=1, world_size=tp)
    dims.build_mesh(device.type)
    return dims


def _build(spec: ModelSpec, args, device: torch.device, dtype: torch.dtype, dims: Optional[ParallelDims]) -> nn.Module:
    """Meta model -> the family's TP plan (logits replicated) -> cast -> materialized on ``device``."""
    with torch.device("meta"):
        model = spec.model_cls(args)
    if dims is not None:
        # loss_parallel=False: the output head all-gathers the vocab, so every rank samples from
        # the same full logits (and with the same generator, draws the same token).
        spec.parallelize(model, dims, ActivationCheckpoint(), Compile(),
                         parallelism=Parallelism(tp=dims.tp, dp_shard=1, loss_parallel=False))
    model.to(dtype)  # on meta: casting costs nothing, and full-precision copies are never allocated
    model.to_empty(device=device)
    # Derived buffers are not in checkpoints: recompute (the RoPE table stays in fp32).
    model.freqs_cis = model._precompute_freqs_cis(device)
    return model


# ----------------------------------------------------------------------------- weights


def _load_weights(model: nn.Module, source: CheckpointSource, args, sharded: bool) -> None:
    if source.kind == "dcp":
        # The checkpoint manager's model-only load: nested ("model." keys) or flat exports, a clear
        # error naming the first tensor that does not fit, DCP resharding to our layout.
        manager = CheckpointManager(Checkpoint(initial_load_path=str(source.path)), "", {"model": ModelState(model)})
        with warnings.catch_warnings():  # "no process group: single-process load" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            manager.load()
        return
    sd, problem = {}, [None]
    if not sharded or dist.get_rank() == 0:  # under TP rank 0 reads and broadcasts
        if source.kind == "hf":
            sd, _ = load_hf_checkpoint(source.path)
        else:
            sd, _ = load_meta_checkpoint(source.path, max_seq_len=args.max_seq_len)
        problem = [_shape_problem(source, sd, model)]
    if sharded:  # every rank raises, rather than the others waiting for a broadcast that never comes
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ValueError(problem[0])
    ours = model.state_dict()
    sd = {k: v.to(ours[k].dtype) for k, v in sd.items()}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded,
                                                             strict=True))


def _shape_problem(source: CheckpointSource, sd: dict[str, torch.Tensor], model: nn.Module) -> Optional[str]:
    """The error message naming the first tensor that does not fit the model, or None."""
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k} has shape {list(sd[k].shape)} in the checkpoint but {s} in the model"
                for k, s in ours.items() if k in sd and list(sd[k].shape) != s]
    problems += [f"{k} {s} is in the model but not in the checkpoint" for k, s in ours.items() if k not in sd]
    problems += [f"{k} is in the checkpoint but not in the model" for k in sd if k not in ours]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
    return (
        f"{source.describe()} does not match the model: {problems[0]}{more}. The --config describes another "
        f"model: drop --config (the folder carries its own) or pass the config it was trained with"
    )
