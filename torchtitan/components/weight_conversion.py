"""Weight conversion between our DCP checkpoints and Hugging Face folders, for every registered family.

Every path goes through our state dict (FQNs such as ``layers.0.attention.wq.weight``) plus the
family's args; the family (``ModelSpec``) is found from the args' type, config.json's
``model_type`` or a training run's ``model.name``:

    HF *.safetensors + config.json  --load_hf_checkpoint---->  ours  <--load_dcp_model_state-- DCP
    ours --save_hf_checkpoint--> model.safetensors (+ index) + config.json (+ tokenizer.json and its config)
    ours --save_dcp--> DCP + model_args.json (the family's name and args)

Conversions carry the tokenizer: ``copy_tokenizer_files`` puts a source folder's tokenizer files
into ``<dcp>/tokenizer/``, where ``find_tokenizer`` (generate, eval, convert_dcp_to_hf) looks.
The trainer's end-of-training export is checked at start-up (``check_hf_export``) and never loses
the model (``export_hf_or_keep_weights``). Written files get the mode ``open()`` gives (umask).

Llama's original Meta format is Llama's own (``models/llama/meta_checkpoint.py``). Nothing here
needs a process group: DCP reads and writes on one process. Nothing unpickles without
restriction: DCP reads go through ``SafeLoadPlanner``.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan.components.checkpoint import SafeFileSystemReader, SafeLoadPlanner
from torchtitan.components.hf_tokenizer import hf_token_ids, save_hf_tokenizer
from torchtitan.components.save_errors import CheckpointWriteError, first_line, write_failed
from torchtitan.components.tokenizer import SentencePieceTokenizer, Tokenizer
from torchtitan.models.registry import ModelSpec, get_spec, registered, spec_for_hf_model_type

MODEL_ARGS_FILE = "model_args.json"  # written beside converted DCP weights: export needs no flavor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DEFAULT_MAX_SEQ_LEN = 8192  # RoPE table length when the source does not say (a training run sets its own)

# model_args.json files written before families had names, and config.json without model_type
# (hand-written Llama configs), are read as this family's.
_DEFAULT_FAMILY = "llama3"
TOKENIZER_DIR = "tokenizer"  # inside a converted DCP folder: the source's tokenizer files
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")  # in order of preference
# Beside them: their special tokens, and config.json, whose bos/eos ids HFTokenizer falls back to.
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")

# ----------------------------------------------------------------------------- model args


def spec_of(args) -> ModelSpec:
    """The registered family whose args class ``args`` is."""
    for spec in registered().values():
        if isinstance(args, spec.args_cls):
            return spec
    raise ValueError(f"{type(args).__name__} is not the args class of any registered model family")


def model_args_to_dict(args) -> dict:
    return {"model_name": spec_of(args).name, **dataclasses.asdict(args)}


def model_args_from_dict(d: dict):
    d = dict(d)
    return get_spec(d.pop("model_name", _DEFAULT_FAMILY)).args_from(d)


def match_flavor(args) -> Optional[str]:
    """The flavor of the args' family with these shapes (vocab and max_seq_len ignored), or None."""
    return spec_of(args).match_flavor(args)


def hf_config_to_args(config: dict):
    """config.json -> the args of the family that reads its ``model_type``."""
    return _hf_spec(config).hf.config_to_args(config)


def _hf_spec(config: dict) -> ModelSpec:
    model_type = config.get("model_type") or get_spec(_DEFAULT_FAMILY).hf.model_types[0]
    return spec_for_hf_model_type(model_type)


def check_state_dict(sd: dict[str, torch.Tensor], args) -> None:
    """Same keys and shapes as the family's model built from ``args``, or a ValueError naming the first difference."""
    with torch.device("meta"):
        expected = spec_of(args).model_cls(args).state_dict()
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


# ----------------------------------------------------------------------------- DCP


def save_dcp(sd: dict[str, torch.Tensor], args, folder: str | Path) -> Path:
    """A weights-only DCP checkpoint ({"model": sd}) plus model_args.json, written by this process
    alone: no process group needed, and one that exists (the trainer's rank 0) is not used."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": sd}, checkpoint_id=str(folder), no_dist=True)
    (folder / MODEL_ARGS_FILE).write_text(json.dumps(model_args_to_dict(args), indent=2) + "\n")
    return folder


def load_dcp_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model of a DCP checkpoint as full CPU tensors: its "model" entry (training checkpoints,
    converted weights), or its flat tensors (model-only saves: seed, ``model_weights_only``).

    Only the model's tensors are read: the optimizer state (2x the model) is never loaded.
    """
    reader = SafeFileSystemReader(str(folder))  # .metadata is a pickle: restricted unpickler
    tensors = {fqn: md for fqn, md in reader.read_metadata().state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata)}
    nested = any(fqn.startswith("model.") for fqn in tensors)
    sd = {
        fqn.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in tensors.items() if fqn.startswith("model.") or not nested
    }
    if not sd:
        raise ValueError(f"{folder} has no model tensors; is it a DCP checkpoint written by this framework?")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd} if nested else sd, storage_reader=reader, planner=SafeLoadPlanner())
    return sd


