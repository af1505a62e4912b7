"""Training tokens/s with block_causal (document-masked) attention vs plain causal attention.

    python bench/document_mask.py [--steps 12] [--seq_len 512] [--max_document_tokens 128] [--repeats 2]

Each case runs train.py (the debug model) in a fresh process and reads the steady-state window
(the last log window, after warm-up) from its metrics.jsonl; cases alternate (causal, block,
causal, block, ...) so drift on a shared machine hits both alike, and the best run of each is kept.
``max_document_tokens`` cuts the stdlib files into documents of at most that many tokens, so every
packed row holds several documents. On CPU the block-causal path is SDPA with a boolean mask
(the causal one uses the fused is_causal kernel); on CUDA it is FlexAttention's block-sparse
kernel, which skips the masked blocks.
"""

import argparse
import os

import torch

from common import run_train

CAUSAL = ["--model.attention_mask", "causal", "--model.positions", "sequence"]
BLOCK = ["--model.attention_mask", "block_causal", "--model.positions", "document"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_document_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    common = ["--training.seq_len", str(args.seq_len), "--training.global_batch_size", str(args.batch),
              "--data.max_document_tokens", str(args.max_document_tokens),
              *(["--compile.enable"] if args.compile else [])]
    best = {"causal": 0.0, "block_causal": 0.0}
    for _ in range(args.repeats):
        for name, mode in (("causal", CAUSAL), ("block_causal", BLOCK)):
            record = run_train(common + mode, args.steps, log_freq=max(1, args.steps // 2))
            if "error" in record:
                raise SystemExit(f"{name} failed: {record['error']}")
            best[name] = max(best[name], record["tps"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    print(f"{device}, debugmodel, seq_len {args.seq_len}, batch {args.batch}, documents <= "
          f"{args.max_document_tokens} tokens, best of {args.repeats}")
    for name, tps in best.items():
        print(f"  {name:<13}{tps:>10,.0f} tok/s")
    print(f"  block_causal / causal: {best['block_causal'] / best['causal']:.2f}x")


if __name__ == "__main__":
    main()
