"""Checkpointing: async saves equal sync ones, retention, weights-only export, seed checkpoints,
crash safety of async saves, refusal of corrupted or mismatched checkpoints, partial loads.

End-to-end tests run train.py in a child process (tests/helpers/train_runner.py); the load-path tests
build the model and the CheckpointManager in this process (no process group: DCP loads locally).
"""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers.runs import torchrun
from tests.helpers.runs import metrics, run, tiny_args
from torchtitan.components.checkpoint import CheckpointManager, ModelState, OptimizerState
from torchtitan.config.job_config import Checkpoint
from torchtitan.models.llama import Transformer, build_model_args
from torchtitan.trainer import TrainState

STEPS, INTERVAL = 12, 4


def ckpt_flags(mode: str = "disabled", *extra: str) -> list[str]:
    return ["--checkpoint.enable", "--checkpoint.interval", str(INTERVAL), "--checkpoint.async_mode", mode, *extra]


def complete(dump: Path) -> list[str]:
    return sorted((p.name for p in (dump / "checkpoint").iterdir()), key=lambda n: (len(n), n))


def n_records(dump: Path) -> int:
    return len((dump / "metrics.jsonl").read_text().splitlines())


def records_after(dump: Path, n: int) -> dict[int, tuple]:
    import json

    lines = (dump / "metrics.jsonl").read_text().splitlines()[n:]
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in map(json.loads, lines)}


def flat_checkpoint(ckpt: Path, tmp: Path) -> dict:
    """Every value of a DCP checkpoint as {dotted key: value} (via plain torch.save)."""
    out = tmp / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)

    def flat(d, prefix=""):
        items = {}
        for k, v in d.items():
            items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return items

    return flat(torch.load(out, weights_only=True))


def assert_same_checkpoint(a: Path, b: Path, tmp: Path) -> None:
    sa, sb = flat_checkpoint(a, tmp), flat_checkpoint(b, tmp)
    assert sa.keys() == sb.keys()
    for k in sa:
        same = torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
        assert same, f"{a} and {b} differ at {k}"


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory, cache_dir):
    """Sync saves every 4 steps over 12 steps, then a resume from step 4: the reference for all."""
    dump = tmp_path_factory.mktemp("sync")
    args = tiny_args(dump, cache_dir, STEPS, *ckpt_flags())
    run(args)
    losses = metrics(dump)
    n = n_records(dump)
    run(args + ["--checkpoint.load_step", "4"])
    return dump, losses, records_after(dump, n)


# ---- async saves ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_save_then_resume_equals_sync(tmp_path, cache_dir, sync_run, mode):
    ref_dump, ref_losses, ref_resumed = sync_run
    args = tiny_args(tmp_path, cache_dir, STEPS, *ckpt_flags(mode))
    run(args)
    assert complete(tmp_path) == ["step-4", "step-8", "step-12"]
    for step in (4, 8, 12):  # training went on while they were written: still bitwise the sync state
        assert_same_checkpoint(tmp_path / "checkpoint" / f"step-{step}", ref_dump / "checkpoint" / f"step-{step}",
                               tmp_path)
    assert {s: r["loss"] for s, r in metrics(tmp_path).items()} == {s: r["loss"] for s, r in ref_losses.items()}
    n = n_records(tmp_path)
    run(args + ["--checkpoint.load_step", "4"])
    assert records_after(tmp_path, n) == ref_resumed


@pytest.mark.parametrize("mode", ["async", pytest.param("async_with_pinned_mem", marks=pytest.mark.slow)])
def test_sigkill_during_async_save_keeps_the_previous_checkpoint(tmp_path, cache_dir, sync_run, mode):
    _, ref_losses, _ = sync_run
    args = tiny_args(tmp_path, cache_dir, STEPS, *ckpt_flags(mode))
    proc = run(args, kill_step=8, check=False)
    assert proc.returncode != 0
    folder = tmp_path / "checkpoint"
    assert (folder / "step-4" / ".metadata").is_file()
    assert (folder / "step-8.tmp").is_dir() and not (folder / "step-8.tmp" / ".metadata").exists()
    assert not (folder / "step-8").exists()
    proc = run(args)
    assert "skipping incomplete checkpoint" in proc.stderr
    assert "step-4" in proc.stderr.split("loading checkpoint", 1)[1].splitlines()[0]
    resumed = metrics(tmp_path)
    for step in range(5, STEPS + 1):
        assert resumed[step]["loss"] == ref_losses[step]["loss"], f"step {step}"


