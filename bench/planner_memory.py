"""Planner memory vs the fake-tensor estimator vs measured CPU runs, for layouts with FSDP, TP, PP, CP, AC.

For each layout of the debug model (fp32 on CPU, gloo): the per-rank peak the planner predicts
(torchtitan/planner/memory.py, the rank that needs the most), the fake-tensor estimator's
(scripts/estimate_memory.py: FSDPMemTracker for FSDP, the planner's accounting otherwise), and the
measured peak of 2 real train steps (torch.profiler allocation events; the max over ranks).

    OMP_NUM_THREADS=1 python bench/planner_memory.py [--layouts fsdp4,tp2_fsdp2,...] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torchtitan.parallelisms.utils import free_port  # noqa: E402

SCRIPT = str(REPO / "scripts" / "estimate_memory.py")
GIB = 1024**3

# name -> (processes, overrides). Debug model (dim 256, 6 layers), seq 256, 8 sequences per step.
LAYOUTS = {
    "fsdp4": (4, []),
    "fsdp2_ac_full": (2, ["--activation_checkpoint.mode", "full"]),
    "tp2": (2, ["--parallelism.tp", "2"]),
    "tp2_fsdp2": (4, ["--parallelism.tp", "2"]),
    "pp2_1f1b": (2, ["--parallelism.pp", "2", "--parallelism.pp_microbatches", "4"]),
    "pp2_fsdp2": (4, ["--parallelism.pp", "2", "--parallelism.pp_microbatches", "2"]),
    "cp2": (2, ["--parallelism.cp", "2"]),
    "ddp2_accum": (2, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1",
                       "--training.local_batch_size", "2"]),
}


def base_args(dump: str, cache: str = "") -> list[str]:
    args = ["--config", str(REPO / "train_configs" / "debug_model.toml"), "--job.dump_folder", dump,
            "--training.seq_len", "256", "--training.global_batch_size", "8",
            "--comm.init_timeout_seconds", "300", "--comm.train_timeout_seconds", "300"]
    return args + (["--tokenizer.cache_dir", cache] if cache else [])


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def planner_peak(nproc: int, args: list[str]) -> dict:
    """The planner's prediction for the config the arguments describe (in this process)."""
    from torchtitan.components.model_builder import build_model_args
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.config.manager import ConfigManager
    from torchtitan.models.registry import get_spec
    from torchtitan.parallelisms.parallel_dims import ParallelDims
    from torchtitan.planner.memory import memory_for_job
    from torchtitan.trainer import batch_split

    cfg = ConfigManager().parse_args(args)
    p = cfg.parallelism
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, nproc, ep=p.ep)
    local_bs, _ = batch_split(cfg.training.global_batch_size, cfg.training.local_batch_size, dims.dp)
    vocab = build_tokenizer(cfg.tokenizer.path, cfg.tokenizer.cache_dir).n_words
    model_args = build_model_args(cfg, get_spec(cfg.model.name), vocab)
    est = memory_for_job(cfg, dims, model_args, local_bs, "cpu")
    return {"total": est.total, "summary": est.summary()}


def estimator_peak(nproc: int, args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, SCRIPT, "--ngpu", str(nproc), "--json-out", str(out), *args],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"estimator failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def measured_peak(nproc: int, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend",
           "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", SCRIPT, "--measure", "--json-out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"measured run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def compare(name: str, cache: str = "", estimator: bool = True) -> dict:
    nproc, extra = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        args = base_args(tmp, cache) + extra
        row = {"layout": name, "nproc": nproc, "planner": planner_peak(nproc, args)["total"]}
        if estimator:
            row["estimator"] = estimator_peak(nproc, args, Path(tmp) / "est.json")["total"]
        row["measured"] = measured_peak(nproc, args, Path(tmp) / "measured.json")["max_over_ranks"]
    row["planner_vs_measured"] = row["planner"] / row["measured"] - 1
    if estimator:
        row["planner_vs_estimator"] = row["planner"] / row["estimator"] - 1
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = []
    print(f"{'layout':<16}{'ranks':>6}{'planner GiB':>13}{'estimator':>11}{'measured':>10}{'vs meas.':>10}"
          f"{'vs est.':>9}")
    for name in args.layouts.split(","):
        r = compare(name)
        rows.append(r)
        print(f"{name:<16}{r['nproc']:>6}{r['planner'] / GIB:>13.4f}{r['estimator'] / GIB:>11.4f}"
              f"{r['measured'] / GIB:>10.4f}{r['planner_vs_measured']:>+10.1%}{r['planner_vs_estimator']:>+9.1%}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
