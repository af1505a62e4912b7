"""The embedded default corpus: the source of the running Python's standard library.

It needs no download, is 13-30 MB of real text on every machine, and is the same
on every rank. One document per ``.py`` file, in sorted order of the path relative
to the stdlib root, so the order does not depend on the file system. A file goes
to the validation split when a hash of its relative path falls below
``val_fraction``: stable across runs and machines, and independent of which other
files exist.
"""

import hashlib
import sysconfig
from pathlib import Path

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _in_val_split(rel_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def stdlib_files(split: str = "train", val_fraction: float = 0.01) -> list[Path]:
    """Sorted ``.py`` files of the stdlib for ``split`` ("train", "validation" or "all")."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'validation' or 'all'")
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if split != "all" and _in_val_split(rel.as_posix(), val_fraction) != (split == "validation"):
            continue
        files.append(rel)
    if not files:
        raise ValueError(f"no .py files found under the stdlib at {root} (split {split!r})")
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def read_document(path: Path) -> str:
    # A few stdlib test files are deliberately not valid UTF-8; keep their bytes visible.
    return path.read_bytes().decode("utf-8", errors="replace")
