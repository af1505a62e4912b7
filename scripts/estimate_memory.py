"""Per-device peak memory (params / grads / optimizer / activations / total) of a training config.

Estimate (one process, fake tensors, fake process group of NGPU x NNODES ranks, rank 0's view):
    python scripts/estimate_memory.py --ngpu 8 --nnodes 2 --config train_configs/llama3_8b.toml \
        [--json-out est.json] [--section.key value ...]
Measure a real run for comparison (under torchrun; 2 train steps, rank 0's peak tensor bytes):
    torchrun --standalone --nproc_per_node 2 scripts/estimate_memory.py --measure \
        --config train_configs/debug_model.toml [--compare-to est.json] [--json-out measured.json]
Every other argument is a config override, as for train.py (without --config, train_configs/debug_model.toml
as train.py). See torchtitan/tools/memory_estimation.py.
No tokenizer file is needed (only its size matters; a note says where the size came from), and a
compiled config is estimated eager (a note says so). A bad input (flavor, config value, path, --ngpu)
ends with one ``error: ...`` line and exit code 1.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.config.manager import ConfigManager  # noqa: E402
from torchtitan.tools import memory_estimation as me  # noqa: E402
from torchtitan.tools.cli import main_with_user_errors  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "debug_model.toml"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Read as text and checked in count(): a bad value is one error: line, not argparse's usage + exit 2.
    p.add_argument("--ngpu", default=os.environ.get("NGPU", "8"), help="devices per node (default: $NGPU or 8)")
    p.add_argument("--nnodes", default=os.environ.get("NNODES", "1"), help="nodes (default: $NNODES or 1)")
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


def count(name: str, value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"--{name} (or ${name.upper()}) must be a whole number >= 1, got {value!r}")
    return int(value)


def run(argv: list[str]) -> None:
    args, rest = parse(argv)
    world_size = count("ngpu", args.ngpu) * count("nnodes", args.nnodes)
    cfg = ConfigManager(default_config_file=DEFAULT_CONFIG).parse_args(rest)  # train.py's default run
    if args.measure:
        measure(cfg, args)
    else:
        me.run_estimation(cfg, world_size, args.json_out)


def main(argv: list[str]) -> None:
    main_with_user_errors(run, argv)  # a user error: one error: line, exit code 1


if __name__ == "__main__":
    main(sys.argv[1:])
