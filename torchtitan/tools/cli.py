"""One ``error: ...`` line instead of a traceback, for every entry point (train.py, scripts/).

    from torchtitan.tools.cli import main_with_user_errors

    def run(argv: list[str]) -> None:  # does the work; raises on any problem
        ...

    if __name__ == "__main__":
        main_with_user_errors(run, sys.argv[1:])

``main_with_user_errors(fn, argv)`` calls ``fn(argv)`` and returns what it returns. When it raises

- a user error (an instance of ``USER_ERRORS``: a bad value, a missing or unwritable path, ...):
  prints ``error: <Type>: <message> (set TORCHTITAN_TRACEBACK=1 for the full traceback)`` as one
  line on stderr (``[rankN] error: ...`` under a multi-rank launcher), leaves that line in the rank's
  torchelastic error file (``torchtitan.tools.launch`` prints it from there) and exits with code 1;
- anything else (a bug, a crash): writes its traceback to the error file and re-raises it.

``TORCHTITAN_TRACEBACK=1`` re-raises user errors too, with their full traceback. A native crash
(SIGSEGV, ...) prints the Python stack (faulthandler; see ``launch.enable_fault_log``).
Stdlib only at import: a config error must not wait for torch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable, NoReturn, TypeVar

from torchtitan.tools import launch

# What a user can fix: config values, paths, permissions, data, checkpoints, diverging training.
# (tomllib.TOMLDecodeError is a ValueError; OSError subclasses cover missing/unwritable paths.)
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
               FileExistsError, FloatingPointError)

T = TypeVar("T")


def main_with_user_errors(fn: Callable[[list[str] | None], T], argv: list[str] | None = None) -> T:
    """``fn(argv)``; a user error ends the process with one ``error:`` line and exit code 1."""
    launch.enable_fault_log()
    try:
        return fn(argv)
    except USER_ERRORS as e:
        if os.environ.get("TORCHTITAN_TRACEBACK", "") not in ("", "0"):
            launch.record_crash(e)
            raise
        # A script run as __main__ or under a launcher may exit hard; a caller running ``main``
        # in-process (a test) gets SystemExit.
        launched = "RANK" in os.environ or "LOCAL_RANK" in os.environ
        exit_with_error(e, hard=launched or getattr(fn, "__module__", "") == "__main__")
    except Exception as e:  # a bug or a crash: the launcher shows this traceback as the root cause
        launch.record_crash(e)
        raise


def error_line(e: BaseException) -> str:
    """The one line a user error prints (``[rankN] `` first when this is one of several ranks)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    message = " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
        message = f"{message}: {e.filename}"
    return f"{prefix}error: {type(e).__name__}: {message} (set TORCHTITAN_TRACEBACK=1 for the full traceback)"


def exit_with_error(e: BaseException, hard: bool = True) -> NoReturn:
    """Print and record ``error_line(e)``, stop what must not outlive the process, exit with code 1.

    With a process group or another non-daemon thread alive: ``os._exit``, which skips the
    interpreter's teardown -- a gloo process group that was not destroyed after a barrier aborts
    there at random ("terminate called without an active exception"), the peers of a failed rank
    cannot join a barrier anyway (torchrun stops them), and a stuck thread would keep the process.
    Otherwise, or with ``hard`` False (``main`` called in-process, not as the script), ``SystemExit(1)``,
    which the caller (a test) can catch.
    """
    line = error_line(e)
    print(line, file=sys.stderr, flush=True)
    launch.record_user_error(line)
    logging.shutdown()
    sys.stdout.flush()
    stop_background_saver()
    getattr(sys.modules.get("torchtitan.components.run_lock"), "release_all", lambda: None)()  # os._exit skips atexit
    if hard and _teardown_is_unsafe():
        os._exit(1)
    raise SystemExit(1) from None


def stop_background_saver() -> None:
    """DCP's checkpoint process (async_with_pinned_mem) must not outlive the trainer."""
    checkpoint = sys.modules.get("torchtitan.components.checkpoint")  # not imported: nothing to stop
    try:
        if checkpoint is not None:
            checkpoint._stop_checkpoint_process()
    except Exception:  # best effort on the way out
        pass


def _teardown_is_unsafe() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        return True
    main = threading.main_thread()
    return any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate())
