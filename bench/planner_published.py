"""The planner against published Llama-3-class runs on H100: its estimate of each published layout,
and its own top recommendation for the same GPUs, global batch and features, side by side.

    python bench/planner_published.py [--markdown]

Published numbers (tokens/s per GPU, seq_len 8192) and where they come from:
- torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Dec 2024; 96 GB HBM2e H100s at 500 W),
- "The Llama 3 Herd of Models" (arXiv 2407.21783) Table 4 (BF16 MFU 43% = 430 TFLOPs/GPU; tok/s derived
  as 430e12 / (6 x 405e9 + attention) per token),
- NVIDIA DGX Cloud Benchmarking v25.04 (github.com/NVIDIA/dgxc-benchmarking, llama3.1/README.md; NeMo
  25.02, Megatron-Core + Transformer Engine, BF16).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.planner import hardware, search  # noqa: E402
from torchtitan.planner.layout import Layout, ModelShape  # noqa: E402
from torchtitan.planner.memory import GIB  # noqa: E402

SEQ = 8192


@dataclass
class Published:
    source: str
    flavor: str
    gpus: int
    layout: Layout
    tokens_per_s: float
    memory_gib: float = 0.0  # peak per GPU where reported
    allow_cp: bool = False


def _tt(**kw) -> Layout:
    return Layout(compile=True, **kw)


PUBLISHED = [
    Published("torchtitan T1 (bf16)", "8B", 8, _tt(dp_shard=8, local_bs=2, accum=1, ac="selective"), 6667, 77.0),
    Published("torchtitan T1 (float8)", "8B", 8, _tt(dp_shard=8, local_bs=2, accum=1, ac="selective", float8=True),
              8532, 76.8),
    Published("torchtitan T3 (bf16)", "8B", 128, _tt(dp_shard=128, local_bs=2, accum=1, ac="selective"), 6514, 62.0),
    Published("torchtitan T4 (float8)", "70B", 256, _tt(dp_shard=32, tp=8, local_bs=16, accum=1, ac="full",
                                                       float8=True), 829, 71.9),
    Published("torchtitan T5 1F1B (float8)", "405B", 512,
              _tt(dp_shard=8, tp=8, pp=8, local_bs=32, accum=1, ac="full", float8=True, pp_microbatches=8), 100, 82.5),
    Published("torchtitan T5 interleaved (float8)", "405B", 512,
              _tt(dp_shard=8, tp=8, pp=8, local_bs=32, accum=1, ac="full", float8=True,
                  pp_schedule="Interleaved1F1B", pp_microbatches=16), 128, 72.7),
    Published("Llama 3 paper, Table 4 (bf16)", "405B", 8192,
              Layout(dp_shard=64, tp=8, pp=16, local_bs=32, accum=1, pp_schedule="Interleaved1F1B",
                     pp_microbatches=32, reshard_after_forward="never", compile=False), 172),
    Published("DGXC NeMo (bf16)", "8B", 8, Layout(dp_shard=4, cp=2, local_bs=1, accum=32), 10682, allow_cp=True),
    Published("DGXC NeMo (bf16)", "70B", 64, Layout(dp_shard=2, tp=4, pp=4, cp=2, local_bs=64, accum=1,
                                                    pp_schedule="Interleaved1F1B", pp_microbatches=64), 1118,
              allow_cp=True),
    Published("DGXC NeMo (bf16)", "405B", 512, Layout(dp_shard=4, tp=8, pp=8, cp=2, local_bs=64, accum=1,
                                                      pp_schedule="Interleaved1F1B", pp_microbatches=64), 207,
              allow_cp=True),
]


def rows():
    hw = hardware.GPUS["h100"]
    shapes: dict[str, ModelShape] = {}
    for p in PUBLISHED:
        shape = shapes.setdefault(p.flavor, ModelShape.from_flavor("llama3", p.flavor, SEQ))
        req = search.PlanRequest(shape, p.gpus, 8, hw, SEQ, p.layout.global_batch, allow_cp=p.allow_cp,
                                 allow_float8=p.layout.float8, compile=p.layout.compile, max_local_batch=64)
        theirs = search.evaluate(req, p.layout)
        best = search.plan(req)[0]
        yield p, theirs, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    head = ["run", "model", "GPUs", "published layout", "published tok/s", "planner: same layout",
            "ratio", "mem GiB (pub.)", "planner's pick", "its tok/s", "its GiB"]
    print("| " + " | ".join(head) + " |" if args.markdown else "\t".join(head))
    if args.markdown:
        print("|" + "---|" * len(head))
    for p, theirs, best in rows():
        mem = f"{theirs.memory.total / GIB:.1f}" + (f" ({p.memory_gib:.1f})" if p.memory_gib else "")
        fields = [p.source, p.flavor, str(p.gpus), f"{p.layout.describe()} {p.layout.local_bs}x{p.layout.accum}",
                  f"{p.tokens_per_s:,.0f}", f"{theirs.tokens_per_s:,.0f}", f"{theirs.tokens_per_s / p.tokens_per_s:.2f}",
                  mem + ("" if theirs.fits else " no fit"),
                  f"{best.layout.describe()} {best.layout.local_bs}x{best.layout.accum}",
                  f"{best.tokens_per_s:,.0f}", f"{best.memory.total / GIB:.1f}"]
        print("| " + " | ".join(fields) + " |" if args.markdown else "\t".join(fields))


if __name__ == "__main__":
    main()
