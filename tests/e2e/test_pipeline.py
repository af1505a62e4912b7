"""Pipeline parallelism: every schedule at pp=2 trains to the single-process losses.

The multi-process cases launch torchrun (gloo, CPU); each compares every step's loss with one
single-process run of the same tiny model on the same global batches. The default set keeps
one single-stage, one looped multi-stage and one V-shaped schedule plus the error checks;
``-m slow`` runs every other schedule and the compositions with FSDP and TP.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import REPO, assert_losses_match, read_losses, tiny_overrides, torchrun
from torchtitan.models.llama.model import Transformer, TransformerModelArgs
from torchtitan.parallelisms import pipeline as ppl

STEPS = 4


def _args(dump: Path, cache: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(dump, cache, STEPS), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> dict[int, float]:
    """Single-process losses of the 4-layer tiny model (global batch 8, no accumulation)."""
    from torchtitan.components.tokenizer import build_tokenizer

    # Tokenizer first: a run that trains it on the fly sees other batches than one loading it.
    build_tokenizer("", str(cache_dir))
    dump = tmp_path_factory.mktemp("pp_ref")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *_args(dump, cache_dir)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_losses(dump)


def _run_pp(tmp_path: Path, cache: Path, *extra: str, nproc: int = 2) -> dict[int, float]:
    torchrun(nproc, _args(tmp_path, cache, "--parallelism.pp", "2", *extra))
    return read_losses(tmp_path)


def _check(name: str, got: dict[int, float], reference: dict[int, float]) -> None:
    worst = assert_losses_match(got, reference, rtol=1e-5)
    print(f"\n{name}: worst relative loss difference {worst:.2e}")  # shown with pytest -s


# ---- every schedule matches the single process -------------------------------------------

_FAST = ["1F1B", "Interleaved1F1B", "ZBVZeroBubble"]
_SLOW = ["GPipe", "LoopedBFS", "InterleavedZeroBubble", "DualPipeV"]


@pytest.mark.parametrize(
    "schedule", _FAST + [pytest.param(s, marks=pytest.mark.slow) for s in _SLOW]
)
def test_schedule_matches_single_process(schedule, tmp_path, cache_dir, reference):
    if schedule not in ppl.available_schedules():
        pytest.skip(f"torch {torch.__version__} has no {schedule}")
    got = _run_pp(tmp_path, cache_dir, "--parallelism.pp_schedule", schedule)
    _check(schedule, got, reference)


def test_gradient_accumulation_with_pp(tmp_path, cache_dir, reference):
    """local batch 4 of the rank's 8 rows: the schedule runs twice per optimizer step."""
    got = _run_pp(tmp_path, cache_dir, "--training.local_batch_size", "4", "--parallelism.pp_microbatches", "2")
    _check("1F1B + gradient accumulation", got, reference)


@pytest.mark.slow
def test_explicit_uneven_split_points(tmp_path, cache_dir, reference):
    got = _run_pp(tmp_path, cache_dir, "--parallelism.pp_split_points", "layers.1",
                  "--parallelism.pp_microbatches", "4")
    _check("1F1B split at layers.1", got, reference)


@pytest.mark.slow
def test_csv_schedule_file(tmp_path, cache_dir, reference):
    """A hand-written looped breadth-first schedule: 4 stages on 2 ranks, 2 microbatches."""
    csv_path = tmp_path / "looped_bfs.csv"
    csv_path.write_text(
        "0F0,0F1,2F0,2F1,2B0,2B1,0B0,0B1\n"
        "1F0,1F1,3F0,3F1,3B0,3B1,1B0,1B1\n"
    )
    got = _run_pp(tmp_path / "run", cache_dir, "--parallelism.pp_schedule", str(csv_path))
    _check("CSV schedule", got, reference)


