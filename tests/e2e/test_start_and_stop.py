"""The first and last seconds of a run (issue 19): what it says when it starts and ends, and how
it stops -- Ctrl-C once or twice, SIGTERM through ./run_train.sh, a launcher killed with -9.

- ``python train.py`` prints what starts within 2 s; a Ctrl-C during start-up is one line, exit 130;
- Ctrl-C during training (to the process group, as a terminal sends it) finishes the step, saves it,
  prints the run summary and one ``stopped:`` line, exit 130; a second Ctrl-C exits at once with one
  line; never a traceback;
- through ./run_train.sh (2 ranks): SIGTERM saves and exits 0, Ctrl-C saves and exits 130;
- a config typo through the launcher fails in under 3 s, before any rank starts;
- ``kill -9`` of the launcher's process group takes its ranks with it within seconds, and the
  restart resumes at once (~35 s for the whole file on 2 cores).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny(dump: Path, cache: Path, steps: int = 2000) -> list[str]:
    """A run long enough to be stopped by hand; checkpoints only when asked (interval 1000)."""
    return ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml"), "--job.dump_folder", str(dump),
            "--tokenizer.cache_dir", str(cache), "--model.flavor", "debugmodel_tiny", "--training.steps", str(steps),
            "--training.seq_len", "64", "--training.global_batch_size", "4", "--metrics.log_freq", "1",
            "--checkpoint.enable", "--checkpoint.interval", "1000", "--comm.init_timeout_seconds", "120"]


class Run:
    """A training command whose output is read line by line, with the time each line came."""

    def __init__(self, cmd: list[str], ngpu: int | None = None):
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHTITAN_TRACEBACK", "LOG_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **({"NGPU": str(ngpu)} if ngpu else {}))
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []

    def wait_for(self, text: str, timeout: float = 300) -> float:
        """Read until a line holds ``text``; returns when it came (seconds since the start)."""
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line))
            if text in line:
                return self.lines[-1][0]
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output[-3000:]}"
        raise AssertionError(f"ended without {text!r}:\n{self.output[-3000:]}")

    def signal(self, signum: int, group: bool = False) -> float:
        """``group``: to its whole process group, as a terminal's Ctrl-C (the run's helper processes too)."""
        (os.killpg if group else os.kill)(self.proc.pid, signum)
        return time.monotonic()

    def finish(self, timeout: float = 120) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append((time.monotonic() - self.start, out))
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)


def train_py(*args: str) -> Run:
    return Run([sys.executable, "train.py", *args])


def assert_no_traceback(out: str) -> None:
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def one_line(out: str, text: str) -> str:
    lines = [x for x in out.splitlines() if text in x]
    assert len(lines) == 1, f"{len(lines)} lines with {text!r}:\n{out[-3000:]}"
    return lines[0]


def test_start_line_within_2_s_and_ctrl_c_during_start_up_is_one_line(tmp_path, cache_dir):
    run = train_py(*tiny(tmp_path / "dump", cache_dir))
    when = run.wait_for("train.py: starting")
    run.signal(signal.SIGINT)
    code = run.finish()
    out = run.output
    assert when < 2.0, f"first line after {when:.2f} s"
    assert "debug_model.toml" in out and "debugmodel_tiny" in out, out
    assert code == 130, out[-3000:]
    assert_no_traceback(out)
    assert "before training started" in one_line(out, "stopped:")


def test_ctrl_c_finishes_the_step_saves_it_and_summarizes(tmp_path, cache_dir):
    # DCP's checkpoint process (async_with_pinned_mem) gets the terminal's Ctrl-C too: it must not
    # fail the save in flight nor print a traceback of its own.
    run = train_py(*tiny(tmp_path, cache_dir), "--checkpoint.interval", "2",
                   "--checkpoint.async_mode", "async_with_pinned_mem")
    run.wait_for("saved checkpoint")
    run.signal(signal.SIGINT, group=True)
    code = run.finish()
    out = run.output
    assert code == 130, out[-3000:]
    assert_no_traceback(out)
    assert "failed" not in out, out[-3000:]
    stopped = one_line(out, "stopped:")
    step = int(stopped.split("after step ")[1].split(";")[0])
    assert step >= 2 and f"checkpoint step-{step} saved" in stopped, stopped
    assert (tmp_path / "checkpoint" / f"step-{step}" / ".metadata").is_file()
    summary = [x for x in out.splitlines() if "run summary:" in x]
    assert f"{step} steps (1-{step} of 2000)" in summary[0] and "final loss" in summary[0], summary
    assert str(tmp_path / "checkpoint" / f"step-{step}") in summary[1], summary
    assert f"{tmp_path / 'metrics.jsonl'}" in summary[1] and "plot_metrics.py" in summary[1], summary
    assert "layout: 1 rank, no parallelism" in out


def test_second_ctrl_c_exits_at_once(tmp_path, cache_dir):
    # 32 microbatches a step (~1 s): the second Ctrl-C lands while the first is still finishing its step.
    run = train_py(*tiny(tmp_path, cache_dir), "--training.global_batch_size", "128", "--training.local_batch_size", "4")
    run.wait_for("step      2")
    run.signal(signal.SIGINT)
    run.wait_for("Ctrl-C: finishing this step")  # one pending SIGINT at a time: two at once are one
    second = run.signal(signal.SIGINT)
    code = run.finish()
    out = run.output
    assert code == 130, out[-3000:]
    assert time.monotonic() - second < 10
    assert_no_traceback(out)
    assert "Ctrl-C again" in one_line(out, "stopped:")


def test_sigterm_through_run_train_sh_saves_and_exits_0(tmp_path, cache_dir):
    run = Run(["./run_train.sh", *tiny(tmp_path, cache_dir)], ngpu=2)
    run.wait_for("step      3")
    run.signal(signal.SIGTERM)
    code = run.finish()
    out = run.output
    assert code == 0, out[-3000:]
    assert_no_traceback(out)
    one_line(out, "launcher: stopped by SIGTERM: every rank stopped cleanly")
    assert "layout: 2 ranks = dp_shard 2 (FSDP)" in out, out[-3000:]
    assert [p.name for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith("step-")], out[-3000:]


def test_config_typo_through_the_launcher_fails_fast_before_any_rank(tmp_path, cache_dir):
    start = time.monotonic()
    run = Run(["./run_train.sh", *tiny(tmp_path, cache_dir), "--training.stepz", "3"], ngpu=2)
    code = run.finish()
    seconds, out = time.monotonic() - start, run.output
    assert code == 1, out
    assert "did you mean 'training.steps'" in one_line(out, "error:")
    assert "[rank" not in out and "launcher: rank" not in out, out  # no rank was started
    assert seconds < 3.0, f"{seconds:.2f} s"


def test_ctrl_c_through_run_train_sh_saves_and_exits_130(tmp_path, cache_dir):
    run = Run(["./run_train.sh", *tiny(tmp_path, cache_dir)], ngpu=2)
    run.wait_for("step      3")
    run.signal(signal.SIGINT)
    code = run.finish()
    out = run.output
    assert code == 130, out[-3000:]
    assert_no_traceback(out)
    one_line(out, "launcher: stopped by Ctrl-C")
    step = int(one_line(out, "stopped: Ctrl-C").split("after step ")[1].split(";")[0])
    assert (tmp_path / "checkpoint" / f"step-{step}" / ".metadata").is_file()


def _children(pid: int) -> list[int]:
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_launcher_takes_its_ranks_and_the_restart_resumes(tmp_path, cache_dir):
    args = tiny(tmp_path, cache_dir) + ["--checkpoint.interval", "2"]
    run = Run(["./run_train.sh", *args], ngpu=2)
    run.wait_for("saved checkpoint")
    ranks = _children(run.proc.pid)
    assert len(ranks) == 2, ranks
    os.killpg(run.proc.pid, signal.SIGKILL)  # the launcher's group: the ranks each have a session of their own
    run.proc.wait()
    killed = time.monotonic()
    while any(map(_running, ranks)) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert not any(map(_running, ranks)), f"ranks {ranks} outlived their launcher"
    args[args.index("--training.steps") + 1] = "6"
    restart = Run(["./run_train.sh", *args], ngpu=2)
    code = restart.finish(timeout=300)
    out = restart.output
    assert code == 0, out[-3000:]
    assert "taking over" in out and "loading checkpoint" in out, out[-3000:]
