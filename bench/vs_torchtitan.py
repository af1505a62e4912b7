"""Tokens/s of our trainer vs the public torchtitan package on the same debug model, measured in one run.

    python bench/vs_torchtitan.py --device cpu [--repeats 3] [--steps 8] [--ac selective] [--compile]
    python bench/vs_torchtitan.py --device cuda --torchtitan-version 0.2.2 --wheels ./wheels   # offline GPU box

Identical on both sides: Llama 3, dim 256, 6 layers, 16 heads, 16 kv heads (MHA), FFN hidden 768, vocab
2048 (6,163,712 params, checked from each side's log), seq_len 512, global batch 8 on 1 process, AdamW
(lr 8e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1; fused, both defaults), grad clipping at
1.0, 2 warmup steps then linear decay; fp32 on CPU, bf16 mixed precision (fp32 weights) on CUDA; causal
F.scaled_dot_product_attention (torchtitan limits it to cuDNN > flash > math; on CPU both use the CPU
flash kernel); no activation checkpointing and no compile unless --ac selective (ours: per-op "op";
torchtitan: its per-op SAC, which also recomputes every second matmul) / --compile (each block and the
loss, inductor). Both read the same local jsonl (the Python stdlib sources) and tokenize it online with
the same BPE merges (1792 + 256 special tokens): ours from a tiktoken file, torchtitan from an HF
tokenizer.json. Nothing is downloaded at run time except the pip install of torchtitan. Left as each
framework does it: torchtitan 0.3.x wraps the model in FSDP even on one device (its mixed-precision
path; 0.2.x uses autocast, as ours does), computes the loss in chunks and rotates by per-document
positions.

Runs alternate (ours, torchtitan, ours, ...), each a fresh process of --steps steps logging every
steps//2; tok/s is each side's own last log window (tokens / wall time since the previous log, data
loading included, per device), so the first half (warm-up, compilation) is discarded. OMP_NUM_THREADS
is the same for both (default: os.cpu_count()). s/run in the table is one run's wall time, start-up
included. Every run's log goes to <cache>/logs/<time>/.

torchtitan lives in <cache>/venv-torchtitan-<version>, <cache> = $TORCHTITAN_CACHE/bench or
~/.cache/torchtitan/bench. It sees the packages of the python running this script (a .pth file lists
that python's site-packages folders, so a virtual environment's torch is reused as well as a system
install's; --system-site-packages would reach only the base interpreter's, missing the venv's torch);
pip runs with a constraint pinning torch to the installed version, so it can never replace it. This file is also its
launcher (--child, run by the venv's python with -P, so our package is never on its path). It
configures torchtitan through its own config: 0.3.x with a config-registry function built from its
llama3_debugmodel(), 0.2.x with command-line overrides. 0.3.x offers only flex/varlen attention for
language models through attn_backend, and flex has no backward on CPU (torch 2.13), so each layer's
inner_attention is set to torchtitan's own ScaledDotProductAttention config (torchtitan then builds no
document masks and uses is_causal, as ours). Its CUDA graphs (0.3.x, on by default on CUDA) are
disabled: ours has none. Run-time patches, each applied only where needed and printed one per line;
torchtitan's installed files are never edited:
  1. torch without triton (CPU builds): a stub for the torchtitan module that imports triton at import
     time but only holds MoE / expert-parallel kernels (0.3.x: distributed.minimal_async_ep.kernels,
     0.2.x: models.moe.kernels); calling the stub raises.
  2. --device cpu: torchtitan.tools.utils picks "cuda" when no accelerator is present; right after it
     is imported (before other modules copy it) its device_type becomes "cpu" and device_module a
     stand-in that forwards to torch.cpu and adds the memory API its metrics call
     (get_device_name, get_device_properties, memory_stats = peak RSS, no-op resets).
  3. torch without torch.distributed.set_timeout (<= 2.13), which 0.3.x calls after the first step:
     alias it to torch.distributed.distributed_c10d._set_pg_timeout (same signature and effect).
The launcher also sets LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun would.
"""

import argparse
import json
import os
import re
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # the system torch here; in the child, the same torch seen through the venv

REPO = Path(__file__).resolve().parents[1]
D, LAYERS, FFN, VOCAB = 256, 6, 768, 2048  # 16 heads and 16 kv heads: MHA, so attention is 4 D x D
EXPECTED_PARAMS = 2 * VOCAB * D + LAYERS * (4 * D * D + 3 * D * FFN + 2 * D) + D  # untied embedding/output
N_RANKS = 1792  # + 256 special tokens = 2048 = the model's vocab on both sides
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cache_root() -> Path:
    base = os.environ.get("TORCHTITAN_CACHE") or os.path.expanduser("~/.cache/torchtitan")
    return Path(base) / "bench"


