"""Distributed checkpointing with DCP: never half-visible, optionally overlapped with training.

Layout: ``<dump>/<folder>/step-N/`` (DCP files, ``.metadata``, ``config.toml``). A save goes to
``step-N.tmp`` and is renamed to ``step-N`` only after every rank finished writing and DCP wrote
``.metadata``; a crash mid-save leaves a ``.tmp`` folder, which the next start removes with a
warning (or publishes, when DCP had finished it), so the last complete checkpoint is what loads.
A save that fails (full disk, I/O error) removes its ``.tmp`` at once and raises
one ``CheckpointWriteError`` naming the path, the bytes needed and free, and the checkpoint that
survived (``save_errors``). Loading never unpickles without restriction:
non-tensor values go through ``torch.load(weights_only=True)`` and ``.metadata`` through a
restricted unpickler (``SafeFileSystemReader``).

``checkpoint.async_mode``:
  - ``async``: the state is copied to CPU memory inside ``save`` (DCP's default stager), then a
    thread writes it; training goes on meanwhile.
  - ``async_with_pinned_mem``: DCP's ``DefaultStager`` copies the state into shared memory (pinned
    too where CUDA exists) in a background thread while the next forward/backward runs, and a
    separate checkpoint process (``AsyncCheckpointerType.PROCESS``) writes it. The trainer calls
    ``wait_for_staging()`` before ``optimizer.step()``: the optimizer never mutates a tensor that
    is still being copied.
  Both write on a gloo group of their own: two DCP saves in flight on one gloo group abort, and
  training collectives stay on the default group. One save at a time: a save still running when
  the next is due is waited for.

When an async save is published (``.tmp`` -> final): rank 0 alone renames, as soon as its own save
completed. That is enough: rank 0 is DCP's coordinator, whose save returns only after it gathered
every rank's write results and wrote ``.metadata``, so no barrier is needed. Rank 0 checks at every
step (``wait_for_staging``); every rank waits for the save at the next save, at the end and at stop
(``close``), so a failure surfaces on every rank and nothing is pending at exit.

Model-only checkpoints (flat model FQNs, no ``train_state``): the seed checkpoint (step-0), the
weights-only final save, and any checkpoint used as ``initial_load_path``. Loading one restores the
model weights only.
"""

import io
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.components.save_errors import (
    CheckpointWriteError,
    SaveStreamWriter,
    first_line,
    state_bytes,
    write_failed,
)
from torchtitan.config.job_config import Checkpoint as CheckpointConfig
from torchtitan.config.job_config import choices
from torchtitan.tools.logging import logger

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
ASYNC_MODES = choices(CheckpointConfig, "async_mode")
INTERVAL_TYPES = choices(CheckpointConfig, "interval_type")
EXPORT_DTYPES = choices(CheckpointConfig, "export_dtype")
# DCP raises CheckpointException, a BaseException: `except Exception` alone would miss it.
_ERRORS = (Exception, CheckpointException)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor values without restriction; this one does not."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:  # same routing as DefaultLoadPlanner.load_bytes
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes ``.metadata`` with plain pickle and reads it back with ``pickle.load``: a crafted
    file would run code. Only DCP's metadata types, torch sizes/dtypes/layouts and paths load."""

    _DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        import torch.serialization

        if module in self._DCP_MODULES or (module, name) in (("torch", "Size"), ("collections", "OrderedDict"),
                                                               ("torch.serialization", "_get_layout")):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if module not in self._DCP_MODULES or getattr(obj, "__module__", module) == module:
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: not a DCP metadata type (a crafted or foreign .metadata file)"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through ``_MetadataUnpickler``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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


@dataclass
class _PendingSave:
    """An async save in flight: published (renamed) once ``upload`` completed on rank 0."""

    step: int
    tmp: Path
    upload: Future
    staging: Future | None = None  # async_with_pinned_mem: done when the copy is complete
    published: bool = False
    nbytes: int = 0  # what the save writes, for the message if it fails


