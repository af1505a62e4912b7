"""One dump folder, one run (components/run_folder.py), read in-process on hand-made folders: which
start is a resume, a restart, a refusal or a replacement; the run id of metrics.jsonl records; what
plot_metrics.py draws from a file two runs wrote; and train.py's default config.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from torchtitan.components.run_folder import RUN_FILE, decide_start, move_aside
from torchtitan.config.manager import ConfigManager, dump_config

REPO = Path(__file__).resolve().parents[2]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(dump: Path, *extra: str):
    return ConfigManager().parse_args(["--job.dump_folder", str(dump), "--model.flavor", "debugmodel_tiny", *extra])


def previous_run(dump: Path, cfg, records: int = 3, run_id: str | None = "20260101-000000-aaaaaa") -> None:
    """A folder as a finished run without checkpoints leaves it."""
    dump.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, dump)
    lines = [{"step": s, **({"run_id": run_id} if run_id else {}), "loss": 9.0 - s} for s in range(1, records + 1)]
    (dump / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if run_id:
        (dump / RUN_FILE).write_text(json.dumps({"run_id": run_id}))


def test_a_fresh_folder_is_a_new_run(tmp_path):
    start = decide_start(config(tmp_path / "new"), resume=None, mismatch=None)
    assert start.kind == "new" and start.run_id
    assert not (tmp_path / "new").exists()  # deciding writes nothing


def test_another_runs_metrics_are_refused_in_one_line_naming_the_fixes(tmp_path):
    previous_run(tmp_path, config(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError) as err:
        decide_start(config(tmp_path, "--optimizer.lr", "0.01"), resume=None, mismatch=None)
    problem, detail = str(err.value).split("\n")  # the problem and the fixes, then the detail
    for fragment in ("holds another run (run_id 20260101-000000-aaaaaa: 3 metrics records) of another config",
                     "rerun it from step 0 with its config", "--job.dump_folder", "--job.overwrite"):
        assert fragment in problem, problem
    assert detail == "its config.toml differs: optimizer.lr is 0.0008 there, 0.01 here"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_same_config_again_is_a_restart_under_a_new_run_id(tmp_path):
    """A run without a checkpoint started again: how it is saved and watched may differ, not what it trains."""
    previous_run(tmp_path, config(tmp_path))
    start = decide_start(config(tmp_path, "--job.description", "again", "--checkpoint.enable",
                                "--metrics.log_freq", "1"), None, None)
    assert start.kind == "restart" and start.run_id != "20260101-000000-aaaaaa"
    with pytest.raises(ValueError, match="checkpoint.initial_load_path is '' there, 'elsewhere' here"):
        decide_start(config(tmp_path, "--checkpoint.initial_load_path", "elsewhere"), None, None)  # other weights
    (tmp_path / "checkpoint" / "step-3").mkdir(parents=True)  # a checkpoint this start does not resume
    (tmp_path / "checkpoint" / "step-3" / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match=r"with checkpoints this start does not resume .* To continue that run, "
                                         "resume it with its config and checkpoint.enable"):
        decide_start(config(tmp_path), None, None)


def test_a_checkpoint_of_another_model_is_refused_even_with_the_same_config(tmp_path):
    previous_run(tmp_path, config(tmp_path))
    mismatch = "checkpoint x does not match the model: y is in the model but not in the checkpoint. It was saved..."
    with pytest.raises(ValueError, match=r"of another model\. To continue .*\ncheckpoint x does not match the "
                                         "model: y is in the model but not in the checkpoint$"):
        decide_start(config(tmp_path), resume=None, mismatch=mismatch)


def test_a_resume_keeps_the_run_id_and_legacy_records_get_a_new_one(tmp_path):
    previous_run(tmp_path / "a", config(tmp_path / "a"))
    start = decide_start(config(tmp_path / "a", "--training.steps", "50"), resume=tmp_path / "a", mismatch=None)
    assert (start.kind, start.run_id) == ("resume", "20260101-000000-aaaaaa")
    previous_run(tmp_path / "b", config(tmp_path / "b"), run_id=None)  # written before run ids
    assert decide_start(config(tmp_path / "b"), resume=tmp_path / "b", mismatch=None).run_id


def test_overwrite_moves_the_previous_run_aside_and_nothing_else(tmp_path):
    previous_run(tmp_path, config(tmp_path))
    (tmp_path / "checkpoint" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoint" / "step-2" / ".metadata").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    cfg = config(tmp_path, "--optimizer.lr", "0.01", "--job.overwrite")
    start = decide_start(cfg, resume=None, mismatch=None)
    assert start.kind == "replace"
    target = move_aside(cfg, start.previous)
    assert target == tmp_path / "replaced-20260101-000000-aaaaaa"
    assert (target / "metrics.jsonl").read_bytes() == metrics
    assert (target / "checkpoint" / "step-2" / ".metadata").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", target.name]


def test_metrics_records_carry_the_run_id(tmp_path):
    import torch

    from torchtitan.components.metrics import MetricsLogger

    logger = MetricsLogger(config(tmp_path).metrics, str(tmp_path), torch.device("cpu"), 1.0, 1, 2,
                           is_logging_rank=True, run_id="r1")
    logger.log(1, 2.0, 0.5, 1e-3)
    logger.record_validation(2, {"val_loss": 1.0, "val_perplexity": 2.7, "val_tokens": 8, "val_seconds": 0.0},
                             merge=False)
    logger.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["run_id"]) for r in records] == [(1, "r1"), (2, "r1")]


def test_plot_metrics_never_joins_two_runs(tmp_path, capsys):
    plot_metrics = load_script(REPO / "scripts" / "plot_metrics.py")
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]  # a legacy run, then two with ids
    lines += [{"step": s, "run_id": "old", "loss": 9.0 - s} for s in (1, 2, 3)]
    lines += [{"step": s, "run_id": "new", "loss": 7.0 - s} for s in (1, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    runs = plot_metrics.read_runs(path)
    assert list(runs) == ["legacy", "old", "new"]
    assert [r["loss"] for r in plot_metrics.read_metrics(path)] == [6.0, 5.0]  # the newest run only
    plot_metrics.main([str(path)])
    out = capsys.readouterr().out
    assert "drew run new; skipped 5 records of 2 other run(s) (legacy, old)" in out
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    chosen, note = plot_metrics.choose(runs, None, all_runs=True)
    assert list(chosen) == ["legacy", "old", "new"] and note == ""
    assert list(plot_metrics.choose(runs, "old", all_runs=False)[0]) == ["old"]


def test_train_py_defaults_to_the_debug_config_from_any_directory(tmp_path, monkeypatch, capsys):
    train = load_script(REPO / "train.py")
    monkeypatch.chdir(tmp_path)
    manager, cfg = train.parse(["--training.steps", "3"])
    assert manager.used_default and cfg.job.config_file == str(REPO / "train_configs" / "debug_model.toml")
    assert (cfg.training.steps, cfg.training.seq_len, cfg.lr_scheduler.warmup_steps) == (3, 256, 20)
    _, bare = train.parse(["--config", ""])  # the built-in defaults, on request
    assert (bare.job.config_file, bare.training.seq_len) == ("", 2048)
    with pytest.raises(SystemExit):
        train.parse(["--help"])
    assert "Without --job.config_file / --config this reads " + str(train.DEFAULT_CONFIG) in capsys.readouterr().out
