"""Task names of lm-evaluation-harness, read in a fraction of a second, to refuse a typo at once.

lm-eval's ``TaskManager`` parses all ~14,500 task YAMLs it ships (5-10 s on a fast disk, tens of
seconds on a cold one) before it can say that a name is unknown; scripts/eval.py also imports torch
and loads the model first. Here the names are read with a regex over the same files: a top-level
``task:``, ``group:`` or ``tag:`` key (quoted or not; a tag may be a list). That is a superset of
``TaskManager().all_tasks`` (tests/unit/test_lm_eval_tasks.py compares them), so a name missing here
is unknown to lm-eval too; a name found here is still checked by the ``TaskManager`` itself.
Stdlib only: nothing heavy is imported.
"""

import difflib
import importlib.util
import re
from pathlib import Path

_KEY = re.compile(r"""^["']?(task|group|tag)["']?\s*:\s*(.*?)\s*$""")
_ITEM = re.compile(r"^\s*-\s+(.+?)\s*$")
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}


def lm_eval_tasks_dir() -> Path | None:
    """The folder of lm-eval's own task YAMLs (None when lm-eval is not installed)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return folder if folder.is_dir() else None


def _is_task_file(path: Path) -> bool:
    # lm-eval's templates (``_default_template_yaml``, ``naijarc``) carry tags but no .yaml suffix.
    return path.is_file() and (path.suffix in ("", ".yaml", ".yml") or "yaml" in path.name) \
        and not any(part in _IGNORED_DIRS for part in path.parts)


def _unquote(value: str) -> str:
    return value.split(" #")[0].strip().strip("'\"")


def names_in_text(text: str) -> set[str]:
    """The task, group and tag names one YAML file declares at its top level."""
    names: set[str] = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _KEY.match(line)
        if not match:
            continue
        value = _unquote(match.group(2))
        if value.startswith("["):  # tag: [a, b]
            names.update(_unquote(v) for v in value.strip("[]").split(",") if v.strip())
        elif value and not value.startswith("!"):  # not a !function
            names.add(value)
        elif not value and match.group(1) == "tag":  # tag: followed by "- name" lines
            for item in lines[i + 1 :]:
                item_match = _ITEM.match(item)
                if not item_match:
                    break
                names.add(_unquote(item_match.group(1)))
    return names


def task_names(folder: Path) -> set[str]:
    """Every task, group and tag name declared under ``folder`` (recursively)."""
    names: set[str] = set()
    for path in folder.rglob("*"):
        if _is_task_file(path):
            names |= names_in_text(path.read_text(errors="replace"))
    return names


def check_task_names(tasks: list[str], include_path: str = "") -> None:
    """A ValueError (with a did-you-mean) for the first task that neither ``include_path`` nor
    lm-eval declares; a path to a task YAML file passes as it is."""
    if include_path and not Path(include_path).is_dir():
        raise ValueError(f"--include_path {include_path!r} is not a folder: pass a folder of task YAML files")
    pending = [t for t in tasks if not Path(t).is_file()]
    known = task_names(Path(include_path)) if include_path else set()
    builtin = lm_eval_tasks_dir()
    if builtin is not None and any(t not in known for t in pending):
        known |= task_names(builtin)
    unknown = [t for t in pending if t not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (yours: --include_path)"
        raise ValueError(f"unknown task {unknown[0]!r}: not in {where}.{hint} `lm-eval ls tasks` lists them")
