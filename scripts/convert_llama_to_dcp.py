"""Meta's original Llama 3 checkpoint (params.json + consolidated.NN.pth) -> a DCP checkpoint.

    python scripts/convert_llama_to_dcp.py <meta_checkpoint_dir> <output_dcp_dir>
        [--flavor NAME] [--max-seq-len N] [--rope-scaling-factor F] [--dtype float32|bfloat16|keep]

The model-parallel shards are merged (fairscale layout) and written as a weights-only DCP
checkpoint ({"model": state_dict}) plus model_args.json, and the folder's tokenizer.model into
<output_dcp_dir>/tokenizer/ (where generate, eval and convert_dcp_to_hf.py find it). Our model
uses Meta's interleaved RoPE layout, so no weight is permuted. Start training from it with
``--checkpoint.enable --checkpoint.initial_load_path <output_dcp_dir>`` (weights only: optimizer,
schedule and data start fresh), or load it yourself with
``dcp.load({"model": model.state_dict()}, checkpoint_id=<output_dcp_dir>)``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.components.weight_conversion import DTYPES, copy_tokenizer_files, save_dcp  # noqa: E402
from torchtitan.models.llama.meta_checkpoint import load_meta_checkpoint, match_flavor  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("meta_dir", type=Path, help="folder with params.json and consolidated.NN.pth")
    p.add_argument("output_dir", type=Path, help="DCP checkpoint folder to write")
    p.add_argument("--flavor", default="", help="fail unless params.json matches this flavor (e.g. 8B)")
    p.add_argument("--max-seq-len", type=int, default=8192, help="RoPE table length stored in model_args.json")
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="with use_scaled_rope: 8 (Llama 3.1) or 32 (3.2); default: the matching flavor's, else 8")
    p.add_argument("--dtype", choices=[*DTYPES, "keep"], default="float32",
                   help="dtype of the written weights (training keeps fp32 master weights)")
    a = p.parse_args(argv)
    sd, args = load_meta_checkpoint(a.meta_dir, a.max_seq_len, a.rope_scaling_factor)
    flavor = match_flavor(args)
    if a.flavor and flavor != a.flavor:
        raise SystemExit(f"params.json does not match flavor {a.flavor!r} (it matches {flavor or 'no flavor'}): {args}")
    if a.dtype != "keep":
        sd = {k: v.to(DTYPES[a.dtype]) for k, v in sd.items()}
    save_dcp(sd, args, a.output_dir)
    tokenizer = copy_tokenizer_files(a.meta_dir, a.output_dir)
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {a.output_dir}: {n:,} parameters, flavor {flavor or '(none matches)'}, {args}")
    print(f"tokenizer: {tokenizer or f'none in {a.meta_dir} (generate and eval need --tokenizer)'}")
    if flavor is not None:
        print(f"train with --model.flavor {flavor} (vocab_size {args.vocab_size} must match the tokenizer)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's input: one message, no traceback
        raise SystemExit(f"error: {e}") from None