class CheckpointManager:
    """Saves, publishes, prunes and loads checkpoints; see the module docstring."""

    def __init__(self, cfg: CheckpointConfig, dump_folder: str, states: dict[str, Stateful],
                 config_toml: str = "", timeout_s: float = 300):
        _validate(cfg, states)
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.states = states
        self.config_toml = config_toml
        self.enabled = cfg.enable
        self.last_saved_step = -1
        self._last_save_time = time.monotonic()
        self._pending: _PendingSave | None = None
        self._stager = None  # async_with_pinned_mem: reused, so its shared buffers are allocated once
        self._group = None
        if self.enabled and cfg.async_mode != "disabled" and dist.is_initialized():
            # Every rank builds the manager with the same config: new_group is called in step.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    # ---- saving ----------------------------------------------------------------
    def should_save(self, step: int, last_step: int) -> bool:
        if not self.enabled or step == self.last_saved_step:
            return False
        if step == last_step:
            return True
        if self.cfg.interval_type == "steps":
            return step % self.cfg.interval == 0
        return self._interval_elapsed()

    def _interval_elapsed(self) -> bool:
        """Clocks differ across ranks, and all must save together: rank 0 decides, all follow.

        The broadcast is on the default group, from the training thread: the checkpoint group may
        have a save in flight, and two collectives at once on one gloo group abort.
        """
        due = torch.tensor([float(time.monotonic() - self._last_save_time >= self.cfg.interval)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(due, src=0)
        return bool(due.item())

    def save(self, step: int, final: bool = False) -> Path:
        """Save ``step`` (the last step if ``final``); async modes return while it is written."""
        self._finish_pending()  # one save at a time
        tmp = self._prepare_tmp(step)
        if final and self.cfg.model_weights_only:
            self._write(step, tmp, self._model_only_state_dict(self.cfg.export_dtype))
        elif self.cfg.async_mode == "disabled":
            self._write(step, tmp, self._state_dicts())
        else:
            self._pending = self._async_save(step, tmp)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        return self.folder / f"step-{step}"

    def create_seed_checkpoint(self) -> Path:
        """step-0 with the freshly initialized weights (model only, float32): every layout starting
        from it has the same weights, whatever its init would have done."""
        if _rank() == 0 and self.complete_steps():
            raise ValueError(
                f"checkpoint.create_seed_checkpoint: {self.folder} already has checkpoints "
                f"{self.complete_steps()}; a seed checkpoint goes into an empty folder (a later one would win)"
            )
        tmp = self._prepare_tmp(0)
        self._write(0, tmp, self._model_only_state_dict("float32"))
        return self.folder / "step-0"

    def _write(self, step: int, tmp: Path, state: dict) -> None:
        """A synchronous save into ``tmp``, then published. DCP raises on every rank when any rank
        failed (its coordinator gathers the write results), so every rank reports the failure."""
        try:
            dcp.save(state, storage_writer=SaveStreamWriter(str(tmp)), checkpoint_id=str(tmp),
                     process_group=self._group)
        except _ERRORS as e:
            raise self._save_failed(step, tmp, e, state_bytes(state)) from e
        self._publish_now(step, tmp)

    def _state_dicts(self) -> dict:
        """Every state's state dict, taken once (DCP would take them itself): the bytes a failed save
        needed are counted from it."""
        return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in self.states.items()}

    def _save_failed(self, step: int, tmp: Path, error: BaseException, nbytes: int) -> CheckpointWriteError:
        """Remove the partial ``tmp`` at once (rank 0; a failed DCP save has finished writing on every
        rank) and describe the failure, and which checkpoint survived, in one line."""
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        complete = self.complete_steps(warn=False)
        survivor = (f"the previous checkpoint step-{complete[-1]} is intact and a rerun resumes from it"
                    if complete else "there is no earlier checkpoint: a rerun starts from step 0")
        k = self.cfg.keep_latest_k
        kept = (f"during a save {k + 1} checkpoints are on disk: checkpoint.keep_latest_k={k} plus the new one"
                if k else "checkpoint.keep_latest_k=0 keeps every checkpoint: set it to keep only the newest")
        return write_failed(f"saving checkpoint step-{step}", tmp, error, nbytes,
                            f"The partial {tmp.name} was removed; {survivor}",
                            f"free space on that file system ({kept}), or put job.dump_folder on a larger disk")

    def _prepare_tmp(self, step: int) -> Path:
        tmp = self.folder / f"step-{step}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def _model_only_state_dict(self, dtype: str) -> dict[str, torch.Tensor]:
        """Flat model FQNs -> weights cast to ``dtype`` (DTensors stay sharded)."""
        return {k: v.to(getattr(torch, dtype)) for k, v in self.states["model"].state_dict().items()}

    def _async_save(self, step: int, tmp: Path) -> _PendingSave:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # The writer is pickled into DCP's checkpoint process (async_with_pinned_mem) with the plan.
        kwargs = dict(checkpoint_id=str(tmp), storage_writer=SaveStreamWriter(str(tmp)), process_group=self._group)
        state = self._state_dicts()
        if self.cfg.async_mode == "async":
            # The default stager copies to CPU before async_save returns: training may step at once.
            return _PendingSave(step, tmp, upload=dcp.async_save(state, **kwargs), nbytes=state_bytes(state))
        if self._stager is None:
            accelerated = torch.cuda.is_available()  # pinning and non-blocking copies need CUDA
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=accelerated, use_shared_memory=True,
                use_async_staging=True, use_non_blocking_copy=accelerated,
            ))
        response = dcp.async_save(state, async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                                  async_stager=self._stager, **kwargs)
        return _PendingSave(step, tmp, upload=response.upload_completion, staging=response.staging_completion,
                            nbytes=state_bytes(state))

    def wait_for_staging(self) -> None:
        """Call before ``optimizer.step()``: blocks until a pending save finished copying the state.

        Also publishes a finished async save on rank 0 (see the module docstring), so a crash
        later loses as little as possible, or removes a failed one's ``.tmp`` at once (every rank
        raises its error at the next save or at ``close``: deciding it here would need a collective).
        """
        pending = self._pending
        if pending is None:
            return
        if pending.staging is not None:
            pending.staging.result()
            pending.staging = None
        if _rank() == 0 and not pending.published and pending.upload.done():
            if pending.upload.exception() is None:
                self._publish(pending.step, pending.tmp)
                pending.published = True
            elif pending.tmp.exists():
                shutil.rmtree(pending.tmp, ignore_errors=True)
                logger.warning(f"async checkpoint save of step {pending.step} failed, {pending.tmp} removed; "
                               f"the run stops with the error at the next save")

    def _finish_pending(self) -> None:
        """Every rank waits for the save in flight; rank 0 publishes it if not done yet."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.upload.result()
        except _ERRORS as e:
            raise self._save_failed(pending.step, pending.tmp, e, pending.nbytes) from e
        if _rank() == 0 and not pending.published:
            self._publish(pending.step, pending.tmp)

    def close(self) -> None:
        """Finish the save in flight (end of training, stop, exit) and free the staging buffers."""
        self._finish_pending()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        _stop_checkpoint_process()

    def _publish_now(self, step: int, tmp: Path) -> None:
        """Synchronous saves: publish on rank 0, then every rank sees the final folder."""
        if _rank() == 0:
            self._publish(step, tmp)
        _barrier()

    def _publish(self, step: int, tmp: Path) -> None:
        """Rank 0 only: rename the finished ``.tmp`` folder (atomic), then prune old checkpoints."""
        final = self.folder / f"step-{step}"
        if self.config_toml:
            try:  # a convenience (what made it); the checkpoint is complete without it
                (tmp / "config.toml").write_text(self.config_toml)
            except OSError as e:
                (tmp / "config.toml").unlink(missing_ok=True)
                logger.warning(f"{tmp}: could not write config.toml ({e}); the checkpoint is published without it")
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
        logger.info(f"saved checkpoint {final}")
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep_latest_k`` complete checkpoints; ``.tmp`` folders never count and
        are never touched here (one may be the save in flight)."""
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        for step in self.complete_steps(warn=False)[:-k]:
            shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)
            logger.info(f"removed checkpoint step-{step} (checkpoint.keep_latest_k={k})")

    # ---- loading ---------------------------------------------------------------
    def load(self) -> int:
        """Load this run's checkpoint (``load_step``, or the latest complete one), or else the weights
        of ``initial_load_path``; return the step to continue from (0 = from scratch)."""
        if self.enabled:
            self._clean_unfinished_saves()
        path = self._resolve_load_path() if self.enabled else None
        if path is not None:
            step = int(_STEP_DIR.match(path.name).group(1))
            self.last_saved_step = step
            self._last_save_time = time.monotonic()
            return self._load_from(path, step)
        if self.cfg.initial_load_path:
            path = Path(self.cfg.initial_load_path)
            if not (path / ".metadata").is_file():
                raise ValueError(
                    f"checkpoint.initial_load_path={path}: no .metadata there, so it is not a complete DCP "
                    f"checkpoint (an unfinished save, or not a checkpoint folder); point it at a step-N folder"
                )
            logger.info(f"starting from the model weights of {path} (checkpoint.initial_load_path)")
            self._load_model_only(path, self._read_metadata(path))
        return 0

    def _load_from(self, path: Path, step: int) -> int:
        metadata = self._read_metadata(path)
        if not _is_full(metadata):  # seed checkpoint or weights-only export
            if "model" not in self.cfg.exclude_from_loading:
                self._load_model_only(path, metadata)
            if step > 0:
                logger.warning(f"{path} holds model weights only: optimizer, data and lr schedule start fresh")
            return step
        model_sd = self.states["model"].state_dict()
        _check_model_matches(path, metadata, model_sd, prefix="model.")
        keys = [k for k in self.states if k not in self.cfg.exclude_from_loading]
        logger.info(f"loading checkpoint {path} ({', '.join(keys)})")
        self._dcp_load(path, {k: self.states[k] for k in keys})
        # Without train_state the step count restarts (documented with exclude_from_loading).
        return step if "train_state" in keys else 0

    def _load_model_only(self, path: Path, metadata: Metadata) -> None:
        """The model weights of any checkpoint: a training one or a converted one (keys under
        ``model.``), or a seed / weights-only export (flat model FQNs); nothing else."""
        model = self.states["model"]
        model_sd = model.state_dict()
        nested = any(k.startswith("model.") for k in metadata.state_dict_metadata)
        _check_model_matches(path, metadata, model_sd, prefix="model." if nested else "")
        if nested:
            logger.info(f"loading checkpoint {path} (model)")
            self._dcp_load(path, {"model": model})
        else:
            logger.info(f"loading checkpoint {path} (model weights only)")
            self._dcp_load(path, model_sd)  # in place, cast to the model's dtype
            model.load_state_dict(model_sd)

    def _read_metadata(self, path: Path) -> Metadata:
        try:
            return SafeFileSystemReader(str(path)).read_metadata()
        except _ERRORS as e:
            raise _load_error(path, _load_cause(e, "its .metadata"), e) from e

    def _dcp_load(self, path: Path, state: dict) -> None:
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
        except _ERRORS as e:  # DCP's errors are deep and long; say which checkpoint and why
            raise _load_error(path, _load_cause(e), e) from e

    def _clean_unfinished_saves(self) -> None:
        """At start-up, before any save (the run lock keeps other runs out), rank 0 removes the ``.tmp``
        folders of saves that did not finish, freeing their space. One with ``.metadata`` was
        complete (DCP writes it after every rank's data): stopped before its rename, it is published."""
        if _rank() == 0 and self.folder.is_dir():
            for tmp in sorted(p for p in self.folder.iterdir() if _TMP_DIR.match(p.name)):
                final = self.folder / tmp.name.removesuffix(".tmp")
                if (tmp / ".metadata").is_file() and not (final / ".metadata").is_file():
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(tmp, final)  # the next publish prunes (keep_latest_k)
                    logger.warning(f"published {final}: its save had finished, the run stopped before the rename")
                else:
                    logger.warning(f"skipping incomplete checkpoint {tmp} (a save did not finish): removed it")
                    shutil.rmtree(tmp, ignore_errors=True)
        _barrier()  # every rank then lists the same complete checkpoints

    def preflight(self) -> tuple[Path | None, str | None]:
        """Before anything is written (components/run_folder.py): (the checkpoint ``load`` will resume
        from, or None for a fresh start; why the folder's checkpoint does not fit this model, or None).

        Collective (every rank calls it). With checkpoint.enable off the newest checkpoint is checked
        too: a folder's checkpoints belong to its run. A save that finished before its rename counts,
        as ``load`` publishes it."""
        path = self._resolve_load_path(warn=False) if self.enabled else None  # load() warns
        if path is None:
            steps = self.complete_steps(warn=False)
            finished = [] if not self.folder.is_dir() else sorted(
                (p for p in self.folder.iterdir() if _TMP_DIR.match(p.name) and (p / ".metadata").is_file()),
                key=lambda p: int(_TMP_DIR.match(p.name).group(1)))
            path = self.folder / f"step-{steps[-1]}" if steps else (finished[-1] if finished else None)
        if path is None:
            return None, None
        try:
            metadata = self._read_metadata(path)
        except ValueError:
            if self.enabled:  # the run would load it: its error now, before anything is written
                raise
            return None, None  # not loaded: whether it is this run's, the folder's config tells
        nested = any(k.startswith("model.") for k in metadata.state_dict_metadata)
        try:
            _check_model_matches(path, metadata, self.states["model"].state_dict(), "model." if nested else "")
        except ValueError as e:
            return None, str(e)
        return (path if self.enabled else None), None

    def _resolve_load_path(self, warn: bool = True) -> Path | None:
        complete = self.complete_steps(warn)
        if self.cfg.load_step >= 0:
            path = self.folder / f"step-{self.cfg.load_step}"
            if self.cfg.load_step not in complete:
                why = "has no .metadata (the save did not finish, or the folder is corrupted)" if path.is_dir() \
                    else "does not exist"
                raise ValueError(
                    f"checkpoint.load_step={self.cfg.load_step}: {path} {why}; no complete checkpoint there "
                    f"(complete ones: {complete or 'none'}). Pick one of those or -1 for the latest."
                )
            return path
        return self.folder / f"step-{complete[-1]}" if complete else None

    def complete_steps(self, warn: bool = True) -> list[int]:
        """Steps with a finished checkpoint; incomplete folders are reported and skipped."""
        if not self.folder.is_dir():
            return []
        steps = []
        for entry in sorted(self.folder.iterdir()):
            m = _STEP_DIR.match(entry.name)
            if m and (entry / ".metadata").is_file():
                steps.append(int(m.group(1)))
            elif (entry.name.endswith(".tmp") or m) and warn and _rank() == 0:
                logger.warning(f"skipping incomplete checkpoint {entry} (a save did not finish)")
        return sorted(steps)


