"""bench/vs_torchtitan.py's child environment sees the packages of the python that runs the bench,
also when that python is a virtual environment (whose packages --system-site-packages would miss)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _purelib(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_child_venv_sees_the_parent_venvs_packages(tmp_path):
    # The parent: a user's venv (over this python's packages, for torch) holding a package of its own.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "parent")],
                   check=True)
    parent = tmp_path / "parent" / "bin" / "python"
    (_purelib(parent) / "only_in_parent_venv.py").write_text("WHERE = 'parent venv'\n")
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import vs_torchtitan; "
              f"vs_torchtitan.make_child_venv(__import__('pathlib').Path({str(tmp_path / 'child')!r}))")
    subprocess.run([str(parent), "-c", script], check=True, capture_output=True)
    child = tmp_path / "child" / "bin" / "python"
    probe = subprocess.run([str(child), "-P", "-c", "import only_in_parent_venv, torch; "
                            "print(only_in_parent_venv.WHERE, torch.__version__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    import torch

    assert probe.stdout.split() == ["parent", "venv", torch.__version__]
