"""What the launcher (torchtitan/tools/launch.py) does around torchrun's ``run``.

Before any rank exists: the start line (from the command line alone, before torch is imported),
then train.py's config parsed and its degrees and batch checked against the world size -- a
config or layout error costs the launcher ~2 s instead of every rank's ~10 -- and a warning when
the processes outnumber the cores. While the ranks run: Ctrl-C and SIGTERM relayed to them
(``SignalRelay``). Stdlib only at import.
"""

from __future__ import annotations

import os
import signal

PREFIX = "launcher:"


# ---- before the ranks start: the start line, the config and layout checks ---------------------


def start_line(argv: list[str]) -> str:
    """What starts, read from the command line and the TOML file alone: printed before torch is
    imported (that takes 1-2 s), so the first second of a run is not silent."""
    script_at = next((i for i, a in enumerate(argv) if a.endswith(".py") and not a.startswith("-")), len(argv))
    nproc = last_option(argv[:script_at], ("--nproc_per_node", "--nproc-per-node")) or "1"
    line = "starting " + ("a process per GPU (1 without CUDA)" if nproc == "devices" else
                          f"{nproc} process{'es' if nproc != '1' else ''}")
    if script_at == len(argv):
        return line
    script = argv[script_at]
    line += f" of {os.path.basename(script)}"
    if os.path.basename(script) == "train.py":
        line += ": " + describe_run(argv[script_at + 1:], _script_default_config(script))
    return line


def describe_run(argv: list[str], default_config: str | os.PathLike = "") -> str:
    """``config FILE, model NAME FLAVOR`` from the command line and the TOML file alone (stdlib):
    for the start line; the full parse follows and reports any error."""
    from torchtitan.config.job_config import Model
    from torchtitan.config.manager import load_toml

    config = last_option(argv, ("--job.config_file", "--config")) or str(default_config)
    model = {"name": Model().name, "flavor": Model().flavor}
    try:
        model.update(load_toml(config).get("model", {}) if config else {})
    except (OSError, ValueError):
        pass
    for key in ("name", "flavor"):
        model[key] = last_option(argv, (f"--model.{key}",)) or model[key]
    return f"config {config or '(defaults)'}, model {model['name']} {model['flavor']}"


def preflight(args) -> list[str]:
    """Resolve the process count and threads; for train.py (not ``-m``, not another script)
    check its config as the ranks will and its degrees and batch against the world size
    (raises the ValueError a rank would raise). Returns the lines to print: the layout, and a
    warning when the processes outnumber the cores. ``--help`` prints train.py's help, exits 0."""
    nproc = _resolve_nproc(args)
    threads = _default_threads(nproc)
    lines = []
    if os.path.basename(args.training_script) == "train.py" and not (args.module or args.no_python):
        nnodes = _fixed_nnodes(args.nnodes)
        lines.append(_check_train_config(args.training_script, list(args.training_script_args),
                                         nproc * nnodes if nnodes else None))
    cores = _cores()
    if nproc * threads > cores:
        lines.append(f"warning: {nproc} processes x {threads} thread(s) on {cores} CPU core(s): they take turns "
                     f"on the cores, every step runs ~{-(-nproc * threads // cores)}x slower and start-up takes "
                     f"longer; run at most {cores} process(es) here (NGPU), or fewer OMP_NUM_THREADS")
    return lines


def _check_train_config(script: str, argv: list[str], world_size: int | None) -> str:
    """The config parsed and checked as a rank does, the degrees and batch against the world
    size (None: an elastic node range, not known yet); returns the layout line."""
    from torchtitan.config.manager import ConfigManager
    from torchtitan.parallelisms.parallel_dims import ParallelDims, batch_split

    default = _script_default_config(script)
    manager = ConfigManager(default_config_file=default) if default else ConfigManager()
    cfg = manager.parse_args(argv)
    manager.check_paths(cfg)
    where = f"{cfg.training.steps} steps into {cfg.job.dump_folder}"
    if cfg.memory_estimation.enable or world_size is None:  # one process / an elastic world: no layout yet
        return where
    p, t = cfg.parallelism, cfg.training
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, world_size, ep=p.ep)
    batch_split(t.global_batch_size, -1 if t.local_batch_size == 0 else t.local_batch_size, dims.dp)
    return f"{where}; {dims.layout_line()}"


