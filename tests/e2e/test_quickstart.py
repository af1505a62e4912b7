"""The README's quick start, command by command, as a new user runs it (on a tiny model).

The commands are read from the README's first ``bash`` block, so the README and this test cannot
drift apart: train with checkpoints, plot, generate, export to Hugging Face, convert back,
generate again. Each command's exit code and the files it promises are checked. The only changes
are the tiny model (extra overrides on the training line, a short generation) and the output
folder (``outputs/`` becomes a temporary folder, so the checkout is never written).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO

TINY = [
    "--model.flavor", "debugmodel_tiny", "--training.steps", "4", "--training.seq_len", "64",
    "--training.global_batch_size", "4", "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "2",
    "--checkpoint.interval", "2", "--data.shuffle_windows", "64",
]


def quickstart_commands() -> list[str]:
    """The first ```bash block of README.md, one command per line, comments and pip lines dropped."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "pip "))]


def adapt(command: str, out: Path) -> list[str]:
    """The README's command on the tiny model, writing into ``out`` instead of ``outputs/``."""
    argv = [a.replace("outputs/", f"{out}/") if a.startswith("outputs/") else a for a in shlex.split(command)]
    if argv[0] == "./run_train.sh":
        return ["bash", str(REPO / "run_train.sh"), *argv[1:], "--job.dump_folder", str(out), *TINY]
    assert argv[0] == "python", command
    argv[0] = sys.executable
    if argv[1] == "scripts/generate.py":
        argv += ["--max_new_tokens", "8"]
    return argv


def test_readme_quickstart_in_order(tmp_path, cache_dir):
    commands = quickstart_commands()
    scripts = [shlex.split(c)[0 if c.startswith("./") else 1] for c in commands]
    assert scripts == [
        "./run_train.sh", "scripts/plot_metrics.py", "scripts/generate.py",
        "scripts/convert_dcp_to_hf.py", "scripts/convert_hf_to_dcp.py", "scripts/generate.py",
    ], f"the README's quick start changed: {commands}"
    out = tmp_path / "outputs"
    env = dict(os.environ, OMP_NUM_THREADS="1", NGPU="1", TORCHTITAN_CACHE=str(cache_dir), PYTHONPATH=str(REPO))
    outputs = []
    for command in commands:
        proc = subprocess.run(adapt(command, out), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert proc.returncode == 0, f"{command!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{command!r}:\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout + proc.stderr)
        if scripts[len(outputs) - 1] == "./run_train.sh":
            text = outputs[-1]
            assert "launcher: starting" in text.splitlines()[0], text[:2000]  # what starts, before anything else
            assert "layout: 1 rank" in text and "run summary: 4 steps" in text, text[-3000:]
            assert (out / "metrics.jsonl").is_file() and (out / "config.toml").is_file()
            assert sorted(p.name for p in (out / "checkpoint").iterdir() if p.name.startswith("step-")) == [
                "step-2", "step-4"]
    assert (out / "metrics.png").stat().st_size > 1000
    hf = out / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    assert oct((hf / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    first, last = outputs[2], outputs[5]
    for text in (first, last):
        assert "tokens/s" in text, text[-2000:]
    # The converted checkpoint carries the tokenizer: generate found it without --tokenizer.
    assert any(p.name.startswith("tokenizer") for p in (out / "from_hf").iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readme_written_paths() -> list[str]:
    """Every path a README command writes inside the checkout: the targets of the conversions and of
    --output_path / --write_config / --hardware_out / --output."""
    paths = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line.split("  #")[0], comments=True) if line.strip() else []
            if len(argv) > 3 and argv[0] == "python" and re.match(r"scripts/convert_\w+_to_\w+\.py", argv[1]):
                paths.append(argv[3])
            paths += [argv[i + 1] for i, a in enumerate(argv[:-1])
                      if a in ("--output_path", "--write_config", "--hardware_out", "--output")]
    return paths


def test_what_the_readme_commands_write_is_git_ignored():
    paths = readme_written_paths()
    assert len(paths) >= 8, paths  # the conversions, eval's --output_path, the planner's outputs
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    if proc.returncode == 128:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    assert sorted(proc.stdout.split()) == sorted(paths), f"not ignored: {set(paths) - set(proc.stdout.split())}"
