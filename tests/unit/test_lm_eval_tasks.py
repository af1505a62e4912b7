"""scripts/eval.py refuses an unknown task name in about a second: the names are read with a regex
over the task YAMLs (torchtitan/tools/lm_eval_tasks.py), a superset of lm-eval's own index."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchtitan.tools.lm_eval_tasks import check_task_names, lm_eval_tasks_dir, names_in_text, task_names

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval_task"


def test_names_in_text_reads_every_form_lm_eval_uses():
    text = "\n".join([
        '"task": "quoted_task"',
        "group: my_group",
        "tag:",
        "  - tag_a",
        "    - 'tag_b'",
        "dataset_path: json",
        "  task: nested_is_not_a_name",
        "tag: [tag_c, 'tag_d']",
        "task: !function utils.make_name",
    ])  # fmt: skip
    assert names_in_text(text) == {"quoted_task", "my_group", "tag_a", "tag_b", "tag_c", "tag_d"}


def test_the_local_task_folder_matches_lm_eval_index():
    tasks = pytest.importorskip("lm_eval.tasks")
    manager = tasks.TaskManager(include_path=str(TASKS), include_defaults=False)
    assert task_names(TASKS) == set(manager.all_tasks) == {"tiny_mc", "tiny_ppl"}


@pytest.mark.slow  # lm-eval indexes its ~14,500 YAMLs (5-10 s)
def test_the_builtin_names_are_a_superset_of_lm_eval_index():
    tasks = pytest.importorskip("lm_eval.tasks")
    missing = set(tasks.TaskManager().all_tasks) - task_names(lm_eval_tasks_dir())
    assert not missing, sorted(missing)[:20]


def test_unknown_names_suggest_the_closest_and_known_ones_pass(tmp_path):
    check_task_names(["tiny_mc", str(TASKS / "tiny_ppl.yaml")], str(TASKS))
    with pytest.raises(ValueError, match=r"unknown task 'tiny_mcq': .*Did you mean 'tiny_mc'\?"):
        check_task_names(["tiny_mc", "tiny_mcq"], str(TASKS))
    with pytest.raises(ValueError, match="is not a folder"):
        check_task_names(["tiny_mc"], str(tmp_path / "nowhere"))


def test_eval_script_refuses_a_typo_within_seconds_without_torch(tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "step-1").mkdir()  # a checkpoint is never opened: the name fails first
    env = {k: v for k, v in os.environ.items() if k != "TORCHTITAN_TRACEBACK"}
    cmd = [sys.executable, "-X", "importtime", str(REPO / "scripts" / "eval.py"), "--checkpoint", str(tmp_path),
           "--tasks", "hellaswg", "--include_path", str(TASKS)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert time.perf_counter() - start < 5
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == [errors[0]] and errors[0].startswith("error: ValueError: unknown task 'hellaswg'"), errors
    assert "Did you mean 'hellaswag'?" in errors[0]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "lm_eval.tasks" not in imported


def test_the_shipped_task_yamls_load_without_warnings(tmp_path, monkeypatch, caplog):
    pytest.importorskip("lm_eval")
    datasets_config = pytest.importorskip("datasets.config")
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.chdir(REPO)  # data_files are relative to the repository root
    with caplog.at_level("WARNING"):
        loaded = TaskManager(include_path=str(TASKS), include_defaults=False).load(["tiny_mc", "tiny_ppl"])
    assert sorted(loaded["tasks"]) == ["tiny_mc", "tiny_ppl"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_eval_script_dtype_names_are_the_loader_dtypes():
    from tests.helpers.builders import script_module
    from torchtitan.inference.loading import DTYPES

    assert set(script_module("eval").DTYPE_NAMES) == set(DTYPES)
