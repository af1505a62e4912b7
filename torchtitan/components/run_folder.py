"""One dump folder, one run: whether a start may use ``job.dump_folder``, decided before it writes there.

A start is one of:
  - a resume: checkpoint.enable and a complete checkpoint of this model in the folder. It continues
    the folder's run: same ``run_id`` (``<dump>/run.json``), records appended to ``metrics.jsonl``.
  - a fresh start into a folder without a previous run (no metrics record, no checkpoint): a new run_id.
  - a restart: the folder's run has no checkpoint and its ``config.toml`` trains what this config
    trains (``config_difference``: [job], checkpointing, metrics, validation, profiling and comm may
    differ): the same run started again from step 0. A new run_id; ``metrics.jsonl`` keeps the
    earlier records under theirs, and ``scripts/plot_metrics.py`` draws the newest run.
  - anything else (another run's metrics, a checkpoint of another model, checkpoints this start does
    not resume) is refused in one line that names the fixes, unless ``job.overwrite``: then the previous run's files move into
    ``<dump>/replaced-<run_id>/`` (nothing is deleted) and the start is fresh.

Only once the start is accepted are ``run.json``, ``config.toml`` and ``provenance.json`` written (rank
0), and then the metrics: a refused start leaves the folder as it was (the run lock aside, released).
"""

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from torchtitan.config.manager import config_to_dict, dump_config, tomllib
from torchtitan.tools.logging import logger
from torchtitan.tools.provenance import write_provenance

RUN_FILE = "run.json"
# Files a run writes at the top of its dump folder; provenance.<time>.json and code.<time>.diff too.
_RUN_FILES = ("metrics.jsonl", "metrics.png", "config.toml", RUN_FILE, "provenance.json", "code.diff")
_RUN_PATTERNS = ("provenance.*.json", "code.*.diff")
# Sections that say where and how a run is saved and watched, not what it trains: a restart may change them.
_NOT_COMPARED = ("job", "metrics", "validation", "profiling", "comm", "memory_estimation")


def new_run_id() -> str:
    """Sortable by start time, unique across hosts: ``20261203-211500-3f9a1c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class Start:
    run_id: str
    kind: str  # "new", "resume", "restart" or "replace"
    previous: "PreviousRun | None" = None


@dataclass
class PreviousRun:
    """What a dump folder holds of the run that used it before."""

    folder: Path
    run_id: str | None = None  # None: written before run ids (records without run_id: one legacy run)
    records: int = 0
    checkpoints: list[str] = field(default_factory=list)
    config_toml: str | None = None

    @classmethod
    def read(cls, folder: Path, checkpoint_folder: str) -> "PreviousRun":
        prev = cls(folder)
        metrics = folder / "metrics.jsonl"
        last = None
        if metrics.is_file():
            lines = [line for line in metrics.read_text().splitlines() if line.strip()]
            prev.records = len(lines)
            last = _json_or_none(lines[-1]) if lines else None
        ckpt = folder / checkpoint_folder
        if ckpt.is_dir():
            prev.checkpoints = sorted((p.parent.name for p in ckpt.glob("step-*/.metadata")),
                                      key=lambda n: (len(n), n))
        if (folder / "config.toml").is_file():
            prev.config_toml = (folder / "config.toml").read_text()
        run = _json_or_none((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else None
        prev.run_id = (run or {}).get("run_id") or (last or {}).get("run_id")
        return prev

    @property
    def exists(self) -> bool:
        """A run's results are here (a config.toml alone is what a failed start of old versions left)."""
        return self.records > 0 or bool(self.checkpoints)

    def describe(self) -> str:
        ckpts = f", checkpoints {', '.join(self.checkpoints[-3:])}" if self.checkpoints else ""
        return f"run_id {self.run_id or 'legacy'}: {self.records} metrics records{ckpts}"