def test_keep_latest_k_keeps_exactly_k_complete_checkpoints(tmp_path, cache_dir):
    run(tiny_args(tmp_path, cache_dir, 7, "--checkpoint.enable", "--checkpoint.interval", "1",
                  "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "2"))
    assert complete(tmp_path) == ["step-6", "step-7"]


def test_seconds_interval_is_decided_by_the_clock():
    mgr = CheckpointManager(Checkpoint(enable=True, interval_type="seconds", interval=30), "/nonexistent", {})
    assert not mgr.should_save(1, 100)
    assert mgr.should_save(100, 100)  # the last step always saves
    mgr._last_save_time -= 31
    assert mgr.should_save(2, 100)


# ---- weights-only export and seed checkpoints ----------------------------------------------------
def test_weights_only_final_save_loads_in_plain_pytorch(tmp_path, cache_dir):
    run(tiny_args(tmp_path, cache_dir, 4, "--checkpoint.enable", "--checkpoint.interval", "2",
                  "--checkpoint.model_weights_only", "--checkpoint.export_dtype", "bfloat16"))
    dcp_to_torch_save(tmp_path / "checkpoint" / "step-4", tmp_path / "weights.pt")
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    full = flat_checkpoint(tmp_path / "checkpoint" / "step-2", tmp_path)  # mid-run saves stay complete
    model_keys = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    assert weights.keys() == model_keys.keys() and any(k.startswith("optimizer.") for k in full)
    assert all(v.dtype == torch.bfloat16 and v.shape == model_keys[k].shape for k, v in weights.items())
    args = build_model_args("debugmodel_tiny", vocab_size=weights["output.weight"].shape[0], max_seq_len=64)
    Transformer(args).load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)


def test_seed_checkpoint_gives_two_layouts_the_same_start(tmp_path, cache_dir, sync_run):
    _, ref_losses, _ = sync_run
    seed = tmp_path / "seed"
    run(tiny_args(seed, cache_dir, 3, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                  "--training.seed", "7"))
    assert complete(seed) == ["step-0"]
    seed_ckpt = seed / "checkpoint" / "step-0"
    # One process finds the seed in its own checkpoint folder; FSDP on 2 ranks is pointed at it.
    one = tmp_path / "one"
    (one / "checkpoint").mkdir(parents=True)
    (one / "checkpoint" / "step-0").symlink_to(seed_ckpt)
    proc = run(tiny_args(one, cache_dir, 1, "--checkpoint.enable"))
    assert "model weights only" in proc.stderr
    torchrun(2, tiny_args(tmp_path / "fsdp2", cache_dir, 1, "--checkpoint.initial_load_path", str(seed_ckpt)))
    first_one, first_fsdp = metrics(one)[1]["loss"], metrics(tmp_path / "fsdp2")[1]["loss"]
    assert abs(first_one - first_fsdp) <= 1e-5 * first_one, (first_one, first_fsdp)
    assert first_one != ref_losses[1]["loss"]  # the seed's weights, not those of training.seed


@pytest.mark.slow
def test_seed_checkpoint_on_several_processes_is_a_clear_error(tmp_path, cache_dir):
    proc = torchrun(2, tiny_args(tmp_path, cache_dir, 1, "--checkpoint.create_seed_checkpoint"), check=False)
    assert proc.returncode != 0 and "runs on 1 process (world size is 2)" in proc.stderr


# ---- refusing corrupted or mismatched checkpoints ------------------------------------------------
def _tiny_model(ckpt: Path, **overrides) -> Transformer:
    vocab = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata["model.tok_embeddings.weight"].size[0]
    return Transformer(build_model_args("debugmodel_tiny", vocab_size=vocab, max_seq_len=64, **overrides))


def _manager(dump: Path, states: dict, **cfg) -> CheckpointManager:
    return CheckpointManager(Checkpoint(enable=True, **cfg), str(dump), states)


@pytest.fixture
def own_copy(tmp_path, sync_run) -> Path:
    """A run folder holding a copy of the sync run's checkpoints (step-4, step-8, step-12)."""
    shutil.copytree(sync_run[0] / "checkpoint", tmp_path / "checkpoint")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return tmp_path


def test_step_folder_without_metadata_is_refused(own_copy):
    (own_copy / "checkpoint" / "step-8" / ".metadata").unlink()
    model = _tiny_model(own_copy / "checkpoint" / "step-4")
    with pytest.raises(ValueError) as err:
        _manager(own_copy, {"model": ModelState(model)}, load_step=8).load()
    assert str(own_copy / "checkpoint" / "step-8") in str(err.value) and "has no .metadata" in str(err.value)


@pytest.mark.parametrize("overrides,expected", [
    (dict(dim=128), "model.tok_embeddings.weight has shape [4096, 64] in the checkpoint but [4096, 128] in the model"),
    (dict(n_layers=1), "model.layers.1.attention_norm.weight [64] is in the checkpoint but not in the model"),
    (dict(n_layers=4), "model.layers.2.attention_norm.weight [64] is in the model but not in the checkpoint"),
])
def test_model_shape_mismatch_names_the_key_and_both_shapes(own_copy, overrides, expected):
    model = _tiny_model(own_copy / "checkpoint" / "step-4", **overrides)
    with pytest.raises(ValueError) as err:
        _manager(own_copy, {"model": ModelState(model)}).load()
    assert f"checkpoint {own_copy / 'checkpoint' / 'step-12'} does not match the model" in str(err.value)
    assert expected in str(err.value)


def test_model_shape_mismatch_end_to_end(tmp_path, cache_dir, sync_run):
    shutil.copytree(sync_run[0] / "checkpoint", tmp_path / "checkpoint")
    proc = run(tiny_args(tmp_path, cache_dir, STEPS, "--checkpoint.enable", "--model.dim", "128"), check=False)
    assert proc.returncode != 0
    assert "does not match the model: model.tok_embeddings.weight has shape [4096, 64]" in proc.stderr


def test_truncated_data_file_is_refused_with_the_path(own_copy):
    ckpt = own_copy / "checkpoint" / "step-12"
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    model = _tiny_model(ckpt)
    with pytest.raises(ValueError, match=f"could not load checkpoint {ckpt}"):
        _manager(own_copy, {"model": ModelState(model)}).load()


# ---- partial loads -------------------------------------------------------------------------------
def _states(model: Transformer) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "train_state": TrainState()}


