"""The embedded default corpus: the source of the running Python's standard library.

It needs no download, is 13-30 MB of real text on every machine, and is the same
on every rank. One document per ``.py`` file, in sorted order of the path relative
to the stdlib root, then shuffled with a fixed seed, so the order does not depend on
the file system and related modules are not adjacent (sorted, all of ``test/`` would be
one long stretch of a few thousand steps). A file goes
to the validation split when a hash of its relative path falls below
``val_fraction``: stable across runs and machines, and independent of which other
files exist. ``held_out`` is the one rule every source uses (local files hash each
document's text, see ``sources.py``).
"""

import functools
import hashlib
import os
import random
import sysconfig
from pathlib import Path

_ORDER_SEED = 1234  # part of the corpus definition: changing it changes every run's data order
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out(key: str, val_fraction: float) -> bool:
    """Whether the document named by ``key`` is in the validation split: the first 8 bytes of its
    SHA-256 read as a number in [0, 1) fall below ``val_fraction``. A pure function of the key, so the
    same on every rank, machine and run, and independent of every other document."""
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


@functools.lru_cache(maxsize=4)
def _relative_py_files(root: Path) -> tuple[Path, ...]:
    # Walking the stdlib takes ~1-2 s; the train and the validation loaders both need it.
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune: site-packages is huge
        files += [(Path(dirpath) / name).relative_to(root) for name in filenames if name.endswith(".py")]
    return tuple(files)


def stdlib_files(split: str = "train", val_fraction: float = 0.01) -> list[Path]:
    """The ``.py`` files of the stdlib, in the corpus order, for ``split`` ("train", "validation" or "all")."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'validation' or 'all'")
    root = stdlib_root()
    files = [
        rel for rel in _relative_py_files(root)
        if split == "all" or held_out(rel.as_posix(), val_fraction) == (split == "validation")
    ]
    if not files:
        raise ValueError(f"no .py files found under the stdlib at {root} (split {split!r})")
    files.sort(key=lambda p: p.as_posix())
    random.Random(_ORDER_SEED).shuffle(files)
    return [root / rel for rel in files]


def read_document(path: Path) -> str:
    # A few stdlib test files are deliberately not valid UTF-8; keep their bytes visible.
    return path.read_bytes().decode("utf-8", errors="replace")