def _validate(cfg: CheckpointConfig, states: dict[str, Stateful]) -> None:
    for name, value, allowed in (("async_mode", cfg.async_mode, ASYNC_MODES),
                                 ("interval_type", cfg.interval_type, INTERVAL_TYPES),
                                 ("export_dtype", cfg.export_dtype, EXPORT_DTYPES)):
        if value not in allowed:
            raise ValueError(f"checkpoint.{name} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.keep_latest_k < 0:
        raise ValueError(f"checkpoint.keep_latest_k must be >= 0 (0 = keep all), got {cfg.keep_latest_k}")
    unknown = [k for k in cfg.exclude_from_loading if k not in states]
    if unknown:
        raise ValueError(f"checkpoint.exclude_from_loading: unknown state keys {unknown}; valid: {sorted(states)}")
    if cfg.create_seed_checkpoint and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"checkpoint.create_seed_checkpoint runs on 1 process (world size is {dist.get_world_size()}): "
            f"create the seed with `python train.py ... --checkpoint.create_seed_checkpoint`, then start any layout"
        )


def _load_cause(e: BaseException, what: str = "a file") -> str:
    """A few words for the first line of a load error: what happened to ``what``, if we can tell."""
    inner = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
    for kind, words in ((EOFError, "is truncated"), (FileNotFoundError, "is missing"),
                        (pickle.UnpicklingError, "holds an unsafe or corrupted pickle (refused)")):
        if isinstance(inner, kind):
            return f"{what} {words}"
    return f"{what} is corrupted ({type(inner).__name__})"


