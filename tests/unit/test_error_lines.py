"""A user error prints one short ``error:`` line; a long or multi-line message puts its detail after it."""

import pickle
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan.components.checkpoint import _load_cause, _load_error
from torchtitan.tools.cli import FIRST_LINE, TRACEBACK_HINT, error_line


def test_a_short_message_is_one_line_with_the_hint():
    assert error_line(ValueError("bad value; use 3")) == f"error: ValueError: bad value; use 3 {TRACEBACK_HINT}"


def test_a_multi_line_message_keeps_its_first_line_and_indents_the_rest():
    text = error_line(ValueError("checkpoint x is broken; load another\ncause: EOFError\nfiles: a, b"))
    assert text.splitlines() == ["error: ValueError: checkpoint x is broken; load another", "  cause: EOFError",
                                 "  files: a, b", f"  {TRACEBACK_HINT}"]


def test_a_very_long_line_is_cut_after_a_clause_and_loses_nothing():
    message = "dataset 'x' has no documents: " + "; ".join(f"reason number {i} is long" for i in range(30))
    lines = error_line(ValueError(message)).splitlines()
    assert len(lines[0]) <= FIRST_LINE and lines[0].endswith(";") and len(lines) > 2
    assert all(line.startswith("  ") for line in lines[1:])
    assert " ".join(x.strip() for x in lines).replace("error: ValueError: ", "").replace(f" {TRACEBACK_HINT}", "") \
        == message


def test_a_corrupted_checkpoint_error_has_a_short_first_line_and_the_detail_after(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path("outputs/llama3_8b_run/checkpoint/step-12000")  # as a user names it
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 1000)
    (path / ".metadata").write_bytes(b"x" * 10)
    inner = EOFError("Ran out of input " + "while reading tensor storage " * 20)  # DCP's long messages
    error = _load_error(path, _load_cause(CheckpointException("load", {0: (inner, None)})),
                        CheckpointException("load", {0: (inner, None)}))
    lines = error_line(error).splitlines()
    assert len(lines[0]) < FIRST_LINE, lines[0]
    assert f"could not load checkpoint {path}: a file is truncated;" in lines[0] and "checkpoint.load_step" in lines[0]
    assert lines[1].startswith("  cause: CheckpointException: on rank 0: EOFError: Ran out of input")
    assert lines[2] == "  files: .metadata (10 B), __0_0.distcp (1,000 B)"
    assert lines[-1] == f"  {TRACEBACK_HINT}"


@pytest.mark.parametrize("inner, words", [
    (FileNotFoundError("x"), "a file is missing"),
    (pickle.UnpicklingError("x"), "a file holds an unsafe or corrupted pickle (refused)"),
    (RuntimeError("x"), "a file is corrupted (RuntimeError)"),
])  # fmt: skip
def test_load_causes_name_what_happened_to_the_files(inner, words):
    assert _load_cause(CheckpointException("load", {1: (inner, None)})) == words
    assert _load_cause(inner) == words
