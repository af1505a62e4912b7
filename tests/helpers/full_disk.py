"""A disk that fills up, on every platform: DCP's file streams raise ENOSPC once a byte budget is spent.

In-process: ``with full_disk(budget_bytes, only="step-4.tmp"): ...``. As a runner of train.py:

    python tests/helpers/full_disk.py [--enospc-at-step STEP BUDGET] [--record-checkpoints FILE] -- <train.py args>

--enospc-at-step: the save of STEP gets BUDGET bytes, then every write fails with ENOSPC, as on a
full disk (the bytes that fit are written first). Armed in DCP's checkpoint process too
(async_with_pinned_mem spawns it; it re-imports this file as __mp_main__ and arms from the environment).
--record-checkpoints: as each save starts, FILE gets the sha256 of every file of the complete
checkpoints: what a failing save must leave intact.
"""

import contextlib
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

_ENV = "TORCHTITAN_TEST_ENOSPC"  # "STEP BUDGET", inherited by DCP's checkpoint process


class _BudgetStream:
    """A writable file whose writes fail with ENOSPC once the shared budget is spent."""

    def __init__(self, stream, path, budget: list[int]):
        self._stream, self._path, self._budget = stream, path, budget

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._budget[0]:
            fits = self._budget[0]
            self._stream.write(memoryview(data).cast("B")[:fits])
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._path))
        self._budget[0] -= n
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def full_disk(budget_bytes: int, only: str = ""):
    """Within: DCP writes (into a folder named ``only``, if given) fail after ``budget_bytes`` in all."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    original = FileSystem.create_stream
    budget = [budget_bytes]

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as stream:
            writes = "w" in mode or "a" in mode
            yield _BudgetStream(stream, path, budget) if writes and only in Path(path).parts else stream

    FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        FileSystem.create_stream = original


def checkpoint_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under the complete checkpoints (step-N with .metadata)."""
    out = {}
    for step in sorted(folder.glob("step-*")):
        if step.name.removeprefix("step-").isdigit() and (step / ".metadata").is_file():
            for f in sorted(p for p in step.rglob("*") if p.is_file()):
                out[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


_ARMED = []  # the entered context managers: a collected one would disarm itself


def _arm_enospc(step: int, budget: int) -> None:
    os.environ[_ENV] = f"{step} {budget}"
    _ARMED.append(full_disk(budget, only=f"step-{step}.tmp"))
    _ARMED[-1].__enter__()  # for the rest of this process


def _arm_record(file: str) -> None:
    from torchtitan.components.checkpoint import CheckpointManager

    original = CheckpointManager._prepare_tmp  # each save, once the one before it is published

    def record_then_prepare(self, step):
        if self.folder.is_dir():
            Path(file).write_text(json.dumps(checkpoint_hashes(self.folder)))
        return original(self, step)

    CheckpointManager._prepare_tmp = record_then_prepare


if __name__ == "__mp_main__" and os.environ.get(_ENV):
    _arm_enospc(*map(int, os.environ[_ENV].split()))

if __name__ == "__main__":
    args = sys.argv[1:]
    while args and args[0] != "--":
        if args[0] == "--enospc-at-step":
            _arm_enospc(int(args[1]), int(args[2]))
            args = args[3:]
        elif args[0] == "--record-checkpoints":
            _arm_record(args[1])
            args = args[2:]
        else:
            raise SystemExit(f"unknown option {args[0]}")
    from train import main

    main(args[1:])
