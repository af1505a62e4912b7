"""Time of one AdamW step for each implementation, on the parameters of a model flavor.

    python bench/optimizer_step.py [--flavor debugmodel] [--repeats 20]

Why it exists: ``optimizer.implementation = "auto"`` picks fused AdamW on CPU as well as CUDA;
this is the measurement behind that choice. The implementations alternate within one run
(fused, foreach, for-loop, fused, ...), each timed as the median of ``--repeats`` steps.
"""

import argparse
import statistics
import time

import torch

from common import REPO  # noqa: F401 -- puts the repo on sys.path
from torchtitan.components.optimizer import build_optimizer
from torchtitan.config.job_config import Optimizer as OptimizerConfig
from torchtitan.models.llama import Transformer, build_model_args

IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_args = build_model_args(args.flavor, vocab_size=args.vocab, max_seq_len=512)
    setups = {}
    for impl in IMPLEMENTATIONS:
        model = Transformer(model_args).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = build_optimizer(OptimizerConfig(implementation=impl), model.parameters(), device.type)
        opt.step()  # creates the state
        setups[impl] = (opt, [])
    for _ in range(args.repeats):
        for impl, (opt, times) in setups.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"\nAdamW step, {args.flavor} ({nparams / 1e6:.1f}M params, vocab {args.vocab}), {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    fused = statistics.median(setups["fused"][1])
    print(f"{'implementation':<16}{'ms/step':>9}{'vs fused':>10}")
    for impl, (_, times) in setups.items():
        ms = statistics.median(times)
        print(f"{impl:<16}{ms * 1e3:>9.1f}{ms / fused:>9.2f}x")


if __name__ == "__main__":
    main()
