"""Failures under ./run_train.sh (torchtitan.tools.launch): one line for a user error, the root cause
for a crash; and every config value and size checked at start.

- 17 bad inputs through ./run_train.sh (two of them with NGPU=2): each exits non-zero with exactly one
  ``error:`` line naming the key or path, and no ``Traceback`` / ``ChildFailedError`` text; all but
  three (``NEEDS_A_RANK``) are found by the launcher before any rank starts;
- crashes of a rank whose output is filtered out (LOG_RANK=0, the failing rank is 1): an exception
  shows its traceback from the rank's error file, a SIGSEGV the signal and the Python stack at the
  fault, a user error its own line, once; the launcher exits with the rank's code;
- how the launcher picks the root cause among several failed ranks (real torchelastic records);
- the config checks that now run whether or not their feature is on, and the memory check's sizes.
"""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from torchtitan.config.manager import ConfigManager
from torchtitan.models.registry import get_spec
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools import launch
from torchtitan.tools.memory_check import batch_need, check_memory_fits, model_needs

REPO = Path(__file__).resolve().parents[2]


def tiny(dump: Path, cache: Path) -> list[str]:
    """Overrides for a run of the tiny model that would start in seconds (the config file comes from
    CONFIG_FILE, as run_train.sh passes it)."""
    return ["--job.dump_folder", str(dump), "--tokenizer.cache_dir", str(cache), "--model.flavor", "debugmodel_tiny",
            "--training.steps", "2", "--training.seq_len", "32", "--training.global_batch_size", "2",
            "--comm.init_timeout_seconds", "60"]


# id -> (NGPU, extra args, fragments of the error line); "{tmp}" is the case's folder; files made by _files().
BAD_INPUTS = {
    "malformed_toml": (1, [], ["bad.toml", "not valid TOML", "line 3"]),
    "unknown_section_in_toml": (1, [], ["[trainer]", "unknown section", "training"]),
    "unknown_key": (1, ["--training.stepz", "3"], ["training.stepz", "did you mean 'training.steps'"]),
    "negative_lr": (1, ["--optimizer.lr", "-0.001"], ["optimizer.lr", ">= 0"]),
    "zero_steps": (1, ["--training.steps", "0"], ["training.steps", "positive"]),
    "bad_choice": (1, ["--checkpoint.async_mode", "fast"], ["checkpoint.async_mode", "'async'"]),
    "wrong_flavor": (1, ["--model.flavor", "debugmodel_huge"], ["model.flavor", "'debugmodel_huge'", "debugmodel_tiny"]),
    "dataset_without_text_field": (1, ["--data.datasets", "{tmp}/notext.jsonl"], ["notext.jsonl", "data.text_field"]),
    "missing_dataset": (1, ["--data.datasets", "{tmp}/corpus"], ["data.datasets", "corpus", "not a known name"]),
    "missing_tokenizer": (1, ["--tokenizer.path", "{tmp}/tok.model"],
                          ["tokenizer.path", "tok.model", "does not exist"]),
    "pp_schedule_typo_with_pp_1": (1, ["--parallelism.pp_schedule", "Zigzag"],
                                   ["parallelism.pp_schedule", "'Zigzag'", "1F1B", "even when parallelism.pp = 1"]),
    "compile_backend_typo_compile_off": (1, ["--compile.backend", "inductr"], ["compile.backend", "'inductr'"]),
    "missing_initial_load_path": (1, ["--checkpoint.initial_load_path", "{tmp}/ckpt/step-5"],
                                  ["checkpoint.initial_load_path", "step-5"]),
    "unwritable_dump_folder": (1, ["--job.dump_folder", "{tmp}/afile/sub"], ["afile/sub", "not a writable folder"]),
    "huge_seq_len": (1, ["--training.seq_len", "1000000000000"], ["training.seq_len", "cannot fit", "TiB"]),
    "tp_not_fitting_2_ranks": (2, ["--parallelism.tp", "3"], ["tp=3", "world_size=2"]),
    "negative_lr_2_ranks": (2, ["--optimizer.lr", "-0.001"], ["error: ValueError", "optimizer.lr"]),
}
# Found by the launcher before any rank starts (the config, its paths, the degrees against the world
# size); the others need what only a rank does (read the data, size the memory, write the folder).
NEEDS_A_RANK = {"dataset_without_text_field", "unwritable_dump_folder", "huge_seq_len"}
CONFIG_FILES = {"malformed_toml": "bad.toml", "unknown_section_in_toml": "unknown_section.toml"}


