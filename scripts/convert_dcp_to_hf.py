"""A DCP checkpoint of our model -> a Hugging Face Llama folder (LlamaForCausalLM.from_pretrained).

    python scripts/convert_dcp_to_hf.py <dcp_dir> <output_hf_dir>
        [--flavor NAME] [--dtype float32|bfloat16] [--max-shard-gb 5]
        [--tokenizer PATH] [--tokenizer-cache-dir DIR] [--no-tokenizer]

<dcp_dir> is a training checkpoint (<dump>/checkpoint/step-N, or <dump>/checkpoint for its newest
complete step: only the model is read, not the optimizer), a weights-only one (model_weights_only,
<dump>/final_weights of a failed export) or one from convert_{llama,hf}_to_dcp.py. The model args
come from --flavor, else the checkpoint's model_args.json, else the config.toml a training
run saves in each checkpoint; sizes are checked against the tensors. Writes model.safetensors
(or shards + model.safetensors.index.json) and config.json; q/k rows are permuted to HF's
rotate-half RoPE layout. The tokenizer (tokenizer.json + its config, so AutoTokenizer encodes as
training did) is --tokenizer, else the run's tokenizer.path from the checkpoint's config.toml
("" = the embedded tokenizer, from its cache dir), else the one a conversion carried
(<dcp_dir>/tokenizer/, see convert_hf_to_dcp.py); otherwise none unless --tokenizer is given.
A bad input (or safetensors not installed) ends in one ``error:`` line.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.components.tokenizer import Tokenizer, build_tokenizer  # noqa: E402
from torchtitan.components.weight_conversion import (  # noqa: E402
    DTYPES,
    dcp_model_args,
    find_tokenizer,
    load_dcp_model_state,
    require_safetensors,
    save_hf_checkpoint,
)
from torchtitan.config.manager import load_toml  # noqa: E402
from torchtitan.inference.loading import find_checkpoint  # noqa: E402
from torchtitan.tools.cli import main_with_user_errors  # noqa: E402


def _tokenizer(a: argparse.Namespace) -> Tokenizer | None:
    """--tokenizer, else the training run's (config.toml beside the checkpoint), else the carried one, else None."""
    config = a.dcp_dir / "config.toml"
    run = load_toml(config)["tokenizer"] if config.is_file() else None
    carried = find_tokenizer(a.dcp_dir)
    if a.no_tokenizer or (a.tokenizer is None and run is None and carried is None):
        return None
    if a.tokenizer is None and run is None:
        return build_tokenizer(str(carried))
    path = a.tokenizer if a.tokenizer is not None else run["path"]
    cache_dir = a.tokenizer_cache_dir if a.tokenizer_cache_dir is not None else (run or {}).get("cache_dir", "")
    return build_tokenizer(path, cache_dir)


def _dcp_folder(path: Path) -> Path:
    """``path``, or the newest complete step-N of a checkpoint folder; a ValueError for other kinds."""
    source = find_checkpoint(path)
    if source.kind != "dcp":
        raise ValueError(f"{source.describe()} is not a DCP checkpoint: pass a training or weights-only DCP folder")
    if source.path != path:
        print(f"converting {source.path}, the newest complete checkpoint in {path}")
    return source.path


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dcp_dir", type=Path, help="DCP checkpoint folder (<dump>/checkpoint, a step-N, weights-only)")
    p.add_argument("output_dir", type=Path, help="Hugging Face folder to write")
    p.add_argument("--flavor", default="", help="model flavor; default: from model_args.json or config.toml")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the safetensors")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file before sharding")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer to write: tiktoken, sentencepiece or tokenizer.json (or its folder); '' = the "
                        "embedded one; default: the run's tokenizer.path from the checkpoint's config.toml")
    p.add_argument("--tokenizer-cache-dir", default=None,
                   help="where the embedded tokenizer is cached; default: the run's tokenizer.cache_dir")
    p.add_argument("--no-tokenizer", action="store_true", help="write the weights and config.json only")
    a = p.parse_args(argv)
    require_safetensors("scripts/convert_dcp_to_hf.py")  # before reading a checkpoint of many GB
    a.dcp_dir = _dcp_folder(a.dcp_dir)
    sd = load_dcp_model_state(a.dcp_dir)
    args = dcp_model_args(a.dcp_dir, sd, a.flavor)
    tokenizer = _tokenizer(a)
    save_hf_checkpoint(sd, args, a.output_dir, DTYPES[a.dtype], int(a.max_shard_gb * 2**30), tokenizer=tokenizer)
    with_tokenizer = f"with its {type(tokenizer).__name__}" if tokenizer else "without a tokenizer"
    print(f"wrote {a.output_dir} ({a.dtype}, {with_tokenizer}): {args}")


def main(argv: list[str] | None = None) -> None:
    main_with_user_errors(run, argv)  # a user error: one error: line, exit code 1


if __name__ == "__main__":
    main(sys.argv[1:])