def prepare_assets(root: Path) -> dict:
    """The stdlib corpus as jsonl and one BPE in two formats (built once, cached)."""
    out = root / f"assets-py{sys.version_info.major}.{sys.version_info.minor}-{N_RANKS}"
    paths = dict(data_dir=str(out / "data"), data_file=str(out / "data" / "stdlib.jsonl"),
                 hf_tokenizer=str(out / "hf_tokenizer"), tiktoken=str(out / "ours.tiktoken"))
    if (out / "done").exists():
        return paths
    sys.path.insert(0, str(REPO))
    from torchtitan.components.tokenizer_training import hf_bpe_to_ranks, train_hf_bpe, write_tiktoken_file
    from torchtitan.datasets.stdlib_corpus import read_document, stdlib_files

    print(f"building the benchmark corpus and tokenizer in {out} (once, ~20 s)", flush=True)
    files = stdlib_files("train")
    tok = train_hf_bpe(files, N_RANKS)
    write_tiktoken_file(hf_bpe_to_ranks(tok), paths["tiktoken"])
    # Same 256 special tokens as ours (Llama 3 names), so both vocabularies are 2048 tokens.
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"]
                           + [f"<|reserved_special_token_{i}|>" for i in range(254)])
    Path(paths["hf_tokenizer"]).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(paths["hf_tokenizer"], "tokenizer.json")))
    Path(paths["hf_tokenizer"], "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    Path(paths["data_dir"]).mkdir(parents=True, exist_ok=True)
    with open(paths["data_file"], "w") as f:
        for path in files:
            f.write(json.dumps({"text": read_document(path)}) + "\n")
    (out / "done").touch()
    return paths


def parent_site_dirs() -> list[str]:
    """The site-packages folders of this python (a venv's own, and the system's when it includes them)."""
    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def make_child_venv(venv: Path) -> None:
    """A venv whose python also imports what this python imports (torch above all), through a .pth
    file: its own site-packages come first, so the torchtitan installed there wins."""
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)])
    if r.returncode:
        sys.exit(f"error: could not create the venv {venv} (is the python venv module installed? "
                 "e.g. apt-get install python3-venv); or set TORCHTITAN_CACHE to a writable folder")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True)
    (Path(probe.stdout.strip()) / "vs_torchtitan_parent.pth").write_text("\n".join(parent_site_dirs()) + "\n")


def ensure_venv(root: Path, version: str, wheels: str | None) -> Path:
    """venv-torchtitan-<version> seeing this python's packages, torchtitan installed, torch untouched."""
    venv = root / f"venv-torchtitan-{version}"
    python = venv / "bin" / "python"
    marker = venv / ".vs_torchtitan_ok"
    stamp = json.dumps({"torch": torch.__version__, "parent": parent_site_dirs()})  # rebuilt for another parent
    if marker.exists() and marker.read_text() == stamp:
        return python
    if venv.exists():
        shutil.rmtree(venv)
    make_child_venv(venv)
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")  # pip must reuse, never replace, torch
    cmd = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), f"torchtitan=={version}"]
    if wheels:
        cmd[5:5] = ["--no-index", "--find-links", str(Path(wheels).resolve())]
    print(f"installing torchtitan {version} into {venv} ...", flush=True)
    if subprocess.run(cmd).returncode:
        sys.exit(f"error: `{' '.join(cmd)}` failed. Without network, download the wheels elsewhere "
                 f"(pip download torchtitan=={version} -d wheels, then drop the torch wheels) and pass "
                 f"--wheels wheels; if pip says it needs another torch, this torchtitan needs a newer "
                 f"torch than {torch.__version__}: try an older --torchtitan-version.")
    probe = subprocess.run([str(python), "-P", "-c", "import torch; print(torch.__version__, torch.__file__)"],
                           capture_output=True, text=True, cwd=root)
    if probe.stdout.split()[:1] != [torch.__version__] or "venv-torchtitan" in probe.stdout:
        sys.exit(f"error: the venv's torch is not the system torch {torch.__version__}: {probe.stdout}"
                 f"{probe.stderr[-500:]} -- delete {venv} and rerun")
    marker.write_text(stamp)
    return python


