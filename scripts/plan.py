"""Which layout to run a model on N GPUs: memory and step time of every layout, ranked, before queueing.

    python scripts/plan.py --config train_configs/llama3_8b.toml --gpus 8 --gpu h100 --seq_len 8192 --global_batch_tokens 1M
    python scripts/plan.py --config train_configs/llama3_70b.toml --gpus 256 --write_config 70b_256.toml
    python scripts/plan.py --model.name qwen3 --model.flavor 30B-A3B --gpus 64 --gpu h200 --global_batch 512
    python scripts/plan.py --calibrate --nproc 4 --hardware_out cpu4.json      # measure this machine
    python scripts/plan.py --hardware cpu4.json --gpus 4 --gpus_per_node 4 --config train_configs/debug_model.toml

The model comes from ``--model.*`` keys or a config file (``--config``; any ``--section.key`` override
applies); its vocabulary is the one the run trains with: ``model.vocab_size``, else the tokenizer's
(the embedded one's size without building it), else the flavor's (the plan says which). The global
batch is ``--global_batch`` sequences or ``--global_batch_tokens`` (K/M suffixes), else the config's.
Every layout keeps that global batch (local batch x accumulation x dp). The GPU is a row of
torchtitan/planner/hardware.py (``--gpu``), a JSON file (``--hardware``: a calibration or a custom
part), with fields overridable (``--memory_gib``, ``--peak_tflops``, ``--intra_gbps``, ``--inter_gbps``).
``--write_config out.toml`` writes the first layout as a config the trainer runs as it is.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan.config.manager import ConfigManager, config_to_toml  # noqa: E402
from torchtitan.planner import hardware, search  # noqa: E402
from torchtitan.planner.memory import GIB  # noqa: E402
from torchtitan.planner.vocab import run_vocab  # noqa: E402
from torchtitan.tools.cli import main_with_user_errors  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="devices in the job")
    p.add_argument("--gpus_per_node", type=int, default=8, help="devices per node (TP stays inside one)")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(hardware.GPUS)}")
    p.add_argument("--hardware", default="", help="JSON hardware file (a --calibrate result or a custom GPU)")
    for name in ("memory_gib", "peak_tflops", "intra_gbps", "inter_gbps"):
        p.add_argument(f"--{name}", type=float, default=0.0, help=f"override the GPU's {name}")
    p.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (0 = the config's)")
    p.add_argument("--global_batch", type=int, default=0, help="sequences per optimizer step")
    p.add_argument("--global_batch_tokens", default="", help="tokens per optimizer step, e.g. 1M, 4M, 512K")
    p.add_argument("--ac", default="none,selective,full", help="activation checkpointing modes allowed")
    p.add_argument("--pp_schedules", default="1F1B,Interleaved1F1B", help="pipeline schedules allowed ('' = no PP)")
    p.add_argument("--max_pp", type=int, default=0, help="largest pipeline degree (0 = any)")
    p.add_argument("--cp", action="store_true", help="allow context parallelism")
    p.add_argument("--no_ep", action="store_true", help="MoE: keep experts unsplit (ep = 1)")
    p.add_argument("--float8", action="store_true", help="allow float8 linears (GPUs that have them)")
    p.add_argument("--no_compile", action="store_true", help="plan eager runs (compile off)")
    p.add_argument("--margin", type=float, default=0.1, help="fraction of device memory kept free")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--write_config", default="", help="write the best layout as a trainer TOML here")
    p.add_argument("--json", default="", help="also write the ranked layouts as JSON here")
    p.add_argument("--calibrate", action="store_true", help="measure this machine (matmuls, gloo) and stop")
    p.add_argument("--nproc", type=int, default=4, help="--calibrate: processes measured at once")
    p.add_argument("--hardware_out", default="", help="--calibrate: write the result here")
    return p.parse_known_args(argv)


def parse_tokens(text: str) -> int:
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"--global_batch_tokens {text!r}: use a number with an optional K/M/G suffix, e.g. 1M")
    if value <= 0:
        raise ValueError(f"--global_batch_tokens {text!r} must be positive")
    return int(value)


def build_request(args, cfg) -> search.PlanRequest:
    seq = args.seq_len or cfg.training.seq_len
    cfg.training.seq_len = seq
    if args.global_batch and args.global_batch_tokens:
        raise ValueError("give --global_batch (sequences) or --global_batch_tokens, not both")
    batch = args.global_batch or cfg.training.global_batch_size
    if args.global_batch_tokens:
        tokens = parse_tokens(args.global_batch_tokens)
        batch = max(1, round(tokens / seq))
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ValueError("--gpus and --gpus_per_node must be >= 1")
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        raise ValueError(f"--gpus {args.gpus} is not a whole number of nodes of --gpus_per_node {args.gpus_per_node}")
    ac = tuple(a for a in args.ac.split(",") if a)
    bad = [a for a in ac if a not in ("none", "selective", "full")]
    if bad or not ac:
        raise ValueError(f"--ac {args.ac!r}: use a comma list of none, selective, full")
    hw = hardware.hardware_for(args.gpu, args.hardware, memory_gib=args.memory_gib, peak_tflops=args.peak_tflops,
                               intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps)
    schedules = tuple(s for s in args.pp_schedules.split(",") if s)
    for s in schedules:
        search.Layout(pp=2, pp_schedule=s).schedule()  # an unknown schedule fails here, in one line
    vocab, vocab_note = run_vocab(cfg)
    return search.PlanRequest(
        shape=search.shape_of_config(cfg, vocab), vocab_note=vocab_note, gpus=args.gpus, gpus_per_node=min(args.gpus_per_node, args.gpus), hw=hw,
        seq_len=seq, global_batch=batch, ac_modes=ac, pp_schedules=schedules, max_pp=args.max_pp,
        allow_cp=args.cp, allow_ep=not args.no_ep, allow_float8=args.float8, compile=not args.no_compile,
        margin=args.margin,
    )


def report(req: search.PlanRequest, cands: list[search.Candidate], top: int) -> str:
    s = req.shape
    lines = [
        f"{s.family} {s.flavor}: {s.params / 1e9:.2f}B parameters ({s.active_params / 1e9:.2f}B active), vocab "
        f"{s.vocab}; {req.gpus} x {req.hw.name} ({req.hw.memory_gib:.0f} GiB, {req.hw.describe_peak()}), "
        f"{req.gpus_per_node} per node; seq_len {req.seq_len}, global batch {req.global_batch} sequences "
        f"({req.global_batch * req.seq_len / 1e6:.2f}M tokens)",
        *([req.vocab_note] if req.vocab_note else []),
        f"memory per GPU at the peak (the pipeline rank that needs the most); fits = at most "
        f"{req.budget / GIB:.1f} GiB ({1 - req.margin:.0%}); step seconds = compute + bubble + exposed comm",
    ]
    fitting = [c for c in cands if c.fits]
    lines.append(search.format_table(cands, top, req))
    if len(fitting) >= 2:
        lines.append(search.explain(fitting[0], fitting[1], req.gpus_per_node))
    elif not fitting:
        lines.append(f"no layout fits in {req.budget / GIB:.1f} GiB: the smallest needs "
                     f"{cands[0].memory.total / GIB:.1f} GiB ({cands[0].layout.describe()}); use more GPUs, "
                     "allow --ac full, --cp, or a shorter --seq_len")
    lines.append(f"{len(fitting)} of {len(cands)} layouts fit")
    return "\n".join(lines)


def write_config(path: str, cfg, best: search.Candidate, req: search.PlanRequest) -> None:
    out = search.apply_overrides(cfg, search.to_config_overrides(best, req))
    header = (f"# Written by scripts/plan.py for {req.gpus} x {req.hw.name}: {best.layout.describe()}\n"
              f"# predicted {best.memory.total / GIB:.1f} GiB per GPU, {best.time.total:.3f} s per step, "
              f"{best.tokens_per_s:,.0f} tokens/s per GPU{'' if best.mfu is None else f', MFU {best.mfu:.1%}'}\n"
              f"#   NGPU={req.gpus_per_node} CONFIG_FILE={path} ./run_train.sh\n")
    Path(path).write_text(header + config_to_toml(out), encoding="utf-8")


def run(argv: list[str]) -> None:
    args, rest = parse(argv)
    if args.calibrate:
        from torchtitan.planner.calibrate import calibrate, save_calibration

        hw = calibrate(args.nproc)
        print(hw.to_json())
        if args.hardware_out:
            save_calibration(hw, args.hardware_out)
            print(f"wrote {args.hardware_out}: plan with --hardware {args.hardware_out}")
        return
    cfg = ConfigManager().parse_args(rest)
    req = build_request(args, cfg)
    cands = search.plan(req)
    if not cands:
        raise ValueError(f"no layout of {req.gpus} GPUs divides global batch {req.global_batch}: use a multiple of "
                         "the data-parallel degree (e.g. a power of two)")
    print(report(req, cands, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps([{
            "layout": c.layout.describe(), "local_bs": c.layout.local_bs, "accum": c.layout.accum,
            "fits": c.fits, "memory_gib": c.memory.total / GIB, "step_s": c.time.total,
            "tokens_per_s_per_gpu": c.tokens_per_s, "mfu": c.mfu,
            "time": vars(c.time), "memory": vars(c.memory),
        } for c in cands[: max(args.top, 50)]], indent=1))
    if args.write_config:
        fitting = [c for c in cands if c.fits]
        if not fitting:
            raise ValueError(f"--write_config {args.write_config}: no layout fits, nothing written")
        write_config(args.write_config, cfg, fitting[0], req)
        print(f"wrote {args.write_config}: {fitting[0].layout.describe()}")


if __name__ == "__main__":
    main_with_user_errors(run, sys.argv[1:])
