"""Decode speed: tokens/s with and without the KV cache, one process and TP2.

    python bench/generate.py [--name llama3] [--flavor debugmodel] [--batch 1,4] [--prompt_len 32]
        [--new_tokens 128] [--repeats 3] [--checkpoint DIR] [--dtype float32]

Each case runs in a fresh process (TP2: ``torchrun --nproc_per_node 2``) that loads the model with
``load_for_inference`` (random weights of ``--flavor`` saved as a DCP export, or ``--checkpoint``),
warms up with one short generation, then times ``--repeats`` greedy generations of
``--new_tokens`` tokens per row from random prompts of ``--prompt_len`` tokens (no eos stop, so
every row decodes every token); the median decode tokens/s (all rows, prefill excluded) is printed.
OMP threads (unless set): all cores for one process, cores / 2 per rank for TP2, so both sides use
the same cores. On CPU the TP2 collectives are gloo host copies, one all-gather/reduce-scatter pair
per block and step: TP2 is there to check it works and what it costs, not to be fast.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO


def worker(a: argparse.Namespace) -> None:
    """One case (under torchrun for tp > 1): print a JSON line with the median decode tokens/s."""
    import torch

    from torchtitan.inference import GenerationStats, generate, load_for_inference
    from torchtitan.inference.loading import DTYPES

    im = load_for_inference(None, a.checkpoint, tp=a.tp, dtype=DTYPES[a.dtype] if a.dtype else None,
                            max_seq_len=a.prompt_len + a.new_tokens)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, im.args.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()
    generate(im, prompts, 8, use_cache=a.cache, eos_id=-1)  # warm-up: allocator, kernels, first collectives
    runs = []
    for _ in range(a.repeats):
        stats = GenerationStats()
        generate(im, prompts, a.new_tokens, use_cache=a.cache, eos_id=-1, stats=stats)
        runs.append(stats)
    if im.rank == 0:
        tps = statistics.median(s.decode_tokens_per_second for s in runs)
        prefill = statistics.median(s.prefill_seconds for s in runs)
        print("RESULT " + json.dumps({"decode_tps": tps, "prefill_s": prefill, "device": im.device.type,
                                      "dtype": str(next(im.model.parameters()).dtype)}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def random_export(name: str, flavor: str, folder: Path) -> Path:
    """Random weights of the flavor (vocab 4096) as a DCP export with model_args.json."""
    import torch

    from torchtitan.components.weight_conversion import save_dcp
    from torchtitan.models.registry import get_spec

    spec = get_spec(name)
    args = spec.build_args(flavor, vocab_size=4096, max_seq_len=8192)
    torch.manual_seed(0)
    save_dcp(spec.model_cls(args).state_dict(), args, folder)
    return folder


def run_case(checkpoint: Path, a: argparse.Namespace, tp: int, cache: bool, batch: int) -> dict:
    launcher = [sys.executable] if tp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp)]
    cmd = [*launcher, __file__, "--worker", "--checkpoint", str(checkpoint), "--tp", str(tp),
           "--batch", str(batch), "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens),
           "--repeats", str(a.repeats), *(["--cache"] if cache else []), *(["--dtype", a.dtype] if a.dtype else [])]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="llama3")
    p.add_argument("--flavor", default="debugmodel")
    p.add_argument("--checkpoint", default="", help="bench this checkpoint instead of random weights")
    p.add_argument("--batch", default="1,4", help="batch sizes, comma-separated (worker: one)")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: bfloat16 on CUDA, else float32)")
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.batch = int(a.batch)
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(a.checkpoint) if a.checkpoint else random_export(a.name, a.flavor, Path(tmp) / "export")
        print(f"{a.checkpoint or a.name + ' ' + a.flavor}: prompt {a.prompt_len} tokens, {a.new_tokens} new "
              f"tokens per row, greedy, median of {a.repeats}")
        print(f"{'case':<30}{'batch':>6}{'decode tok/s':>14}{'prefill s':>11}")
        for batch in (int(b) for b in a.batch.split(",")):
            results = {}
            for tp in (1, 2):
                for cache in (True, False):
                    r = run_case(checkpoint, a, tp, cache, batch)
                    name = f"{'KV cache' if cache else 'no cache'}, {'1 process' if tp == 1 else 'TP2'}"
                    results[name] = r
                    if "error" in r:
                        print(f"{name:<30}{batch:>6}  failed: {r['error']}")
                    else:
                        print(f"{name:<30}{batch:>6}{r['decode_tps']:>14,.1f}{r['prefill_s']:>11.4f}")
            for tp in ("1 process", "TP2"):
                on, off = results[f"KV cache, {tp}"], results[f"no cache, {tp}"]
                if "error" not in on and "error" not in off:
                    print(f"  KV cache speed-up, {tp}, batch {batch}: {on['decode_tps'] / off['decode_tps']:.2f}x")


if __name__ == "__main__":
    main()