def _load_error(path: Path, cause: str, e: BaseException) -> ValueError:
    """A short first line (which checkpoint, what happened, the fix), then the detail: DCP's message
    (one rank's exception, often hundreds of characters) and the folder's files with their sizes."""
    files = ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(path.iterdir()) if f.is_file()) \
        if path.is_dir() else "none"
    return ValueError(
        f"could not load checkpoint {path}: {cause}; load another (checkpoint.load_step) or move it away\n"
        f"cause: {type(e).__name__}: {first_line(e)}\n"
        f"files: {files}\n"
        "if the model or optimizer config changed since the save, restore that config instead"
    )


def _is_full(metadata: Metadata) -> bool:
    """A resumable checkpoint has the train state; model-only ones have flat model FQNs."""
    return any(k.startswith("train_state.") for k in metadata.state_dict_metadata)


def _check_model_matches(path: Path, metadata: Metadata, model_sd: dict, prefix: str) -> None:
    """Refuse a checkpoint whose model tensors differ from this model's, naming the first mismatch.

    Read from ``.metadata`` before loading: DCP's own error would not say which tensor. Pipeline
    stages hold different layers, so the model's name -> global shape map is gathered from every
    rank (every rank then raises the same error).
    """
    ours = {k: list(v.shape) for k, v in model_sd.items()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, ours)
        ours = {k: v for rank_map in every for k, v in rank_map.items()}
    saved = {k[len(prefix):]: list(md.size) for k, md in metadata.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    problems = []
    for k, shape in ours.items():
        if k not in saved:
            problems.append(f"{prefix}{k} {shape} is in the model but not in the checkpoint")
        elif saved[k] != shape:
            problems.append(f"{prefix}{k} has shape {saved[k]} in the checkpoint but {shape} in the model")
    problems += [f"{prefix}{k} {shape} is in the checkpoint but not in the model"
                 for k, shape in saved.items() if k not in ours]
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise ValueError(
            f"checkpoint {path} does not match the model: {problems[0]}{more}. It was saved with another "
            f"model config (model.flavor, model.n_layers, model.dim, vocab): restore that config or choose "
            f"another checkpoint"
        )


def _stop_checkpoint_process() -> None:
    """Ask DCP's checkpoint process (async_with_pinned_mem) to exit now, while the process group it
    joined still exists, rather than being killed by the interpreter's exit handlers.
    ``_CHECKPOINT_PROCESS`` is DCP-internal: tolerate its absence in other torch versions."""
    try:
        from torch.distributed.checkpoint import _async_process_executor as executor
    except ImportError:
        return
    process = getattr(executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        executor._CHECKPOINT_PROCESS = None
        process.__del__()  # sends TERMINATE, joins (5 s), then terminates


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
