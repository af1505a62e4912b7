"""Synchronous distributed checkpointing with DCP, never half-visible.

A save goes to ``step-N.tmp`` and is renamed to ``step-N`` only after every rank has
finished writing and DCP wrote ``.metadata``; a crash mid-save leaves a ``.tmp`` folder
that resume ignores (with a warning), so the last complete checkpoint is what loads.
Loading never unpickles without restriction: non-tensor values go through
``torch.load(weights_only=True)``.
"""

import io
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.config.job_config import Checkpoint as CheckpointConfig
from torchtitan.tools.logging import logger

_STEP_DIR = re.compile(r"^step-(\d+)$")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor values without restriction; this one does not."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:  # same routing as DefaultLoadPlanner.load_bytes
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _as_parts(model: torch.nn.Module | list[torch.nn.Module]) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


class ModelState(Stateful):
    """The model, or the pipeline stage parts this rank holds, as one state dict.

    Stage parts keep the full model's FQNs (other layers are deleted, not renumbered), so
    the merged dict has the same keys whatever the pipeline layout: checkpoints reload on
    any layout.
    """

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module]):
        self.parts = _as_parts(model)

    def state_dict(self):
        merged = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, sd):
        for part in self.parts:
            own = {k: sd[k] for k in get_model_state_dict(part)}
            set_model_state_dict(part, own, options=StateDictOptions(strict=True))


class _PartsView(torch.nn.Module):
    """One module over several stage parts with the full model's FQNs (no copies: the same
    submodules). DCP's optimizer state dict needs one module owning every optimized parameter."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        for part in parts:
            for name, child in part.named_children():
                if isinstance(child, torch.nn.ModuleDict):  # "layers": merge the parts' blocks
                    if name not in self._modules:
                        self.add_module(name, torch.nn.ModuleDict())
                    self._modules[name].update(child)
                else:
                    self.add_module(name, child)


class OptimizerState(Stateful):
    def __init__(self, model: torch.nn.Module | list[torch.nn.Module], optimizer: torch.optim.Optimizer):
        parts = _as_parts(model)
        self.model = parts[0] if len(parts) == 1 else _PartsView(parts)
        self.optimizer = optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd):
        set_optimizer_state_dict(self.model, self.optimizer, sd)


class BlobState(Stateful):
    """A Stateful whose state has a free shape (e.g. the data loader's), stored as one blob.

    DCP needs the structure at load time to match the saved one; a single serialized
    value has no structure to mismatch. torch.save/torch.load(weights_only=True) keeps it safe.
    """

    def __init__(self, inner: Stateful):
        self.inner = inner

    def state_dict(self):
        buf = io.BytesIO()
        torch.save(self.inner.state_dict(), buf)
        return {"blob": buf.getvalue()}

    def load_state_dict(self, sd):
        self.inner.load_state_dict(torch.load(io.BytesIO(sd["blob"]), weights_only=True))


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, dump_folder: str, states: dict[str, Stateful],
                 config_toml: str = ""):
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.states = states
        self.config_toml = config_toml
        self.enabled = cfg.enable
        self.last_saved_step = -1

    # ---- saving ----------------------------------------------------------------
    def should_save(self, step: int, last_step: int) -> bool:
        return self.enabled and step != self.last_saved_step and (
            step % self.cfg.interval == 0 or step == last_step
        )

    def save(self, step: int) -> Path:
        final = self.folder / f"step-{step}"
        tmp = self.folder / f"step-{step}.tmp"
        rank0 = _rank() == 0
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(dict(self.states), checkpoint_id=str(tmp))
        if rank0:
            if self.config_toml:
                (tmp / "config.toml").write_text(self.config_toml)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        _barrier()
        self.last_saved_step = step
        logger.info(f"saved checkpoint {final}")
        return final

    # ---- loading ---------------------------------------------------------------
    def load(self) -> int:
        """Load the checkpoint chosen by ``load_step``; return its step (0 = nothing loaded)."""
        if not self.enabled:
            return 0
        path = self._resolve_load_path()
        if path is None:
            return 0
        logger.info(f"loading checkpoint {path}")
        try:
            dcp.load(dict(self.states), checkpoint_id=str(path), planner=SafeLoadPlanner())
        except Exception as e:  # DCP's errors are deep and long; say which checkpoint and why
            raise ValueError(
                f"could not load checkpoint {path}: {type(e).__name__}: {_first_line(e)}. "
                f"If the model or optimizer config changed since it was saved, restore it; otherwise "
                f"choose another checkpoint with checkpoint.load_step or move this one away."
            ) from e
        step = int(_STEP_DIR.match(path.name).group(1))
        self.last_saved_step = step
        return step

    def _resolve_load_path(self) -> Path | None:
        complete = self.complete_steps()
        if self.cfg.load_step >= 0:
            path = self.folder / f"step-{self.cfg.load_step}"
            if self.cfg.load_step not in complete:
                raise ValueError(
                    f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint at {path} "
                    f"(complete ones: {complete or 'none'}). Pick one of those or -1 for the latest."
                )
            return path
        return self.folder / f"step-{complete[-1]}" if complete else None

    def complete_steps(self) -> list[int]:
        """Steps with a finished checkpoint; incomplete folders are reported and skipped."""
        if not self.folder.is_dir():
            return []
        steps = []
        for entry in sorted(self.folder.iterdir()):
            m = _STEP_DIR.match(entry.name)
            if m and (entry / ".metadata").is_file():
                steps.append(int(m.group(1)))
            elif entry.name.endswith(".tmp") or m:
                if _rank() == 0:
                    logger.warning(f"skipping incomplete checkpoint {entry} (a save did not finish)")
        return sorted(steps)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:500] if text else ""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