def run_ours(args, assets: dict, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="vs_tt_ours_") as dump:
        cmd = [sys.executable, str(REPO / "train.py"), 
               "--job.config_file", str(REPO / "train_configs/debug_model.toml"),
               "--job.dump_folder", dump, "--model.flavor", "debugmodel", "--model.n_kv_heads", "16",
               "--tokenizer.path", assets["tiktoken"], "--data.datasets", assets["data_file"],
               "--data.shuffle_windows", "0", "--training.seq_len", "512", "--training.global_batch_size", "8",
               "--training.steps", str(args.steps), "--metrics.log_freq", str(args.log_freq),
               "--training.max_norm", "1.0", "--training.mixed_precision_param", args.param_dtype,
               "--optimizer.lr", "8e-4", "--optimizer.weight_decay", "0.1", "--optimizer.beta1", "0.9",
               "--optimizer.beta2", "0.95", "--optimizer.eps", "1e-8", "--optimizer.implementation", args.optim_impl,
               "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_type", "linear",
               "--lr_scheduler.min_lr_ratio", "0", "--activation_checkpoint.mode", args.ac,
               *(["--activation_checkpoint.selective_ac_option", "op"] if args.ac == "selective" else []),
               *(["--compile.enable"] if args.compile else ["--compile.no_enable"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        log = proc.stdout + proc.stderr
        if proc.returncode:
            sys.exit(f"error: our train.py failed (rc {proc.returncode}):\n{log[-3000:]}")
        last = json.loads(Path(dump, "metrics.jsonl").read_text().splitlines()[-1])
    params = re.search(r"model llama3 \S+: ([\d,]+) params", log)
    return dict(tps=last["tps"], params=int(params.group(1).replace(",", "")) if params else None,
                step=last["step"], log=log)


def ours_free_port() -> int:
    # Imported here, not at the top: this file is also the child that runs inside torchtitan's
    # venv, where our package must never shadow theirs (both are named torchtitan).
    sys.path.insert(0, str(REPO))
    from torchtitan.parallelisms.utils import free_port

    return free_port()


def run_theirs(args, python: Path, assets: dict, env: dict, run_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="vs_tt_theirs_") as dump:
        spec = dict(device=args.device, steps=args.steps, log_freq=args.log_freq, ac=args.ac, compile=args.compile,
                    param_dtype=args.param_dtype, optim_impl=args.optim_impl, tokenizer=assets["hf_tokenizer"],
                    data=assets["data_dir"], dump=dump)
        env = dict(env, VS_TT_SPEC=json.dumps(spec), LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ours_free_port()), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(run_dir / "hf_datasets_cache"),
                   WANDB_MODE="disabled")
        proc = subprocess.run([str(python), "-P", str(Path(__file__).resolve()), "--child"],
                              capture_output=True, text=True, env=env, cwd=run_dir)
    log = ANSI.sub("", proc.stdout + proc.stderr)
    steps = re.findall(r"step:\s*(\d+)\s.*?tps: ([\d,]+)", log)
    if proc.returncode or not steps:
        sys.exit(f"error: torchtitan failed (rc {proc.returncode}); its log ends:\n{log[-4000:]}")
    params = re.search(r"size: ([\d,]+) total parameters", log)
    return dict(tps=float(steps[-1][1].replace(",", "")), step=int(steps[-1][0]), log=log,
                params=int(params.group(1).replace(",", "")) if params else None,
                patches=re.findall(r"^vs_torchtitan patch: (.*)$", log, re.M),
                version=(re.findall(r"^vs_torchtitan child: (.*)$", log, re.M) or ["?"])[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--steps", type=int, default=8, help="steps per run; the last steps//2 are measured")
    p.add_argument("--ac", choices=["none", "selective"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--torchtitan-version", default="0.3.0")
    p.add_argument("--wheels", help="folder of wheels for an offline pip install (--no-index --find-links)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    p.add_argument("--peers", default="torchtitan", help="only 'torchtitan' is implemented")
    args = p.parse_args()
    if args.peers != "torchtitan":
        sys.exit("error: only --peers torchtitan is implemented; litgpt 0.5.13's pretrain always torch.compiles "
                 "the model and needs litdata pre-tokenized data, so it is not comparable as is")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    if args.steps < 4:
        sys.exit("error: --steps must be >= 4 (the first half is warm-up)")
    args.log_freq = args.steps // 2
    args.param_dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.optim_impl = "fused"  # both frameworks' default (torch has a fused AdamW for CPU and CUDA)
    t0 = time.time()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    assets = prepare_assets(root)
    python = ensure_venv(root, args.torchtitan_version, args.wheels)
    run_dir = root / "runs"  # the child's working directory, away from our package
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both sides pick CUDA when they see it
    logs = root / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    ours, theirs = [], []
    for i in range(args.repeats):
        for name, runs, run in (("ours", ours, lambda: run_ours(args, assets, env)),
                                ("torchtitan", theirs, lambda: run_theirs(args, python, assets, env, run_dir))):
            start = time.time()
            runs.append(run())
            runs[-1]["wall"] = time.time() - start  # start-up included
            (logs / f"{name}-{i + 1}.log").write_text(runs[-1]["log"])
            print(f"run {i + 1}/{args.repeats}  {name:<11} {runs[-1]['tps']:9,.0f} tok/s", flush=True)
    print(f"logs of every run: {logs}")
    t = theirs[-1]
    print(f"\ntorchtitan {t['version']}; patches applied to torchtitan at run time:")
    for patch in t["patches"] or ["(none)"]:
        print(f"  - {patch}")
    same = ours[-1]["params"] == t["params"] == EXPECTED_PARAMS
    print(f"parameters: ours {ours[-1]['params']}, torchtitan {t['params']}, expected {EXPECTED_PARAMS}: "
          + ("identical" if same else "MISMATCH -- the shapes differ, the comparison is not valid"))
    if any(r["step"] != args.steps for r in ours + theirs):
        print(f"WARNING: a run's last log is not at step {args.steps}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"\ndevice {device}  torch {torch.__version__}  OMP_NUM_THREADS {args.threads}  "
          f"dtype {'bf16 mixed' if args.device == 'cuda' else 'fp32'}  ac {args.ac}  compile {args.compile}  "
          f"steps {args.steps} (tok/s of steps {args.steps - args.log_freq + 1}-{args.steps})  "
          f"wall {time.time() - t0:.0f} s")
    # Both call F.scaled_dot_product_attention(is_causal=True); torchtitan restricts the backends.
    rows = [("ours", "this repo", "SDPA causal", ours),
            ("torchtitan", args.torchtitan_version, "SDPA causal cuDNN>flash>math", theirs)]
    print(f"{'framework':<12}{'version':<11}{'attention':<30}{'params':>11}  {'tok/s per run':<22}{'median':>8}"
          f"{'s/run':>7}")
    for name, ver, attn, runs in rows:
        per_run = ", ".join(f"{r['tps']:,.0f}" for r in runs)
        print(f"{name:<12}{ver:<11}{attn:<30}{runs[-1]['params'] or 0:>11,}  {per_run:<22}"
              f"{statistics.median(r['tps'] for r in runs):>8,.0f}{statistics.median(r['wall'] for r in runs):>7.0f}")
    ratio = statistics.median(r["tps"] for r in ours) / statistics.median(r["tps"] for r in theirs)
    print(f"ratio ours/torchtitan: {ratio:.2f}")


# ---- child: runs inside the torchtitan venv; imports only the stdlib, torch and that torchtitan ----

def _child_patches(spec: dict) -> list[str]:
    import importlib.util
    import types

    applied = []
    tt_dir = Path(importlib.util.find_spec("torchtitan").submodule_search_locations[0])
    if importlib.util.find_spec("triton") is None:
        for name in ("torchtitan.distributed.minimal_async_ep.kernels", "torchtitan.models.moe.kernels"):
            src = tt_dir.joinpath(*name.split(".")[1:]).with_suffix(".py")
            if src.exists() and re.search(r"^import triton", src.read_text(), re.M):
                stub = types.ModuleType(name)
                stub.__file__ = str(src)

                def kernel(attr, name=name):
                    if attr.startswith("__"):  # inspect/pickle probe dunders: stay a plain module
                        raise AttributeError(attr)

                    def missing(*args, **kwargs):
                        raise RuntimeError(f"{name}.{attr} needs triton (stubbed by bench/vs_torchtitan.py)")
                    return missing

                stub.__getattr__ = kernel
                sys.modules[name] = stub
                applied.append(f"stub {name} (imports triton at import time; MoE/EP kernels only, unused)")
    if spec["device"] == "cpu":
        # Fix the module as soon as it has run: other modules copy device_type when they import it.
        def fix(utils):
            utils.device_type, utils.device_module = "cpu", _CpuDeviceModule()

        sys.meta_path.insert(0, _AfterImport("torchtitan.tools.utils", fix))
        applied.append("torchtitan.tools.utils.device_type 'cuda' -> 'cpu', device_module -> torch.cpu "
                       "+ the memory API its metrics call (memory_stats = peak RSS)")
    calls_set_timeout = "torch.distributed.set_timeout(" in (tt_dir / "distributed" / "utils.py").read_text()
    if calls_set_timeout and not hasattr(torch.distributed, "set_timeout"):
        torch.distributed.set_timeout = torch.distributed.distributed_c10d._set_pg_timeout
        applied.append(f"torch.distributed.set_timeout (missing in torch {torch.__version__}) "
                       "= distributed_c10d._set_pg_timeout")
    return applied


class _AfterImport:
    """Meta-path finder that runs ``fix(module)`` right after module ``name`` has executed."""

    def __init__(self, name, fix):
        self.name, self.fix = name, fix

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_fix(module):
            exec_module(module)
            self.fix(module)

        spec.loader.exec_module = exec_and_fix
        return spec


class _CpuDeviceModule:
    """torch.cpu plus the CUDA-style memory API torchtitan's metrics call."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def get_device_name(self, device=None):
        import platform

        return platform.processor() or "CPU"

    def current_device(self):
        return 0

    def get_device_properties(self, device=None):
        import types

        return types.SimpleNamespace(total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def memory_stats(self, device=None):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}

    def reset_peak_memory_stats(self, device=None):
        pass

    def empty_cache(self):
        pass


def _child_config_v03():
    """torchtitan 0.3.x config: its llama3_debugmodel() with this benchmark's run settings."""
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    spec = json.loads(os.environ["VS_TT_SPEC"])
    c = llama3_debugmodel()
    for layer in c.model_spec.model.layers:  # causal SDPA, as ours (see the module docstring)
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    c.hf_assets_path, c.dump_folder = spec["tokenizer"], spec["dump"]
    c.dataloader.dataset, c.dataloader.dataset_path = "c4_test", spec["data"]
    t = c.training
    t.seq_len, t.local_batch_size, t.global_batch_size, t.steps, t.max_norm = 512, 8, 8, spec["steps"], 1.0
    t.mixed_precision_param, t.disable_cuda_graphs = spec["param_dtype"], True
    c.optimizer = default_adamw(lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    c.optimizer.implementation = spec["optim_impl"]
    c.lr_scheduler.warmup_steps = 2
    c.metrics.log_freq, c.metrics.disable_color_printing = spec["log_freq"], True
    c.activation_checkpoint = SelectiveAC.Config() if spec["ac"] == "selective" else None
    c.compile.enable = spec["compile"]
    c.validator.enable, c.checkpoint.enable = False, False
    return c


def _child_main() -> None:
    import importlib.metadata
    import importlib.util

    spec = json.loads(os.environ["VS_TT_SPEC"])
    # Not `import torchtitan` yet: its __init__ may import the modules the patches must precede.
    version = importlib.metadata.version("torchtitan")
    where = importlib.util.find_spec("torchtitan").submodule_search_locations[0]
    print(f"vs_torchtitan child: {version} from {where}, torch {torch.__version__}", flush=True)
    # Before any torchtitan import: 0.2.x's ConfigManager binds sys.argv[1:] as a default at import.
    if version.startswith("0.2"):
        sys.argv = [sys.argv[0], "--model.name", "llama3", "--model.flavor", "debugmodel",
                    "--model.hf_assets_path", spec["tokenizer"], "--job.dump_folder", spec["dump"],
                    "--training.dataset", "c4_test", "--training.dataset_path", spec["data"],
                    "--training.seq_len", "512", "--training.local_batch_size", "8",
                    "--training.global_batch_size", "8", "--training.steps", str(spec["steps"]),
                    "--training.max_norm", "1.0", "--training.mixed_precision_param", spec["param_dtype"],
                    "--optimizer.lr", "8e-4", "--optimizer.beta1", "0.9", "--optimizer.beta2", "0.95",
                    "--optimizer.eps", "1e-8", "--optimizer.weight_decay", "0.1",
                    "--optimizer.implementation", spec["optim_impl"], "--lr_scheduler.warmup_steps", "2",
                    "--metrics.log_freq", str(spec["log_freq"]), "--metrics.disable_color_printing",
                    "--activation_checkpoint.mode", spec["ac"],
                    *(["--activation_checkpoint.selective_ac_option", "op"] if spec["ac"] == "selective" else []),
                    *(["--compile.enable"] if spec["compile"] else [])]
    else:  # 0.3.x: --module is any importable module, --config a function in it: this one
        sys.argv = [sys.argv[0], "--module", "__main__", "--config", "_child_config_v03"]
    for patch in _child_patches(spec):
        print(f"vs_torchtitan patch: {patch}", flush=True)
    if version.startswith("0.2"):
        from torchtitan.train import Trainer, main as tt_main

        tt_main(Trainer)
    else:
        from torchtitan.train import main as tt_main

        tt_main()


if __name__ == "__main__":
    _child_main() if sys.argv[1:2] == ["--child"] else main()
