"""Train a byte-level BPE on the embedded stdlib corpus and write it in tiktoken (Llama 3) format.

    python scripts/train_tokenizer.py --output ./assets/stdlib_bpe.tiktoken --vocab_size 4096

Training needs no network. The default tokenizer (``tokenizer.path = ""``) is this same file,
built on first use and cached; run this script to place one somewhere explicit instead.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing

from torchtitan.components.tokenizer import NUM_SPECIAL_TOKENS, TikTokenizer  # noqa: E402
from torchtitan.components.tokenizer_training import (  # noqa: E402
    DEFAULT_VOCAB_SIZE,
    train_bpe,
    write_tiktoken_file,
)
from torchtitan.datasets.stdlib_corpus import stdlib_files  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output", required=True, help="Path of the tiktoken file to write")
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"Total vocabulary incl. the {NUM_SPECIAL_TOKENS} Llama 3 special tokens "
        f"(BPE ranks = vocab_size - {NUM_SPECIAL_TOKENS})",
    )
    parser.add_argument(
        "--val_fraction",
        type=float,
        default=0.01,
        help="Fraction of stdlib files held out for validation, never trained on (match data config)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.vocab_size < NUM_SPECIAL_TOKENS + 256:
        sys.exit(f"--vocab_size must be at least {NUM_SPECIAL_TOKENS + 256} (256 bytes + specials)")
    files = stdlib_files("train", args.val_fraction)
    start = time.perf_counter()
    ranks = train_bpe(files, args.vocab_size - NUM_SPECIAL_TOKENS)
    write_tiktoken_file(ranks, args.output)
    n_words = TikTokenizer(args.output).n_words  # reload: proves the file is valid
    print(
        f"trained {len(ranks)} BPE ranks on {len(files)} stdlib files in "
        f"{time.perf_counter() - start:.1f}s; vocab {n_words} with special tokens -> {args.output}"
    )


if __name__ == "__main__":
    main()