def _assert_model_equals(model: Transformer, ckpt: Path, tmp: Path) -> None:
    saved = flat_checkpoint(ckpt, tmp)
    for k, v in model.state_dict().items():
        if k != "freqs_cis":
            assert torch.equal(v, saved[f"model.{k}"]), k


def test_exclude_from_loading_skips_those_states(own_copy):
    ckpt = own_copy / "checkpoint" / "step-12"
    states = _states(_tiny_model(ckpt))
    assert _manager(own_copy, states).load() == 12
    assert states["optimizer"].optimizer.state and states["train_state"].step == 12
    states = _states(_tiny_model(ckpt))
    assert _manager(own_copy, states, exclude_from_loading=["optimizer", "train_state"]).load() == 0
    assert not states["optimizer"].optimizer.state and states["train_state"].step == 0
    _assert_model_equals(states["model"].parts[0], ckpt, own_copy)
    with pytest.raises(ValueError, match="unknown state keys \\['optimizr'\\]"):
        _manager(own_copy, states, exclude_from_loading=["optimizr"])


def test_initial_load_path_starts_from_weights_only_while_the_run_has_no_checkpoint(tmp_path, own_copy):
    source = own_copy / "checkpoint" / "step-12"
    run_dir = tmp_path / "new_run"
    states = _states(_tiny_model(source))
    assert _manager(run_dir, states, initial_load_path=str(source)).load() == 0
    _assert_model_equals(states["model"].parts[0], source, tmp_path)
    assert not states["optimizer"].optimizer.state and states["train_state"].step == 0
    # Once the run has its own checkpoint, that one wins.
    (run_dir / "checkpoint").mkdir(parents=True)
    shutil.copytree(own_copy / "checkpoint" / "step-4", run_dir / "checkpoint" / "step-4")
    states = _states(_tiny_model(source))
    assert _manager(run_dir, states, initial_load_path=str(source)).load() == 4
    _assert_model_equals(states["model"].parts[0], run_dir / "checkpoint" / "step-4", tmp_path)
    (source / ".metadata").unlink()
    with pytest.raises(ValueError, match=f"initial_load_path={source}: no .metadata there"):
        _manager(tmp_path / "other_run", _states(_tiny_model(run_dir / "checkpoint" / "step-4")),
                 initial_load_path=str(source)).load()


def test_async_mode_typo_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint.async_mode must be one of disabled, async"):
        CheckpointManager(Checkpoint(async_mode="asynch"), "/nonexistent", {})
