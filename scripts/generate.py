"""Sample completions from a checkpoint of any kind, with a KV cache; tensor-parallel under torchrun.

    python scripts/generate.py --checkpoint outputs/checkpoint --prompt "def fib(n):" [--prompt ...]
        [--config outputs/config.toml] [--max_new_tokens 64] [--temperature 0.8] [--top_k 50]
        [--top_p 1.0] [--seed 0] [--tokenizer PATH] [--dtype bfloat16] [--max_seq_len N] [--no_kv_cache]
        [--output_json out.json]
    torchrun --standalone --nproc_per_node 2 scripts/generate.py ... --tp 2

``--checkpoint``: a training checkpoint (<dump>/checkpoint = its newest step, or a step-N), a
weights-only DCP export, a converted Meta/HF checkpoint, a Hugging Face folder or a Meta folder.
The model and tokenizer come from ``--config`` (the run's config.toml), else from the checkpoint
itself (see torchtitan/inference/loading.py). Prompts get a bos token and are batched together;
each row stops at eos or after ``--max_new_tokens``. ``--temperature 0`` is greedy decoding.
Prints every completion and the decode tokens/s (rank 0 only under TP). A bad input (missing
checkpoint, a config of another model, a prompt longer than the context, a --tp that does not
divide the heads) ends with one ``error: ...`` line and exit code 1 (argparse usage errors: 2).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from torchtitan.inference import GenerationStats, generate, load_for_inference  # noqa: E402
from torchtitan.inference.loading import DTYPES  # noqa: E402
from torchtitan.tools.cli import main_with_user_errors  # noqa: E402


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder of any kind (see above)")
    p.add_argument("--config", default="", help="the run's config.toml; default: the checkpoint's own")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per prompt at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (= torchrun --nproc_per_node)")
    p.add_argument("--tokenizer", default="", help="tokenizer file, or a folder with tokenizer.json")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--max_seq_len", type=int, default=0, help="longest prompt + completion (0 = the checkpoint's)")
    p.add_argument("--no_kv_cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--output_json", default="", help="also write prompts, token ids, completions and timings here")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> None:
    dtype = DTYPES[a.dtype] if a.dtype else None
    im = load_for_inference(a.config or None, a.checkpoint, tp=a.tp, dtype=dtype, tokenizer=a.tokenizer or None,
                            max_seq_len=a.max_seq_len)
    if im.tokenizer is None:
        raise ValueError(f"{im.source} names no tokenizer: pass --tokenizer PATH or the run's --config")
    prompts = [im.tokenizer.encode(text, bos=True, eos=False) for text in a.prompt]
    stats = GenerationStats()
    completions = generate(im, prompts, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed,
                           use_cache=not a.no_kv_cache, stats=stats)
    if im.rank != 0:
        return
    texts = [im.tokenizer.decode(ids) for ids in completions]
    for i, (prompt, text) in enumerate(zip(a.prompt, texts)):
        print(f"--- completion {i} ({len(completions[i])} tokens)\n{prompt}{text}")
    cache = "no KV cache" if a.no_kv_cache else "KV cache"
    print(f"decode: {stats.decode_tokens} tokens in {stats.decode_seconds:.3f}s = "
          f"{stats.decode_tokens_per_second:.1f} tokens/s (batch {len(prompts)}, {cache}, tp {a.tp}, "
          f"{im.device.type} {next(im.model.parameters()).dtype}); prefill {stats.prefill_seconds:.3f}s; "
          f"{im.source}")
    if a.output_json:
        record = {"prompts": a.prompt, "prompt_ids": prompts, "completion_ids": completions, "completions": texts,
                  "stats": {**vars(stats), "decode_tokens_per_second": stats.decode_tokens_per_second}}
        Path(a.output_json).write_text(json.dumps(record, indent=1) + "\n")


def parse_and_run(argv: list[str]) -> None:
    run(parse(argv))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    main_with_user_errors(parse_and_run, argv)  # a user error: one error: line, exit code 1


if __name__ == "__main__":
    main(sys.argv[1:])