def dcp_model_args(folder: str | Path, sd: dict[str, torch.Tensor], flavor: str = "", model_name: str = ""):
    """Args of a DCP checkpoint: `flavor` (of `model_name`, default llama3) if given, else its
    model_args.json (converted weights), else the config.toml a training run saves in each
    checkpoint. Sizes come from the tensors."""
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
            model_name = cfg["model"].get("name", _DEFAULT_FAMILY)
        spec = get_spec(model_name or _DEFAULT_FAMILY)
        args = spec.build_args(flavor, vocab_size=vocab_size, max_seq_len=max_seq_len, n_layers=n_layers, dim=dim)
    check_state_dict(sd, args)
    return args


def _read_training_config(folder: Path) -> dict:
    from torchtitan.config.manager import load_toml

    path = folder / "config.toml"
    if not path.is_file():
        raise ValueError(f"{folder} has neither {MODEL_ARGS_FILE} nor config.toml: pass the model flavor")
    return load_toml(path)


# ----------------------------------------------------------------------------- Hugging Face


def require_safetensors(what: str):
    """The safetensors package (its torch API imported), or a one-line ValueError saying how to get it."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401  (callers use safetensors.torch.*)
    except ImportError as e:
        raise ValueError(
            f"{what} needs the safetensors package ({e}): pip install safetensors (requirements.txt has it)"
        ) from None
    return safetensors


def load_hf_checkpoint(
    folder: str | Path, dtype: Optional[torch.dtype] = None
) -> tuple[dict[str, torch.Tensor], object]:
    """HF folder of any registered family (config.json + model.safetensors or sharded with an index) -> ours."""
    load_file = require_safetensors(f"reading {folder}").torch.load_file
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = json.loads((folder / "config.json").read_text())
    spec = _hf_spec(config)
    args = spec.hf.config_to_args(config)
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
    sd = _cast(spec.hf.from_hf_state_dict(hf_sd, args), dtype)
    check_state_dict(sd, args)
    return sd, args


def save_hf_checkpoint(
    sd: dict[str, torch.Tensor],
    args,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer: Optional[Tokenizer] = None,
) -> Path:
    """Ours -> HF folder: model.safetensors, or model-0000i-of-0000n.safetensors + index json, + config.json.

    With ``tokenizer``, also its tokenizer.json + config (``hf_tokenizer.save_hf_tokenizer``) and
    its bos/eos/pad ids in config.json, which ``generate`` reads (LlamaConfig's defaults are 1 and 2).

    The files are written into ``<folder>.tmp``, then moved in: a full disk or an I/O error removes
    the partial files, leaves ``folder`` as it was and raises one ``CheckpointWriteError``.
    """
    SafetensorError = require_safetensors(f"writing {folder}").SafetensorError
    check_state_dict(sd, args)
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)  # a path through a file or an unwritable one fails as itself
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # debris of an export that was killed
    try:
        staging.mkdir()
        written = _write_hf_files(sd, args, staging, dtype, max_shard_bytes, tokenizer)
        for name in written:
            os.replace(staging / name, folder / name)
        for old in folder.glob("model*.safetensors*"):  # an earlier export's other shards and index
            if old.name not in written:
                old.unlink()
    except (OSError, SafetensorError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        nbytes = sum(v.numel() for v in sd.values()) * dtype.itemsize
        raise write_failed("exporting the model in Hugging Face format", folder, e, nbytes,
                           f"The partial export was removed; {folder} is as it was",
                           "free space on that file system, or export to a folder on a larger disk") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_hf_files(sd: dict[str, torch.Tensor], args, folder: Path, dtype: torch.dtype, max_shard_bytes: int,
                    tokenizer: Optional[Tokenizer]) -> list[str]:
    """The files of ``save_hf_checkpoint``, written into ``folder``; returns their names."""
    save_file = require_safetensors(f"writing {folder}").torch.save_file
    hf = spec_of(args).hf
    config = hf.args_to_config(args, dtype)
    if tokenizer is not None:  # first: a tokenizer that cannot be converted fails before the big write
        if tokenizer.n_words > args.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.n_words} tokens but the model only {args.vocab_size}: "
                "export with the tokenizer the model was trained with"
            )
        save_hf_tokenizer(tokenizer, folder, model_max_length=args.max_seq_len)
        config.update(hf_token_ids(tokenizer))
    hf_sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf.to_hf_state_dict(sd, args).items()}
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
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors writes its files 0600 (owner only): give them the mode open() gave config.json
    # (0644 under umask 022), so teammates can read the export too.
    mode = (folder / "config.json").stat().st_mode & 0o777
    for file in folder.glob("*.safetensors"):
        file.chmod(mode)
    return sorted(p.name for p in folder.iterdir())


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


# ----------------------------------------------------------------------------- tokenizer files


def copy_tokenizer_files(source: str | Path, dcp_folder: str | Path) -> Optional[Path]:
    """A Hugging Face or Meta folder's tokenizer copied into ``<dcp_folder>/tokenizer/`` (where
    ``find_tokenizer`` looks); that folder, or None when ``source`` has no tokenizer."""
    source = Path(source)
    if not any((source / name).is_file() for name in TOKENIZER_MODEL_FILES):
        return None
    target = Path(dcp_folder) / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_MODEL_FILES + _TOKENIZER_SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)  # not copy(): the mode follows the umask
    return target


def find_tokenizer(folder: str | Path) -> Optional[Path]:
    """The tokenizer file a checkpoint folder carries: its own tokenizer.json / tokenizer.model (HF
    and Meta folders) or its tokenizer/'s (converted DCP), or None."""
    for where in (Path(folder), Path(folder) / TOKENIZER_DIR):
        for name in TOKENIZER_MODEL_FILES:
            if (where / name).is_file():
                return where / name
    return None


