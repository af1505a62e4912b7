"""The console line names each number by its metrics.jsonl key, and the W&B start line names the run."""

import json
import logging
import math

import pytest
import torch

from torchtitan.components.metrics import MetricsLogger, console_lines
from torchtitan.config.job_config import Metrics


@pytest.fixture
def console(caplog):
    """The project logger's lines (it does not propagate once init_logger ran: listen on it directly)."""
    project = logging.getLogger("torchtitan")
    listen = not project.propagate
    if listen:
        project.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="torchtitan")
    yield caplog
    if listen:
        project.removeHandler(caplog.handler)


def _pairs(line: str) -> dict[str, str]:
    """``name value`` pairs of a console line (values never contain spaces)."""
    words = line.split()
    assert len(words) % 2 == 0, line
    return dict(zip(words[::2], words[1::2]))


def test_console_names_are_the_json_keys_with_the_same_values(tmp_path, console):
    m = MetricsLogger(Metrics(), str(tmp_path), torch.device("cpu"), 1.0, 1, 10, is_logging_rank=True)
    m.counters.tokens, m.counters.steps = 4096, 2
    m.record_validation(2, {"val_loss": 2.5, "val_perplexity": math.exp(2.5), "val_loss/stdlib": 2.5,
                            "val_tokens": 4096, "val_seconds": 0.25}, merge=True)
    m.log(2, 3.0, 1.5, 1e-3, extra={"skipped_steps": 1, "moe_load_imbalance": 1.25})
    m.close()
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lines = [r.getMessage() for r in console.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2  # training, validation
    shown = {**_pairs(lines[0]), **_pairs(lines[1])}
    assert set(shown) <= set(record), set(shown) - set(record)
    assert {"perplexity", "memory_gib", "data_loading_pct", "eta_s", "moe_load_imbalance", "skipped_steps",
            "val_perplexity", "val_loss/stdlib", "val_tokens"} <= set(shown)
    for key, text in shown.items():
        value = record[key]
        if value is None:
            assert text == "n/a", key
        else:  # the same number, rounded to the digits printed
            decimals = len(text.partition(".")[2]) if "e" not in text else 0
            tolerance = 0.5 * 10**-decimals if "e" not in text else 5e-3 * abs(value)
            assert abs(float(text.replace(",", "")) - value) <= tolerance * 1.001, (key, text, value)


def test_console_lines_of_a_record_without_training_numbers():
    lines = console_lines({"step": 5, "val_loss": 2.0, "val_perplexity": math.exp(2.0), "val_tokens": 10,
                           "val_seconds": 0.5})
    assert lines == [f"step      5  val_loss   2.0000  val_perplexity      7.39  val_tokens 10  val_seconds 0.50"]


def test_an_offline_wandb_run_is_named_by_its_id(tmp_path, monkeypatch, console):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    cfg = Metrics(enable_wandb=True, wandb_mode="offline")
    m = MetricsLogger(cfg, str(tmp_path), torch.device("cpu"), 1.0, 1, 2, is_logging_rank=True)
    run_id = m.wandb.run.id
    m.close()
    (line,) = [r.getMessage() for r in console.records if r.getMessage().startswith("W&B run")]
    assert line.startswith(f"W&B run {run_id} (offline) in ") and "None" not in line
    assert line.endswith("upload it with `wandb sync`")
