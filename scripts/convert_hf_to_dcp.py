"""Hugging Face Llama (config.json + *.safetensors) -> a DCP checkpoint of our model.

    python scripts/convert_hf_to_dcp.py <hf_model_dir> <output_dcp_dir> [--dtype float32|bfloat16|keep]

Reads model.safetensors or the shards named by model.safetensors.index.json (never .bin
pickles), undoes HF's RoPE q/k row permutation, and writes a weights-only DCP checkpoint
({"model": state_dict}) plus model_args.json. A tied lm_head (Llama 3.2 1B/3B) becomes a
separate copy of the embedding. The folder's tokenizer (tokenizer.json / tokenizer.model with
tokenizer_config.json, special_tokens_map.json, config.json) is copied into
<output_dcp_dir>/tokenizer/, where scripts/generate.py, scripts/eval.py and convert_dcp_to_hf.py
find it. Train from it with ``--checkpoint.enable --checkpoint.initial_load_path <output_dcp_dir>
--tokenizer.path <output_dcp_dir>/tokenizer``. A bad input ends in one ``error:`` line.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.components.weight_conversion import (  # noqa: E402
    DTYPES,
    copy_tokenizer_files,
    load_hf_checkpoint,
    match_flavor,
    save_dcp,
)
from torchtitan.tools.cli import main_with_user_errors  # noqa: E402


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", type=Path, help="folder with config.json and *.safetensors")
    p.add_argument("output_dir", type=Path, help="DCP checkpoint folder to write")
    p.add_argument("--dtype", choices=[*DTYPES, "keep"], default="float32", help="dtype of the written weights")
    a = p.parse_args(argv)
    sd, args = load_hf_checkpoint(a.hf_dir, None if a.dtype == "keep" else DTYPES[a.dtype])
    save_dcp(sd, args, a.output_dir)
    tokenizer = copy_tokenizer_files(a.hf_dir, a.output_dir)
    print(f"wrote {a.output_dir}: flavor {match_flavor(args) or '(none matches)'}, {args}")
    print(f"tokenizer: {tokenizer or f'none in {a.hf_dir} (generate and eval need --tokenizer)'}")


def main(argv: list[str] | None = None) -> None:
    main_with_user_errors(run, argv)  # a user error: one error: line, exit code 1


if __name__ == "__main__":
    main(sys.argv[1:])
