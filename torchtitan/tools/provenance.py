"""How a run was made, written beside its config.toml: ``provenance.json`` and ``code.diff``.

A loss curve is only reproducible with the code that made it. Lingua's stool copies the code into
the dump folder for the same reason; we record the git commit and the uncommitted changes (a diff
rebuilds the tree exactly from that commit) when run from a checkout, else the installed package's
version, and the software and hardware around it: python, torch, CUDA, NCCL, the devices, the world
layout, the command line and the scheduler's job ids.

Written by rank 0 only, once the start is accepted (components/run_folder.py: a refused start writes
nothing); each restart of the run (a resume) rewrites it, and the previous record is kept as
``provenance.<start time>.json`` when the code changed in between.
"""

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding torchtitan/
_MAX_UNTRACKED_BYTES = 1 << 20
_JOB_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST",
            "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _git(*args: str, ok: tuple[int, ...] = (0,)) -> str | None:
    """git's output, or None when git is missing, hangs or exits with a code not in ``ok``."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine, or a hung file system
        return None
    return out.stdout if out.returncode in ok else None


def code_version() -> tuple[dict, str]:
    """({commit, dirty, branch} or {package_version}, the diff of uncommitted changes or "")."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:  # not a checkout: an installed package
        try:
            version = metadata.version("torchtitan")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {"source": str(PACKAGE_ROOT), "package_version": version}, ""
    # Tracked changes against HEAD, and untracked files as additions, so the diff rebuilds the tree.
    diff = _git("diff", "HEAD", "--binary") or ""
    untracked = (_git("ls-files", "--others", "--exclude-standard") or "").split()
    for path in untracked:
        if (PACKAGE_ROOT / path).stat().st_size <= _MAX_UNTRACKED_BYTES:  # code, not stray data files
            # `git diff --no-index` exits 1 when the files differ, as they always do here.
            diff += _git("diff", "--no-index", "--binary", "/dev/null", path, ok=(0, 1)) or ""
    branch = (_git("rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    code = {"source": str(PACKAGE_ROOT), "git_commit": commit.strip(), "git_branch": branch,
            "dirty": bool(diff), "untracked_files": untracked}
    return code, diff


def software() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "packages": {name: _version(name) for name in ("torchdata", "torchao", "tiktoken", "tokenizers",
                                                        "datasets", "transformers")},
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def hardware() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def write_provenance(folder: str | Path, layout: dict, argv: list[str] | None = None, run_id: str = "") -> Path:
    """Write ``provenance.json`` (and ``code.diff`` when the checkout has changes) into ``folder``."""
    folder = Path(folder)
    code, diff = code_version()
    record = {
        "run_id": run_id,  # the run_id of the metrics.jsonl records this start writes
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "cwd": os.getcwd(),
        "code": code,
        "software": software(),
        "hardware": hardware(),
        "layout": layout,
        "job": {key: os.environ[key] for key in _JOB_ENV if key in os.environ},
    }
    path = folder / "provenance.json"
    if path.exists():  # a resume: keep the record of the code that made the earlier steps
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous and previous.get("code") != code:
            stamp = str(previous.get("start_time", "earlier")).replace(":", "")
            path.rename(folder / f"provenance.{stamp}.json")
            if (folder / "code.diff").exists():
                (folder / "code.diff").rename(folder / f"code.{stamp}.diff")
    path.write_text(json.dumps(record, indent=1) + "\n")
    if diff:
        (folder / "code.diff").write_text(diff)
    elif (folder / "code.diff").exists():
        (folder / "code.diff").unlink()  # a clean checkout now: a stale diff would mislead
    return path