def _files(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("[training]\nsteps = 3\n[optimizer\nlr = 1e-3\n")
    (tmp / "unknown_section.toml").write_text("[trainer]\nsteps = 3\n")
    (tmp / "notext.jsonl").write_text('{"content": "a document without the text field"}\n')
    (tmp / "afile").write_text("a file, not a folder")


def _run_train_sh(case: str, tmp: Path, cache: Path) -> subprocess.CompletedProcess:
    ngpu, extra, _ = BAD_INPUTS[case]
    folder = tmp / case
    folder.mkdir()
    _files(folder)
    config = folder / CONFIG_FILES[case] if case in CONFIG_FILES else REPO / "train_configs" / "debug_model.toml"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHTITAN_TRACEBACK", "LOG_RANK")}
    env.update(NGPU=str(ngpu), CONFIG_FILE=str(config), OMP_NUM_THREADS="1")
    args = tiny(folder / "dump", cache) + [a.replace("{tmp}", str(folder)) for a in extra]
    return subprocess.run(["./run_train.sh", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, cache_dir) -> dict[str, subprocess.CompletedProcess]:
    """Every bad input at once (3 at a time: each waits mostly on imports)."""
    from torchtitan.components.tokenizer import build_tokenizer

    build_tokenizer("", str(cache_dir))  # trained once here, not by three runs at the same time
    tmp = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case: pool.submit(_run_train_sh, case, tmp, cache_dir) for case in BAD_INPUTS}
        return {case: f.result() for case, f in futures.items()}


def test_at_least_15_bad_inputs_two_of_them_on_2_ranks():
    assert len(BAD_INPUTS) >= 15
    assert sum(ngpu == 2 for ngpu, _, _ in BAD_INPUTS.values()) >= 2


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_under_run_train_sh_is_one_line(case, bad_runs):
    proc = bad_runs[case]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit code {proc.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    lines = [x for x in out.splitlines() if "error:" in x]
    assert len(lines) == 1, f"{len(lines)} error: lines\n{out[-3000:]}"
    for fragment in BAD_INPUTS[case][2]:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    if case in NEEDS_A_RANK:
        assert "launcher: rank 0 exited with code 1" in out, out[-3000:]
    else:  # no rank was started: nothing but the launcher's start line and the error
        assert lines[0].startswith("error: ") and "[rank" not in out and "launcher: rank" not in out, out[-3000:]


# ---- crashes: the root cause of a rank whose output nobody sees --------------------------------------
CRASHER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train

mode, rank = sys.argv[1], int(sys.argv[2])
check_dump_folder = train.check_dump_folder

def failing_check(folder):  # runs right after the config is parsed, on every rank
    if int(os.environ["RANK"]) == rank:
        if mode == "raise":
            raise RuntimeError(f"injected bug on rank {{rank}}")
        if mode == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mode == "user":
            raise ValueError(f"injected user error on rank {{rank}}")
    return check_dump_folder(folder)

train.check_dump_folder = failing_check
train.main(sys.argv[3:])
"""


def _launch(script: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torchtitan.tools.launch", "--standalone", "--nproc_per_node", str(nproc),
           "--local-ranks-filter", "0", "--role", "rank", str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCHTITAN_TRACEBACK", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def crashes(tmp_path_factory, cache_dir) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("crashes")
    script = tmp / "crasher.py"
    script.write_text(CRASHER.format(repo=str(REPO)))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {mode: pool.submit(_launch, script, mode, "1", *tiny(tmp / mode, cache_dir))
                   for mode in ("raise", "segv", "user")}
        return {mode: f.result() for mode, f in futures.items()}


def test_exception_on_a_hidden_rank_shows_its_traceback(crashes):
    proc = crashes["raise"]
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "launcher: rank 1 (local rank 1" in err and "its traceback:" in err, err[-3000:]
    assert "Traceback (most recent call last):" in err and "failing_check" in err, err[-3000:]
    assert "RuntimeError: injected bug on rank 1" in err
    assert "ChildFailedError" not in err and "torch/distributed/run.py" not in err, err[-3000:]


def test_segfault_on_a_hidden_rank_names_the_signal_and_the_stack(crashes):
    proc = crashes["segv"]
    err = proc.stderr
    assert proc.returncode == 128 + signal.SIGSEGV, err[-3000:]
    assert "launcher: rank 1 (local rank 1" in err and "killed by SIGSEGV" in err, err[-3000:]
    assert "Fatal Python error: Segmentation fault" in err and "in failing_check" in err, err[-3000:]
    assert "ChildFailedError" not in err


def test_user_error_on_a_hidden_rank_is_printed_once(crashes):
    proc = crashes["user"]
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    lines = [x for x in err.splitlines() if "error:" in x]
    assert lines == ["[rank1] error: ValueError: injected user error on rank 1 (set TORCHTITAN_TRACEBACK=1 for "
                     "the full traceback)"], err[-3000:]
    assert "launcher: rank 1 exited with code 1" in err and "Traceback" not in err, err[-3000:]


@pytest.mark.slow  # ~15 s: a real training start on two ranks
def test_crash_mid_step_blames_the_rank_that_raised_not_its_peer(tmp_path, cache_dir):
    """Rank 1 raises at step 1; rank 0, inside an FSDP all-gather, then fails with gloo's "Connection
    closed by peer" (its traceback is on the console). The report names rank 1's exception."""
    args = tiny(tmp_path, cache_dir) + ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml")]
    proc = _launch(REPO / "tests" / "helpers" / "train_runner.py", "--fail-at-step", "1", "1", "--", *args)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    summary = [x for x in err.splitlines() if x.startswith("launcher: rank")]
    assert summary and summary[0].startswith("launcher: rank 1 (local rank 1"), err[-3000:]
    assert "RuntimeError: injected failure on rank 1 at step 1" in err
    assert "ChildFailedError" not in err


# ---- the root cause among several failures (records as torchelastic builds them) ----------------------
def _failure(tmp: Path, local_rank: int, exitcode: int, report: str = "") -> ProcessFailure:
    """A failure record as the launcher gets it, after the rank wrote its ``report`` (or none)."""
    path = tmp / f"error-{len(list(tmp.iterdir()))}.json"
    if report == "user":
        os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
        try:
            launch.record_user_error(f"[rank{local_rank}] error: ValueError: bad value")
        finally:
            del os.environ["TORCHELASTIC_ERROR_FILE"]
    elif report == "crash":
        os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
        try:
            raise RuntimeError(f"bug on rank {local_rank}")
        except RuntimeError as e:
            launch.record_crash(e)
        finally:
            del os.environ["TORCHELASTIC_ERROR_FILE"]
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(path))


def test_root_cause_prefers_user_errors_then_causes_over_consequences(tmp_path):
    sigterm, sigkill, segv = -signal.SIGTERM, -signal.SIGKILL, -signal.SIGSEGV
    # The ranks the launcher stopped never win; an exception that came later than a peer's never does.
    first = _failure(tmp_path, 1, 1, "crash")
    time.sleep(0.05)
    later = _failure(tmp_path, 0, 1, "crash")
    assert launch.root_cause({0: later, 1: first, 2: _failure(tmp_path, 2, sigterm)}, None) == 1
    # A SIGKILL (OOM killer) makes its peer raise "connection closed": the SIGKILL is the cause.
    assert launch.root_cause({0: _failure(tmp_path, 0, 1, "crash"), 1: _failure(tmp_path, 1, sigkill)}, None) == 1
    assert launch.root_cause({0: _failure(tmp_path, 0, sigkill), 1: _failure(tmp_path, 1, segv)}, None) == 1
    # A user error wins over anything, preferably one already on the console.
    users = {0: _failure(tmp_path, 0, 1, "user"), 1: _failure(tmp_path, 1, 1, "user"), 2: _failure(tmp_path, 2, segv)}
    assert launch.root_cause(users, {1}) == 1 and launch.root_cause(users, None) == 0
    # Only stopped ranks (an outside SIGTERM): the first of them.
    assert launch.root_cause({3: _failure(tmp_path, 3, sigterm), 2: _failure(tmp_path, 2, sigterm)}, None) == 2


def test_report_exit_codes_and_lines(tmp_path, capsys):
    failures = {0: _failure(tmp_path, 0, 1, "user"), 1: _failure(tmp_path, 1, -signal.SIGTERM)}
    assert launch.report(failures, {0}, str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err == "launcher: rank 0 exited with code 1\nlauncher: also failed: rank 1 (stopped: SIGTERM)\n"
    assert launch.report({4: _failure(tmp_path, 0, -signal.SIGKILL)}, None, str(tmp_path)) == 128 + signal.SIGKILL
    assert "rank 4 (local rank 0, pid 1000) was killed by SIGKILL" in capsys.readouterr().err


# ---- every config value checked at start, whether or not its feature is on -----------------------------
@pytest.mark.parametrize("args,key", [
    (["--parallelism.pp_schedule", "Zigzag"], "parallelism.pp_schedule"),  # pp = 1
    (["--parallelism.pp_schedule", "nowhere/schedule.csv"], "parallelism.pp_schedule"),
    # activation_checkpoint.mode is "none"
    (["--activation_checkpoint.selective_ac_option", "every2"], "activation_checkpoint.selective_ac_option"),
    (["--compile.backend", "inductr"], "compile.backend"),  # compile off
    (["--training.mixed_precision_reduce", "fp32"], "training.mixed_precision_reduce"),
    (["--checkpoint.exclude_from_loading", "model,optimiser"], "checkpoint.exclude_from_loading"),
    (["--validation.freq", "0"], "validation.freq"),
    (["--lr_scheduler.decay_ratio", "1.5"], "lr_scheduler.decay_ratio"),  # decay_type linear
    (["--optimizer.beta2", "1"], "optimizer.beta2"),
    (["--optimizer.lr", "nan"], "optimizer.lr"),
    (["--training.gc_freq", "0"], "training.gc_freq"),
    (["--profiling.profile_freq", "0"], "profiling.profile_freq"),  # profiling off
    (["--data.num_workers", "-1"], "data.num_workers"),
    (["--data.text_field", ""], "data.text_field"),
    (["--data.datasets", "a,b", "--data.weights", "1,-1"], "data.weights"),
])
def test_config_value_checked_whatever_the_feature(args, key):
    with pytest.raises(ValueError, match=rf"^{key} .*\(from the command line\)"):
        ConfigManager().parse_args(args)


@pytest.mark.parametrize("args,key", [
    (["--checkpoint.initial_load_path", "/nonexistent/step-10"], "checkpoint.initial_load_path"),  # ckpt off
    (["--validation.datasets", "stdlib,/nonexistent/val.jsonl"], "validation.datasets"),  # validation off
    (["--data.datasets", "/nonexistent/corpus"], "data.datasets"),
    (["--tokenizer.path", "/nonexistent/tokenizer.model"], "tokenizer.path"),
])
def test_paths_checked_at_the_start_of_a_run_not_at_parse(args, key):
    manager = ConfigManager()
    cfg = manager.parse_args(args)  # a config names paths of the machine that will run it
    with pytest.raises(ValueError, match=rf"^{key} .*\(from the command line\)"):
        manager.check_paths(cfg)


def test_initial_load_path_is_not_needed_once_the_run_has_its_own_checkpoint(tmp_path):
    (tmp_path / "checkpoint" / "step-4").mkdir(parents=True)
    (tmp_path / "checkpoint" / "step-4" / ".metadata").write_bytes(b"")
    args = ["--job.dump_folder", str(tmp_path), "--checkpoint.initial_load_path", str(tmp_path / "purged")]
    manager = ConfigManager()
    manager.check_paths(manager.parse_args(args + ["--checkpoint.enable"]))  # resumes from step-4: fine
    with pytest.raises(ValueError, match="checkpoint.initial_load_path is not a folder"):
        manager.check_paths(manager.parse_args(args))  # checkpointing off: it would be read


def test_checked_values_accept_what_the_features_accept(tmp_path):
    csv = tmp_path / "schedule.csv"
    csv.write_text("0F0,0B0\n")
    cfg = ConfigManager().parse_args(["--parallelism.pp_schedule", "interleaved1f1b", "--compile.backend", "aot_eager",
                                      "--activation_checkpoint.selective_ac_option", "op",
                                      "--checkpoint.exclude_from_loading", "dataloader,train_state",
                                      "--training.max_seconds", "inf"])
    assert cfg.parallelism.pp_schedule == "interleaved1f1b" and cfg.checkpoint.exclude_from_loading == [
        "dataloader", "train_state"]
    assert ConfigManager().parse_args(["--parallelism.pp_schedule", str(csv)]).parallelism.pp_schedule == str(csv)


# ---- sizes checked before allocating -----------------------------------------------------------------
def _cfg(*args: str):
    return ConfigManager().parse_args(["--model.flavor", "debugmodel_tiny", *args])


def test_memory_needs_are_exact_for_buffers_and_batch():
    """The RoPE table is seq_len x head_dim/2 x (cos, sin) fp32 (debugmodel_tiny: dim 64, 4 heads); the
    batch is local x accumulation rows of seq_len + 1 int64 tokens and positions."""
    seq_len = 1000
    cfg = _cfg("--training.seq_len", str(seq_len))
    dims = ParallelDims(1, -1, 1, 1, 1, world_size=1)
    needs = {name: n.nbytes for name, n in model_needs(cfg, dims, local_bs=2, vocab_size=4096).items()}
    assert needs["buffers"] == seq_len * (64 // 4 // 2) * 2 * 4
    assert batch_need(cfg, local_bs=2, accum_steps=3).nbytes == 6 * (seq_len + 1) * 8 * 2
    spec = get_spec("llama3")
    args = spec.build_args("debugmodel_tiny", vocab_size=4096, max_seq_len=seq_len, n_layers=0, dim=0, n_kv_heads=0,
                           attention_backend="auto")
    with torch.device("meta"):
        nparams = sum(p.numel() for p in spec.model_cls(args).parameters())
    assert needs["state"] == 12 * nparams and needs["grads"] == 4 * nparams  # fp32 weights + 2 AdamW moments
    # Each of the 2 blocks' bf16 input and the bf16 logits, for the local batch of 2 rows.
    assert needs["activations"] == 2 * seq_len * (64 * 2 * 2 + 4096 * 2)


def test_memory_check_fails_naming_size_and_limit(monkeypatch):
    dims = ParallelDims(1, -1, 1, 1, 1, world_size=1)
    check_memory_fits(_cfg("--training.seq_len", "64"), dims, torch.device("cpu"), 2, 1, 4096)  # fits
    monkeypatch.setattr("torchtitan.tools.memory_check.host_memory", lambda: (10 * 2**20, "a test limit"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError) as e:  # 4 processes of ~4 MiB each do not fit in 10 MiB
        check_memory_fits(_cfg("--training.seq_len", "8192"), dims, torch.device("cpu"), 1, 1, 4096)
    message = str(e.value)
    assert "cannot fit in host memory" in message and "10.0 MiB (a test limit)" in message, message
    assert "x 4 processes on this host" in message and "lower training.seq_len" in message, message


def test_a_model_too_big_for_the_host_fails_naming_the_flavor(monkeypatch):
    monkeypatch.setattr("torchtitan.tools.memory_check.host_memory", lambda: (2**40, "a test limit"))
    dims = ParallelDims(1, -1, 1, 1, 1, world_size=1)
    with pytest.raises(ValueError) as e:  # 405B: 12 bytes x 401,784,913,920 parameters = 4.4 TiB > 1 TiB
        check_memory_fits(_cfg("--model.flavor", "405B"), dims, torch.device("cpu"), 1, 1, 4096)
    message = str(e.value)
    assert "weights and AdamW state of 401,784,913,920 parameters over 1 shard(s) 4.4 TiB" in message, message
    assert "1.0 TiB (a test limit)" in message and "use a smaller model.flavor" in message, message


def test_a_sharded_model_needs_less_per_rank():
    cfg = _cfg()
    one = model_needs(cfg, ParallelDims(1, -1, 1, 1, 1, world_size=1), 2, 4096)
    eight = model_needs(cfg, ParallelDims(2, -1, 1, 2, 1, world_size=8), 2, 4096)
    assert eight["state"].nbytes == one["state"].nbytes // 4  # dp_replicate=2 keeps two copies: over 4 ranks
    assert eight["activations"].nbytes == one["activations"].nbytes // 2  # tp=2 splits them
