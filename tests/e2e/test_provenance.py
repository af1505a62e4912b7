"""A run records how it was made: code version (commit + diff of uncommitted changes, from a
checkout), software versions, the layout and the command line, beside config.toml."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from torchtitan.tools import provenance

REPO = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_record_rebuilds_the_code_of_a_dirty_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("WIDTH = 1\n")
    _git(repo, "add", "model.py")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "first")
    (repo / "model.py").write_text("WIDTH = 2\n")  # an uncommitted change ...
    (repo / "new_layer.py").write_text("DEPTH = 3\n")  # ... and a new file
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", repo)
    dump = tmp_path / "dump"
    dump.mkdir()
    provenance.write_provenance(dump, {"world_size": 1, "tp": 1}, argv=["train.py", "--training.steps", "3"])
    record = json.loads((dump / "provenance.json").read_text())
    assert record["code"]["git_commit"] == _git(repo, "rev-parse", "HEAD").strip()
    assert record["code"]["dirty"] and record["code"]["untracked_files"] == ["new_layer.py"]
    assert record["software"]["torch"] == torch.__version__
    assert record["layout"] == {"world_size": 1, "tp": 1}
    assert record["command"][1:] == ["train.py", "--training.steps", "3"]
    # The commit plus code.diff is exactly the tree that ran.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    _git(clone, "apply", str(dump / "code.diff"))
    assert (clone / "model.py").read_text() == "WIDTH = 2\n"
    assert (clone / "new_layer.py").read_text() == "DEPTH = 3\n"


def test_a_training_run_writes_it_beside_its_config(tmp_path, cache_dir):
    dump = tmp_path / "run"
    args = ["--job.config_file", str(REPO / "train_configs/debug_model.toml"), "--job.dump_folder", str(dump),
            "--tokenizer.cache_dir", str(cache_dir), "--model.flavor", "debugmodel_tiny", "--training.steps", "1",
            "--training.seq_len", "32", "--training.global_batch_size", "2"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((dump / "provenance.json").read_text())
    assert (dump / "config.toml").is_file()
    assert record["layout"]["world_size"] == 1 and record["layout"]["dp_shard"] == 1
    assert record["command"][-2:] == ["--training.global_batch_size", "2"]
    assert "git_commit" in record["code"] or "package_version" in record["code"]