def _script_default_config(script: str) -> str:
    """train.py's ``DEFAULT_CONFIG`` (what it trains without --config), as its ranks will read it."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location("_torchtitan_launched_script", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # only defines names: train.py runs under `if __name__ == "__main__"`
    except (OSError, AttributeError):  # no such file: torchrun reports it
        return ""
    return str(getattr(module, "DEFAULT_CONFIG", ""))


def last_option(argv: list[str], names: tuple[str, ...]) -> str:
    """The value of the last ``--name VALUE`` / ``--name=VALUE`` among ``names`` ("" when absent)."""
    value = ""
    for i, token in enumerate(argv):
        name, eq, text = token.partition("=")
        if name in names:
            value = text if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return value


def _resolve_nproc(args) -> int:
    """``--nproc_per_node``: ``devices`` (run_train.sh's default) is the CUDA device count, or 1
    without CUDA; anything else as torchrun reads it."""
    from torch.distributed.run import determine_local_world_size

    if args.nproc_per_node == "devices":
        import torch

        args.nproc_per_node = str(torch.cuda.device_count() or 1)
    return determine_local_world_size(args.nproc_per_node)


def _default_threads(nproc: int) -> int:
    """OMP_NUM_THREADS, unset: the cores split between the processes (oversubscribed threads
    fight: 7x slower seen on 2 cores), which also spares torchrun's warning about it."""
    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // nproc))
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except ValueError:
        return 1


def _fixed_nnodes(nnodes: str) -> int | None:
    """The node count, or None for an elastic range (``1:4``): the world size is not known yet."""
    low, _, high = nnodes.partition(":")
    return int(low) if not high or high == low else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- Ctrl-C and SIGTERM -----------------------------------------------------------------------


class Stopped(BaseException):
    """A stop signal before any rank runs: unwinds torchrun's start-up (not an Exception, which
    its retry loops would catch)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SignalRelay:
    """Ctrl-C and SIGTERM are passed on to the ranks, which finish their step, save and stop; the
    run then ends as the signal asks: 0 after SIGTERM (a preemption is not a failure), 130 after
    Ctrl-C. A second Ctrl-C makes the ranks exit at once, a third SIGKILLs them.

    torchrun's own handling (``--signals_to_handle``) is switched off for these two: it sends the
    signal, SIGKILLs the ranks after ``--shutdown_timeout`` (30 s) even mid-save, and ends in
    SignalException (exit 143 after a clean preemption). The ranks run in sessions of their own,
    so the terminal's Ctrl-C reaches the launcher only, and the relay finds them as its children.
    """

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def take_over_from_torchrun(args) -> None:
        """torchrun handles the other signals of ``--signals_to_handle`` (SIGHUP, SIGQUIT) as before."""
        if hasattr(args, "signals_to_handle"):  # without it (older torch) torchrun's handlers replace ours
            others = [s for s in args.signals_to_handle.split(",") if s.strip() not in _RELAYED]
            args.signals_to_handle = ",".join(others) or "SIGHUP"

    def _on_signal(self, signum: int, frame) -> None:
        ranks = _child_pids()
        if not ranks:
            raise Stopped(signum)
        self.count += 1
        self.signum = self.signum or signum
        if self.count >= 3 and signum == signal.SIGINT:
            notice("Ctrl-C a third time: killing the ranks (SIGKILL)")
            _send(ranks, signal.SIGKILL)
            return
        if self.count == 1:
            notice(f"{signal_text(signum)}: each rank finishes its step, saves a checkpoint (when checkpointing "
                    f"is on) and stops" + ("; Ctrl-C again stops them at once" if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT:
            notice("Ctrl-C again: the ranks exit now, without saving")
        _send(ranks, signum)

    def exit_code(self, ranks_failed: bool = False) -> int:
        """After the ranks ended (0 when no signal came). ``ranks_failed``: they were killed by the
        signal or exited 130 (during start-up, or a second Ctrl-C), not after a clean stop."""
        if self.signum is None:
            return 0
        if self.signum == signal.SIGTERM and not ranks_failed:
            notice("stopped by SIGTERM: every rank stopped cleanly")
            return 0
        unsaved = " before the ranks could stop cleanly" if ranks_failed else ""
        notice(f"stopped by {signal_text(self.signum)}{unsaved}")
        return 128 + self.signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_RELAYED = ("SIGINT", "SIGTERM")


def stopped_on_request(failure) -> bool:
    """A rank that ended because it was asked to: Ctrl-C's 130, or killed by a stop signal."""
    return failure.exitcode == 130 or failure.signal_name() in ("SIGINT", "SIGTERM", "SIGKILL")


def signal_text(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _child_pids() -> list[int]:
    """This process's children (the ranks) from /proc; none where there is no /proc."""
    me, pids = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if ppid == me:
            pids.append(int(entry))
    return pids


def _send(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def notice(text: str) -> None:
    """A launcher line; one write, so also safe in a signal handler (no lock the interrupted code may hold)."""
    os.write(2, f"{PREFIX} {text}\n".encode())
