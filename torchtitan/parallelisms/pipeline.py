"""Pipeline parallelism for any family: split the meta model into stages and build a schedule.

A family's spec names its stage split (``ModelSpec.pipeline_split``; ``build_stage_model`` here
fits every decoder with ``tok_embeddings`` / ``layers`` / ``norm`` / ``output``). Each stage is the full model (rebuilt on the meta device) with the modules of other
stages deleted, so parameter FQNs stay those of the full model ("layers.5.attention.wq.weight"
on whichever rank holds layer 5): checkpoints do not depend on the pipeline layout. Each stage
part then goes through the same parallelize / materialize / init as a whole model would.

Stages per rank:
- single-stage schedules (GPipe, 1F1B): one stage per rank, ``pp`` stages;
- looped multi-stage schedules (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble): ``pp x v``
  stages, stage s on rank ``s % pp`` (v = 2 unless split points say otherwise);
- V-shaped schedules (ZBVZeroBubble, DualPipeV): ``2 x pp`` stages, rank r holds stages r and
  ``2pp - 1 - r`` (so rank 0 holds both the first and the last stage);
- a CSV schedule file (``pp_schedule = "path.csv"``, one row of actions such as ``0F1`` per rank):
  the stages, their ranks and the microbatch count are read from the file.
"""

import csv
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as pp_schedules

from torchtitan.config.job_config import Parallelism as ParallelismConfig
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger

# Config name -> torch class name; only those the installed torch has are offered.
_SCHEDULE_CLASSES = {
    "GPipe": "ScheduleGPipe",
    "1F1B": "Schedule1F1B",
    "Interleaved1F1B": "ScheduleInterleaved1F1B",
    "LoopedBFS": "ScheduleLoopedBFS",
    "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble",
    "ZBVZeroBubble": "ScheduleZBVZeroBubble",
    "DualPipeV": "ScheduleDualPipeV",
}
# Schedules that place two stages per rank in a V (torch maps their stages with style="v").
_V_SCHEDULES = {"ZBVZeroBubble", "DualPipeV"}
_DEFAULT_STAGES_PER_RANK = 2  # looped multi-stage schedules without split points


@dataclass
class Pipeline:
    """What the training step needs: the schedule and the model parts this rank holds."""

    schedule: pp_schedules._PipelineSchedule
    model_parts: list[nn.Module]
    stage_ids: tuple[int, ...]
    num_stages: int
    n_microbatches: int
    has_first_stage: bool
    has_last_stage: bool


def available_schedules() -> list[str]:
    return [name for name, cls in _SCHEDULE_CLASSES.items() if hasattr(pp_schedules, cls)]


@dataclass
class _SchedulePlan:
    name: str
    cls: type
    style: str  # "single" | "loop" | "v" | "csv"
    csv_path: str | None = None


def resolve_schedule(name: str) -> _SchedulePlan:
    """A schedule name (case-insensitive) or a path to a CSV schedule file."""
    if name.lower().endswith(".csv") or os.path.isfile(name):
        if not os.path.isfile(name):
            raise ValueError(f"parallelism.pp_schedule={name!r}: no such CSV schedule file")
        runtime = getattr(pp_schedules, "_PipelineScheduleRuntime", None)
        if runtime is None:
            raise ValueError("CSV pipeline schedules need torch's _PipelineScheduleRuntime, absent in this torch")
        return _SchedulePlan(os.path.basename(name), runtime, "csv", name)
    by_lower = {n.lower(): n for n in available_schedules()}
    if name.lower() not in by_lower:
        raise ValueError(
            f"parallelism.pp_schedule={name!r} is not a pipeline schedule this torch ({torch.__version__}) has; "
            f"available: {', '.join(available_schedules())}, or a path to a CSV schedule file"
        )
    canonical = by_lower[name.lower()]
    cls = getattr(pp_schedules, _SCHEDULE_CLASSES[canonical])
    if issubclass(cls, pp_schedules.PipelineScheduleSingle):
        style = "single"
    else:
        style = "v" if canonical in _V_SCHEDULES else "loop"
    return _SchedulePlan(canonical, cls, style)