# ----------------------------------------------------------------------------- the trainer's export


def hf_export_path(dump_folder: str, folder: str) -> Path:
    """checkpoint.hf_export_folder: relative to the dump folder, an absolute one as it is."""
    return Path(dump_folder) / folder


def check_hf_export(folder: str, dump_folder: str, tokenizer: Tokenizer) -> None:
    """Before training: the export at its end can be written (package installed, tokenizer
    convertible, folder writable). Nothing to check when the export is off (``folder`` empty)."""
    if not folder:
        return
    key = f"checkpoint.hf_export_folder={folder!r}"
    require_safetensors(f"{key} (the Hugging Face export after the last step)")
    if isinstance(tokenizer, SentencePieceTokenizer):  # converted by transformers' SpmConverter
        missing = [pkg for pkg, module in (("transformers", "transformers"), ("protobuf", "google.protobuf"))
                   if not _importable(module)]
        if missing:
            raise ValueError(f"{key} writes the sentencepiece tokenizer as tokenizer.json, which needs "
                             f"{' and '.join(missing)}: pip install {' '.join(missing)}")
    _probe_writable(hf_export_path(dump_folder, folder), key)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _probe_writable(path: Path, key: str) -> None:
    """Write what the export writes: a file in ``path`` and a folder beside it (its staging folder).

    A write probe, not a permission-bit check, as train.py's check_dump_folder: root ignores the
    bits, yet also fails here when the path runs through a regular file or a read-only mount.
    """
    tag = f"write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / f".{tag}").write_bytes(b"")
        (path / f".{tag}").unlink()
        path.with_name(f".{path.name}.{tag}").mkdir()
        path.with_name(f".{path.name}.{tag}").rmdir()
    except OSError as e:
        raise ValueError(
            f"{key} is not a writable folder ({e.strerror or e}: {e.filename or path}); the model is exported "
            f"there after the last step: pass a folder you can write (a relative one is under job.dump_folder)"
        ) from None


def export_hf_or_keep_weights(sd: dict[str, torch.Tensor], args, folder: Path, tokenizer: Optional[Tokenizer],
                              dump_folder: str, final_checkpoint: Optional[Path]) -> Optional[str]:
    """The trainer's export (on one rank); None when written, else the error (what failed and where
    the weights are, then the command that exports them), after the weights were made safe: ``final_checkpoint`` (this step's checkpoint) if any, else a weights-only
    DCP in ``<dump>/final_weights`` (with the run's config.toml, so the tokenizer is known)."""
    try:
        save_hf_checkpoint(sd, args, folder, tokenizer=tokenizer)
        return None
    except Exception as e:  # whatever failed, the trained weights must outlive it
        cause = e.__cause__ if isinstance(e, CheckpointWriteError) and e.__cause__ is not None else e
        failed = f"exporting the model in Hugging Face format to {folder} failed ({type(cause).__name__}: " \
                 f"{first_line(cause)})"
    if final_checkpoint is None:
        final_checkpoint = Path(dump_folder) / "final_weights"
        try:
            save_dcp(sd, args, final_checkpoint)
            if (Path(dump_folder) / "config.toml").is_file():
                shutil.copyfile(Path(dump_folder) / "config.toml", final_checkpoint / "config.toml")
        except Exception as e:
            return (f"{failed}, and saving the final weights to {final_checkpoint} failed too "
                    f"({type(e).__name__}: {first_line(e)}): they are lost; set checkpoint.enable to keep them")
    # The command on a line of its own: the CLI prints such lines unwrapped, so it copies whole.
    return (f"{failed}; the final weights are safe in {final_checkpoint}; export them later with:\n"
            f"python scripts/convert_dcp_to_hf.py {final_checkpoint} {folder}")