@pytest.mark.slow
def test_pp_checkpoint_resumes_on_one_process(tmp_path, cache_dir, reference):
    """Stage parts keep full-model FQNs: a pp=2 checkpoint resumes on a single process."""
    dump = tmp_path / "run"
    torchrun(2, [*tiny_overrides(dump, cache_dir, STEPS), "--parallelism.pp", "2",
                 "--parallelism.pp_schedule", "Interleaved1F1B",
                 "--checkpoint.enable", "--checkpoint.interval", "2"])
    # Drop the later checkpoints so the resume starts from step 2, then finish on one process.
    for step in range(3, STEPS + 1):
        subprocess.run(["rm", "-rf", str(dump / "checkpoint" / f"step-{step}")], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *tiny_overrides(dump, cache_dir, STEPS),
                           "--checkpoint.enable", "--checkpoint.interval", "2"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = (dump / "metrics.jsonl").read_text().splitlines()
    assert len(records) == STEPS + (STEPS - 2), "the single-process run did not resume from step 2"
    _check("pp=2 checkpoint -> 1 process", read_losses(dump), reference)  # resumed steps overwrite 3, 4


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pp_with_fsdp_4_ranks(schedule, tmp_path, cache_dir, reference):
    got = _run_pp(tmp_path, cache_dir, "--parallelism.dp_shard", "2", "--parallelism.pp_schedule", schedule, nproc=4)
    _check(f"{schedule} x FSDP 2", got, reference)


@pytest.mark.slow
def test_pp_with_tp_4_ranks(tmp_path, cache_dir, reference):
    got = _run_pp(tmp_path, cache_dir, "--parallelism.tp", "2", "--parallelism.pp_schedule",
                  "Interleaved1F1B", nproc=4)
    _check("Interleaved1F1B x TP 2", got, reference)


# ---- errors --------------------------------------------------------------------------------


def test_bad_split_point_is_a_clear_error_end_to_end(tmp_path, cache_dir):
    proc = torchrun(2, _args(tmp_path, cache_dir, "--parallelism.pp", "2",
                             "--parallelism.pp_split_points", "layers.9"), check=False)
    assert proc.returncode != 0
    assert "'layers.9' is not a module where a stage can begin" in proc.stderr


def test_split_point_errors():
    names = [str(i) for i in range(4)]
    with pytest.raises(ValueError, match="'blocks.2' is not a module"):
        ppl.stage_boundaries(names, 2, ["blocks.2"])
    with pytest.raises(ValueError, match="'layers.0' is not a module"):
        ppl.stage_boundaries(names, 2, ["layers.0"])
    with pytest.raises(ValueError, match="strictly increasing"):
        ppl.stage_boundaries(names, 3, ["layers.2", "layers.1"])
    with pytest.raises(ValueError, match="has 2 names but schedule 1F1B with pp=2 has 2 stages, so it needs 1"):
        ppl.num_stages_of(ppl.resolve_schedule("1F1B"), 2, ["layers.1", "layers.2"], 0)
    with pytest.raises(ValueError, match="multiple of 2 stages"):
        ppl.num_stages_of(ppl.resolve_schedule("Interleaved1F1B"), 2, ["layers.1", "layers.2"], 0)
    with pytest.raises(ValueError, match="fewer than the 4 pipeline stages"):
        ppl.stage_boundaries(names[:3], 4, [])
    assert ppl.stage_boundaries(names, 2, ["layers.1"]) == [0, 1]
    assert ppl.stage_boundaries([str(i) for i in range(5)], 2, []) == [0, 3]


def test_microbatches_must_divide_the_local_batch():
    plan = ppl.resolve_schedule("1F1B")
    with pytest.raises(ValueError, match="pp_microbatches=3 must divide the local batch of 8 rows"):
        ppl.resolve_microbatches(3, plan, 2, 2, 0, 8)
    assert ppl.resolve_microbatches(0, plan, 2, 2, 0, 8) == 2  # 0 = pp degree
    # Multi-stage schedules default to one microbatch per stage.
    assert ppl.resolve_microbatches(0, ppl.resolve_schedule("ZBVZeroBubble"), 2, 4, 0, 8) == 4


def test_unknown_schedule_lists_the_available_ones():
    with pytest.raises(ValueError) as err:
        ppl.resolve_schedule("Bubbly1F1B")
    for name in ppl.available_schedules():
        assert name in str(err.value)
    assert ppl.resolve_schedule("interleaved1f1b").name == "Interleaved1F1B"  # case-insensitive


# ---- stage layout --------------------------------------------------------------------------


def test_stage_ids_looped_and_v_shaped():
    assert ppl.stage_ids_this_rank(0, 2, 4, "loop") == (0, 2)
    assert ppl.stage_ids_this_rank(1, 2, 4, "loop") == (1, 3)
    assert ppl.stage_ids_this_rank(0, 2, 4, "v") == (0, 3)
    assert ppl.stage_ids_this_rank(1, 2, 4, "v") == (1, 2)
    assert ppl.stage_ids_this_rank(1, 2, 2, "single") == (1,)


def test_stage_parts_keep_full_model_names():
    args = TransformerModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=64, max_seq_len=16)
    with torch.device("meta"):
        full = Transformer(args)
    names = list(full.layers.keys())
    starts = ppl.stage_boundaries(names, 3, []) + [len(names)]
    keys = []
    for sid in range(3):
        part = ppl.build_stage_model(full, names[starts[sid]:starts[sid + 1]], sid == 0, sid == 2)
        keys += list(part.state_dict().keys())
    assert sorted(keys) == sorted(full.state_dict().keys())  # disjoint, complete, same FQNs