def read_csv_schedule(path: str) -> tuple[list[list[str]], int, int]:
    """(per-rank action strings, number of stages, number of microbatches) of a CSV schedule."""
    with open(path, newline="") as f:
        rows = [[cell.strip() for cell in row if cell.strip()] for row in csv.reader(f)]
    stages, microbatches = set(), set()
    for row in rows:
        for cell in row:
            action = pp_schedules._Action.from_str(cell)
            if action is not None and action.microbatch_index is not None:
                stages.add(action.stage_index)
                microbatches.add(action.microbatch_index)
    if not stages:
        raise ValueError(f"CSV pipeline schedule {path} has no compute actions (e.g. 0F0, 0B0)")
    return rows, max(stages) + 1, max(microbatches) + 1


def stage_ids_this_rank(pp_rank: int, pp: int, num_stages: int, style: str) -> tuple[int, ...]:
    if style == "v":
        assert num_stages == 2 * pp, (num_stages, pp)
        return (pp_rank, num_stages - 1 - pp_rank)
    return tuple(range(pp_rank, num_stages, pp))  # "single" and "loop"


def _stage_ids_from_csv(rows: list[list[str]], pp_rank: int, pp: int, path: str) -> tuple[int, ...]:
    if len(rows) != pp:
        raise ValueError(f"CSV pipeline schedule {path} has {len(rows)} rows; parallelism.pp={pp} needs one per rank")
    ids = set()
    for cell in rows[pp_rank]:
        action = pp_schedules._Action.from_str(cell)
        if action is not None and action.microbatch_index is not None:
            ids.add(action.stage_index)
    return tuple(sorted(ids))


def num_stages_of(plan: _SchedulePlan, pp: int, split_points: list[str], csv_stages: int) -> int:
    """Stage count implied by the schedule; split points, when given, must agree with it."""
    if plan.style == "csv":
        want = csv_stages
    elif plan.style == "single":
        want = pp
    elif plan.style == "v":
        want = 2 * pp
    else:  # looped: any multiple of pp; split points choose it
        want = len(split_points) + 1 if split_points else pp * _DEFAULT_STAGES_PER_RANK
        if want % pp:
            raise ValueError(
                f"parallelism.pp_split_points gives {want} stages; schedule {plan.name} with pp={pp} needs a "
                f"multiple of {pp} stages (pp x stages per rank), i.e. {pp - 1}, {2 * pp - 1}, ... split points"
            )
        return want
    if split_points and len(split_points) != want - 1:
        raise ValueError(
            f"parallelism.pp_split_points has {len(split_points)} names but schedule {plan.name} with pp={pp} "
            f"has {want} stages, so it needs {want - 1} (e.g. layers.N where a stage begins)"
        )
    return want


