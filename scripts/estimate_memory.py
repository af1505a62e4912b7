"""Per-device peak memory (params / grads / optimizer / activations / total) of a training config.

Estimate (one process, fake tensors, fake process group of NGPU x NNODES ranks, rank 0's view):
    python scripts/estimate_memory.py --ngpu 8 --nnodes 2 --config train_configs/llama3_8b.toml \
        [--json-out est.json] [--section.key value ...]
Measure a real run for comparison (under torchrun; 2 train steps, rank 0's peak tensor bytes):
    torchrun --standalone --nproc_per_node 2 scripts/estimate_memory.py --measure \
        --config train_configs/debug_model.toml [--compare-to est.json] [--json-out measured.json]
Every other argument is a config override, as for train.py. See torchtitan/tools/memory_estimation.py.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.config.manager import ConfigManager  # noqa: E402
from torchtitan.tools import memory_estimation as me  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ngpu", type=int, default=int(os.environ.get("NGPU", 8)), help="devices per node")
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("NNODES", 1)), help="nodes")
    p.add_argument("--json-out", default="", help="also write the result as JSON here")
    p.add_argument("--measure", action="store_true", help="measure a real run (launch with torchrun)")
    p.add_argument("--compare-to", default="", help="with --measure: an estimate JSON to compare with")
    return p.parse_known_args(argv)


def measure(cfg, args) -> None:
    result = me.measure_real_peak(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    print(f"measured peak tensor memory, rank 0: {result['rank0'] / me.GIB:.4f} GiB "
          f"(max over {result['world_size']} ranks {result['max_over_ranks'] / me.GIB:.4f} GiB; {result['how']})")
    if args.compare_to:
        est = me.load_estimate(args.compare_to)
        print(me.compare(est, result["rank0"]))
        result["estimate"] = est.to_dict()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


def main(argv: list[str]) -> None:
    args, rest = parse(argv)
    cfg = ConfigManager().parse_args(rest)
    if args.measure:
        measure(cfg, args)
    else:
        me.run_estimation(cfg, args.ngpu * args.nnodes, args.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