def _json_or_none(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def config_difference(old_toml: str, cfg) -> str | None:
    """The first key deciding what is trained whose value differs from the folder's config.toml, or None.

    Not compared: where and how the run is saved and watched (``_NOT_COMPARED``, checkpoint keys but
    ``initial_load_path``), and keys only one side has (written by another version)."""
    try:
        old = tomllib.loads(old_toml)
    except tomllib.TOMLDecodeError:
        return "its config.toml does not parse"
    for section, table in config_to_dict(cfg).items():
        if section in _NOT_COMPARED or not isinstance(old.get(section), dict):
            continue
        for key, value in table.items():
            if section == "checkpoint" and key != "initial_load_path":
                continue
            if key in old[section] and not _same(old[section][key], value):
                return f"{section}.{key} is {old[section][key]!r} there, {value!r} here"
    return None


def decide_start(cfg, resume: Path | None, mismatch: str | None) -> Start:
    """What this start is (see the module docstring); raises the one-line refusal. Reads only."""
    folder = Path(cfg.job.dump_folder)
    previous = PreviousRun.read(folder, cfg.checkpoint.folder)
    if resume is not None:
        return Start(previous.run_id or new_run_id(), "resume", previous)
    if not previous.exists:
        return Start(new_run_id(), "new")
    if mismatch is not None:  # its first sentence: the advice after it is about resuming only
        why, detail = "of another model", mismatch.split(". It was saved")[0]
    elif previous.config_toml is None:
        why, detail = "without a config.toml to tell whether it is this run", ""
    else:
        diff = config_difference(previous.config_toml, cfg)
        if diff is None and not previous.checkpoints:
            return Start(new_run_id(), "restart", previous)
        # With checkpoints, the same config is that run's to resume: a restart beside them would have
        # a later resume continue their run under the restart's run_id.
        why, detail = ("of another config", f"its config.toml differs: {diff}") if diff else \
            ("with checkpoints this start does not resume (checkpoint.enable is off)", "")
    if cfg.job.overwrite:
        return Start(new_run_id(), "replace", previous)
    again = ("resume it with its config and checkpoint.enable" if previous.checkpoints
             else "rerun it from step 0 with its config")
    # The problem and the fixes on the first line; the detail (long paths, shapes) below it.
    raise ValueError(
        f"job.dump_folder={str(folder)!r} holds another run ({previous.describe()}) {why}. To continue that "
        f"run, {again}; to start a new one, pass a new --job.dump_folder, or --job.overwrite to move that "
        f"run's files into {folder}/replaced-{previous.run_id or 'legacy-<time>'}/"
        + (f"\n{detail}" if detail else "")
    )


def move_aside(cfg, previous: "PreviousRun") -> Path:
    """Move the previous run's files (top-level run files and the folders its config names) into
    ``<dump>/replaced-<run_id>/``; never a path outside the dump folder."""
    folder = Path(cfg.job.dump_folder)
    target = folder / f"replaced-{previous.run_id or 'legacy-' + time.strftime('%Y%m%d-%H%M%S')}"
    subfolders = (cfg.checkpoint.folder, cfg.metrics.save_tb_folder, cfg.profiling.save_traces_folder,
                  cfg.profiling.save_memory_snapshot_folder, cfg.checkpoint.hf_export_folder,
                  "comm_trace", "wandb", "final_weights")
    names = {*_RUN_FILES, *subfolders} | {p.name for pattern in _RUN_PATTERNS for p in folder.glob(pattern)}
    inside = [n for n in names if n and not Path(n).is_absolute() and ".." not in Path(n).parts and n != "."]
    for name in sorted(inside):
        source = folder / name
        if source.exists() or source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            source.rename(target / name)
    return target


def write_start(cfg, start: Start, layout: dict) -> None:
    """Rank 0, once the start is accepted: move a replaced run aside, then write run.json, config.toml
    and provenance.json."""
    folder = Path(cfg.job.dump_folder)
    if start.kind == "replace":
        target = move_aside(cfg, start.previous)
        logger.warning(f"job.overwrite: moved the files of the folder's previous run "
                       f"({start.previous.describe()}) into {target}")
    elif start.kind == "restart":
        logger.info(f"starting again from step 0: the folder's previous run ({start.previous.describe()}) trains "
                    f"the same and has no checkpoint to resume; its records stay in metrics.jsonl under its run_id")
    run_file = folder / RUN_FILE
    if start.kind != "resume" or _json_or_none(run_file.read_text() if run_file.is_file() else "") is None:
        run_file.write_text(json.dumps({"run_id": start.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                            + "\n")
    dump_config(cfg, folder)
    write_provenance(folder, layout, run_id=start.run_id)  # how this run was made, beside config.toml
    logger.info(f"run_id {start.run_id} ({start.kind}) in {folder}")


def accept_start(cfg, checkpointer, layout: dict) -> str:
    """Collective: decide and write on rank 0 (``decide_start``, ``write_start``); every rank returns
    the run_id or raises the same one-line error."""
    resume, mismatch = checkpointer.preflight()  # every rank: the model check gathers all shapes
    rank = dist.get_rank() if dist.is_initialized() else 0
    box, failure = [None], None
    if rank == 0:
        try:
            start = decide_start(cfg, resume, mismatch)
            write_start(cfg, start, layout)
            box = [("ok", start.run_id)]
        except Exception as e:  # whatever it is, the other ranks must hear of it, not wait forever
            failure = e
            box = [("error", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        if failure is not None:
            raise failure
        raise ValueError(value)
    return value