def stage_boundaries(layer_names: list[str], num_stages: int, split_points: list[str]) -> list[int]:
    """Indices into ``layer_names`` where each stage begins ([0, ...], one per stage)."""
    n = len(layer_names)
    if not split_points:
        if n < num_stages:
            raise ValueError(f"the model has {n} layers, fewer than the {num_stages} pipeline stages; "
                             f"add layers or lower parallelism.pp")
        # Ceil: any extra layers go to the early stages; the last one also holds the output head.
        return [-(-s * n // num_stages) for s in range(num_stages)]
    index = {f"layers.{name}": i for i, name in enumerate(layer_names)}
    starts = [0]
    for point in split_points:
        if point not in index or index[point] == 0:
            raise ValueError(
                f"parallelism.pp_split_points: {point!r} is not a module where a stage can begin; use names "
                f"from layers.1 to layers.{layer_names[-1]} (the first stage always begins at layers.0)"
            )
        if index[point] <= starts[-1]:
            raise ValueError(f"parallelism.pp_split_points must be strictly increasing, got {split_points}")
        starts.append(index[point])
    return starts


def build_stage_model(model: nn.Module, layer_names: list[str], first: bool, last: bool) -> nn.Module:
    """A fresh meta copy of ``model`` holding only ``layer_names`` (and embeddings / head on the ends).

    Rebuilt from the model args rather than deep-copied; other layers are deleted, not
    renumbered, so FQNs match the full model.
    """
    with torch.device("meta"):
        part = type(model)(model.model_args)
    keep = set(layer_names)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if not first:
        part.tok_embeddings = None
    if not last:
        part.norm = None
        part.output = None
    return part


def resolve_microbatches(requested: int, plan: _SchedulePlan, pp: int, num_stages: int, csv_microbatches: int,
                         local_batch_size: int) -> int:
    """``pp_microbatches`` (0 = default) checked against the schedule and the local batch."""
    if plan.style == "csv":
        if requested not in (0, csv_microbatches):
            raise ValueError(f"parallelism.pp_microbatches={requested} but the CSV schedule {plan.csv_path} "
                             f"runs {csv_microbatches} microbatches; set 0 or {csv_microbatches}")
        n = csv_microbatches
    else:
        # 0 = pp degree; multi-stage schedules need at least one microbatch per stage to fill the pipe.
        n = requested or (pp if plan.style == "single" else num_stages)
    if n < 1 or local_batch_size % n:
        raise ValueError(
            f"parallelism.pp_microbatches={n} must divide the local batch of {local_batch_size} rows "
            f"(training.local_batch_size, or global_batch_size / dp); pick a divisor of {local_batch_size}"
        )
    return n


def build_pipeline(
    model: nn.Module,
    parallel_dims: ParallelDims,
    parallelism_cfg: ParallelismConfig,
    local_batch_size: int,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    build_part_fn: Callable[[nn.Module], nn.Module],
    split_fn: Callable[[nn.Module, list[str], bool, bool], nn.Module] | None = None,
) -> Pipeline:
    """Split the meta ``model`` into this rank's stages and build the pipeline schedule.

    ``build_part_fn(part)`` takes one meta stage part through exactly what a whole model goes
    through (TP -> AC -> compile -> FSDP, ``to_empty``, seeded per-unit init) and returns it.
    ``loss_fn`` is called by the schedule once per microbatch on the last stage; the caller
    scales it (the schedule is built with ``scale_grads=False``: gradients are the plain sum
    over microbatches, and accumulate over several ``step`` calls). ``split_fn(model, layer_names,
    is_first, is_last)`` builds one stage's meta part (default ``build_stage_model``).
    """
    split_fn = split_fn or build_stage_model
    pp, pp_rank = parallel_dims.pp, parallel_dims.coordinate("pp")
    plan = resolve_schedule(parallelism_cfg.pp_schedule)
    split_points = list(parallelism_cfg.pp_split_points)
    csv_rows, csv_stages, csv_microbatches = (
        read_csv_schedule(plan.csv_path) if plan.style == "csv" else ([], 0, 0)
    )
    num_stages = num_stages_of(plan, pp, split_points, csv_stages)
    n_microbatches = resolve_microbatches(
        parallelism_cfg.pp_microbatches, plan, pp, num_stages, csv_microbatches, local_batch_size
    )
    layer_names = list(model.layers.keys())
    starts = stage_boundaries(layer_names, num_stages, split_points) + [len(layer_names)]
    if plan.style == "csv":
        stage_ids = _stage_ids_from_csv(csv_rows, pp_rank, pp, plan.csv_path)
    else:
        stage_ids = stage_ids_this_rank(pp_rank, pp, num_stages, plan.style)

    group = parallel_dims.submesh("pp").get_group()
    stages, parts = [], []
    for sid in stage_ids:
        part = split_fn(model, layer_names[starts[sid]:starts[sid + 1]], sid == 0, sid == num_stages - 1)
        part = build_part_fn(part)
        parts.append(part)
        stages.append(PipelineStage(part, sid, num_stages, device, group=group))
        logger.info(f"pp rank {pp_rank}: stage {sid}/{num_stages} holds layers "
                    f"{layer_names[starts[sid]:starts[sid + 1]]}")

    schedule = _build_schedule(plan, stages, n_microbatches, loss_fn)
    logger.info(f"pipeline: {plan.name}, {num_stages} stages over pp={pp}, {n_microbatches} microbatches "
                f"per local batch of {local_batch_size}")
    return Pipeline(schedule, parts, stage_ids, num_stages, n_microbatches,
                    has_first_stage=0 in stage_ids, has_last_stage=num_stages - 1 in stage_ids)


def _build_schedule(plan: _SchedulePlan, stages: list[PipelineStage], n_microbatches: int, loss_fn):
    # scale_grads=False: the loss is pre-scaled by the caller. torch's own scaling would divide
    # everything accumulated so far, which is wrong with gradient accumulation over several steps.
    if plan.style == "single":
        return plan.cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    schedule = plan.cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if plan.style == "csv":
        schedule._load_csv(plan.csv_path)
    return schedule
