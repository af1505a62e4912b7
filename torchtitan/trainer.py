"""The trainer: named build steps, then one loop that reads top to bottom.

Order of set-up (each a ``build_*`` function below): process group -> mesh ->
tokenizer -> data -> model on the meta device -> parallelize -> materialize and
init -> optimizer -> lr schedule -> checkpointer -> validator -> the start accepted (run_folder.py: resume,
fresh start or refusal; nothing is written into the dump folder before) -> metrics. The model is whatever family
``model.name`` names in the registry (components/model_builder.py); the trainer names none.
"""

import dataclasses
import gc
import os
import signal
import time
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.components.auto_batch import OOMRetry, auto_local_batch
from torchtitan.components.checkpoint import BlobState, CheckpointManager, ModelState, OptimizerState
from torchtitan.components.float8 import Float8Training
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.model_builder import BuiltModel, ModelBuilder
from torchtitan.components.moe_monitor import MoEMonitor
from torchtitan.components.optimizer import build_lr_scheduler, build_optimizer
from torchtitan.components.run_folder import accept_start
from torchtitan.components.run_lock import take_run_lock
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.components.train_step import ForwardBackward
from torchtitan.components.validation import Validator, build_validator
from torchtitan.components.weight_conversion import check_hf_export, export_hf_or_keep_weights, hf_export_path
from torchtitan.config.job_config import JobConfig
from torchtitan.config.job_config import Parallelism as ParallelismConfig
from torchtitan.config.manager import config_to_toml
from torchtitan.datasets.dataloader import build_dataloader
from torchtitan.parallelisms.context_parallel import ContextParallel
from torchtitan.parallelisms.parallel_dims import ParallelDims, batch_split  # batch_split: also the planner's
from torchtitan.parallelisms.utils import (
    clip_grad_norm_,
    dist_reduce,
    init_distributed,
    set_determinism,
    set_pg_timeout,
    shutdown_distributed,
)
from torchtitan.tools.cli import Interrupted, exit_now
from torchtitan.tools.launch import LAUNCHER_PID_ENV
from torchtitan.tools.logging import init_logger, logger
from torchtitan.tools.memory_check import check_memory_fits
from torchtitan.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling


@dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self):
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd):
        self.step, self.tokens_seen, self.skipped_steps = sd["step"], sd["tokens_seen"], sd["skipped_steps"]


class PendingFiniteCheck:
    """A step's non-finite flag on its way to the host. On CUDA a non-blocking copy into pinned
    memory and an event: reading it a step later waits for that step only, never for the work
    queued since, so the check costs no stall of the device."""

    def __init__(self, step: int, flag: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        self.event = None
        if flag.device.type == "cuda":
            self.flag = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self.flag.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag = flag

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.flag.item())


class StopRequest:
    """SIGTERM (preemption), Ctrl-C or the wall-time limit: finish the step, checkpoint, stop
    (exit 0; 130 after Ctrl-C). A second Ctrl-C (or Ctrl-C after SIGTERM) exits at once, unsaved."""

    def __init__(self, max_seconds: float):
        self.deadline = time.monotonic() + max_seconds if max_seconds > 0 else None
        self.signal: int | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame):
        # Recorded first: the next signal's handler can run inside this one, between two bytecodes.
        earlier, self.signal = self.signal, self.signal or signum
        if signum == signal.SIGINT and earlier is not None:
            exit_now("stopped: Ctrl-C again: exiting now, without saving", 130, at_once=True)
        if signum == signal.SIGINT and not os.environ.get(LAUNCHER_PID_ENV):  # the launcher says it itself
            # os.write: a signal handler must not take the logging lock the loop may hold.
            os.write(2, b"Ctrl-C: finishing this step, then saving a checkpoint (when checkpointing is on) "
                        b"and stopping; Ctrl-C again exits at once, without saving\n")

    def requested(self) -> bool:
        return self.signal is not None or (self.deadline is not None and time.monotonic() > self.deadline)

    @property
    def interrupted(self) -> bool:
        return self.signal == signal.SIGINT


def resolve_batch_split(cfg: JobConfig, dims: ParallelDims, device: torch.device, vocab_size: int) -> tuple[int, int]:
    """``batch_split`` of the config; local_batch_size = 0 (auto) picks the local batch from the memory estimate."""
    t = cfg.training
    local_bs = t.local_batch_size
    if local_bs == 0:
        batch_split(t.global_batch_size, -1, dims.dp)  # the global batch must split over dp first
        local_bs = auto_local_batch(cfg, dims, device, vocab_size)
    return batch_split(t.global_batch_size, local_bs, dims.dp)


def build_parallel_dims(p: ParallelismConfig, device_type: str) -> ParallelDims:
    """The degrees of ``[parallelism]`` checked against the world size, and the one mesh."""
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, torch.distributed.get_world_size(), ep=p.ep)
    dims.build_mesh(device_type)
    logger.info(dims.layout_line())
    return dims


def build_context_parallel(cfg: JobConfig, dims: ParallelDims, device_type: str) -> ContextParallel | None:
    if not dims.cp_enabled:
        return None
    p = cfg.parallelism
    return ContextParallel(dims.submesh("cp"), cfg.training.seq_len, p.cp_backend, p.cp_rotate_method, device_type)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        init_logger()
        os.makedirs(cfg.job.dump_folder, exist_ok=True)
        self.device = init_distributed(cfg.comm, cfg.job.dump_folder)
        # Before anything is written into the folder: a second live run stops here, on every rank.
        self.run_lock = take_run_lock(cfg.job.dump_folder, cfg.job.lock, cfg.job.lock_timeout_seconds)
        self.parallel_dims = self.build_parallel_dims()
        set_determinism(cfg.training.seed, cfg.training.deterministic)
        self.tokenizer = build_tokenizer(cfg.tokenizer.path, cfg.tokenizer.cache_dir)
        check_hf_export(cfg.checkpoint.hf_export_folder, cfg.job.dump_folder, self.tokenizer)  # not after training
        self.local_bs, self.accum_steps = self.build_batch_split()
        # Before anything sized by the config is allocated: a run that cannot fit fails now, in one line.
        check_memory_fits(cfg, self.parallel_dims, self.device, self.local_bs, self.accum_steps, self.tokenizer.n_words)
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, cfg.training.seq_len, cfg.training.global_batch_size,
            self.parallel_dims.dp_rank, self.parallel_dims.dp, device_type=self.device.type,
        )
        self.cp = self.build_context_parallel()
        if cfg.model.attention_backend == "flex" and self.device.type != "cuda":
            raise ValueError(
                f"model.attention_backend='flex' trains on CUDA only (FlexAttention has no {self.device.type} "
                "backward); use 'auto', which takes the SDPA path with a document mask here"
            )
        self.float8 = Float8Training(cfg.float8, self.device, self.parallel_dims.fsdp_enabled)
        self.host_group = self.build_host_group()
        self.pending_check: PendingFiniteCheck | None = None
        self.oom_retry = OOMRetry(cfg.training.oom_retry and not self.parallel_dims.pp_enabled, self.host_group)
        self.step_fn = ForwardBackward(
            cfg.training, self.parallel_dims, self.device, self.cp, self.local_bs, self.accum_steps,
            cfg.parallelism.loss_parallel, attention_mask=cfg.model.attention_mask, positions=cfg.model.positions,
        )
        self.built = self.build_model()
        self.step_fn.attach(self.built)
        self.model_parts = self.built.parts
        self.flops_per_token = self.built.flops_per_token
        self.moe_monitor = MoEMonitor.for_model(self.model_parts, self.built.args, self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.parameters(), self.device.type)
        self.lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, self.optimizer, cfg.training.steps)
        self.train_state = TrainState()
        self.checkpointer = self.build_checkpointer()
        self.validator = self.build_validator()
        # Every check passed: only now may this start use the folder (a refused one leaves it as it was);
        # resume or fresh start, and the run's config.toml, provenance.json and run.json are written.
        self.run_id = accept_start(cfg, self.checkpointer, self.parallel_dims.describe())
        self.metrics = MetricsLogger(
            cfg.metrics, cfg.job.dump_folder, self.device, self.flops_per_token,
            self.parallel_dims.non_data_parallel_size, cfg.training.steps, is_logging_rank=self.rank == 0,
            run_config=dataclasses.asdict(cfg), run_id=self.run_id,
        )

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    def build_parallel_dims(self) -> ParallelDims:
        return build_parallel_dims(self.cfg.parallelism, self.device.type)

    def build_batch_split(self) -> tuple[int, int]:
        return resolve_batch_split(self.cfg, self.parallel_dims, self.device, self.tokenizer.n_words)

    def build_host_group(self):
        """Host-side agreements (stop requests) need a CPU group: the default one is gloo on CPU;
        on CUDA (NCCL) a gloo group beside it."""
        if self.device.type == "cpu" or torch.distributed.get_world_size() == 1:
            return None
        return torch.distributed.new_group(backend="gloo")

    def build_context_parallel(self) -> ContextParallel | None:
        return build_context_parallel(self.cfg, self.parallel_dims, self.device.type)

    def build_model(self) -> BuiltModel:
        """The registered family's model (or this rank's pipeline stages), parallelized and initialized."""
        builder = ModelBuilder(self.cfg, self.parallel_dims, self.device, self.cp, self.float8)
        return builder.build(self.tokenizer.n_words, self.local_bs, self.step_fn.pipeline_loss)

    def build_validator(self) -> Validator | None:
        """The held-out loss between steps (``[validation]``), on loaders of its own."""
        return build_validator(self.cfg.validation, self.cfg.data, self.tokenizer, self.cfg.training.seq_len,
                               self.parallel_dims, self.step_fn, self.model_parts, self.device, self.local_bs)

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter this rank holds (all pipeline stage parts)."""
        return [p for part in self.model_parts for p in part.parameters()]

    def build_checkpointer(self) -> CheckpointManager:
        states = {
            "model": ModelState(self.model_parts),
            "optimizer": OptimizerState(self.model_parts, self.optimizer),
            "lr_scheduler": self.lr_scheduler,
            "dataloader": BlobState(self.dataloader),
            "train_state": self.train_state,
        }
        config_toml = config_to_toml(self.cfg) if self.rank == 0 else ""  # into every checkpoint (rank 0 publishes)
        if self.cfg.job.print_config and config_toml:
            logger.info(f"resolved config (written to <dump_folder>/config.toml once the start is accepted):\n"
                        f"{config_toml}")
        return CheckpointManager(self.cfg.checkpoint, self.cfg.job.dump_folder, states, config_toml,
                                 timeout_s=self.cfg.comm.init_timeout_seconds)

    # ---- the loop ----------------------------------------------------------------
    def train(self) -> list[float]:
        """Train to ``training.steps``; returns the losses logged (for tests and notebooks)."""
        cfg = self.cfg.training
        if self.cfg.checkpoint.create_seed_checkpoint:  # step-0 with the fresh weights, then exit
            self.checkpointer.create_seed_checkpoint()
            return []
        self.train_state.step = self.checkpointer.load()
        data_iter = iter(self.dataloader)
        stop = StopRequest(cfg.max_seconds)
        started = time.monotonic()
        gc.disable()  # collected every gc_freq steps instead, at the same point on every rank
        gc.collect(1)
        logger.info(
            f"training from step {self.train_state.step} to {cfg.steps}: global batch "
            f"{cfg.global_batch_size} = local {self.local_bs} x accumulation {self.accum_steps} x "
            f"dp {self.parallel_dims.dp}, seq_len {cfg.seq_len}"
        )
        losses = []
        window_losses, window_norms = [], []  # device tensors: no host sync until the log step
        first_step = self.train_state.step + 1
        prof_cfg, dump = self.cfg.profiling, self.cfg.job.dump_folder
        with maybe_enable_profiling(prof_cfg, dump, self.train_state.step) as profiler, \
                maybe_enable_memory_snapshot(prof_cfg, dump, self.train_state.step, self.device) as mem_snapshot:
            while self.train_state.step < cfg.steps:
                self.train_state.step += 1
                step = self.train_state.step
                if step % cfg.gc_freq == 0:
                    gc.collect(1)
                try:
                    loss, grad_norm, stopping = self.train_step(data_iter, stop.requested)
                except torch.OutOfMemoryError:
                    mem_snapshot.dump_on_oom()  # what filled the memory, before the error unwinds
                    raise
                if step == first_step:  # start-up is over: a hung collective should now fail fast
                    self.tighten_comm_timeout()
                window_losses.append(loss)
                window_norms.append(grad_norm)
                log = self.metrics.should_log(step)
                save = self.checkpointer.should_save(step, cfg.steps) or (stopping and self.checkpointer.enabled)
                if log or save or stopping or step == cfg.steps:
                    self.check_finite()  # this step's result is read or kept: it must be finite
                # Not on a stop request (a preemption's grace period is short), unless it is the last step.
                if self.validator is not None and self.validator.should_run(step, cfg.steps) and (
                        not stopping or step == cfg.steps):
                    self.metrics.record_validation(step, self.validator.run(), merge=log)
                if log:
                    losses.append(self.log(step, torch.stack(window_losses).mean(), torch.stack(window_norms).max()))
                    window_losses, window_norms = [], []
                if save:
                    self.checkpointer.save(step, final=step == cfg.steps)
                profiler.step()
                mem_snapshot.step()
                if stopping:
                    logger.info(f"stop requested: stopped cleanly after step {step}")
                    break
        self.finish(stop, first_step, time.monotonic() - started)
        return losses

    def finish(self, stop: StopRequest, first_step: int, seconds: float) -> None:
        """After the loop: the save in flight, the HF export (not on a stop), the run summary; after
        a Ctrl-C, ``Interrupted`` (train.py exits 130 with its line; 0 for a rank under a launcher)."""
        self.checkpointer.close()  # an async save still in flight finishes before we return
        exported = bool(self.cfg.checkpoint.hf_export_folder) and self.train_state.step >= self.cfg.training.steps
        if exported:
            self.export_hf(self.cfg.checkpoint.hf_export_folder)
        self.metrics.close()
        if self.rank == 0:
            self.log_summary(first_step, seconds, exported)
        if stop.interrupted:
            saved = f"; checkpoint step-{self.checkpointer.last_saved_step} saved" if self.checkpointer.enabled else ""
            raise Interrupted(f"Ctrl-C: stopped cleanly after step {self.train_state.step}{saved}", clean=True)

    def log_summary(self, first_step: int, seconds: float, exported: bool) -> None:
        """A few lines at the end of the run: what it did, and where everything it wrote is."""
        cfg, latest, dump = self.cfg, self.metrics.latest(), self.cfg.job.dump_folder
        steps = self.train_state.step - first_step + 1
        tokens = steps * cfg.training.global_batch_size * cfg.training.seq_len
        losses = [f"final loss {latest['loss']:.4f} (step {latest['step']})"] if "loss" in latest else []
        if "val_loss" in latest:
            losses.append(f"validation loss {latest['val_loss']:.4f} (step {latest['val_step']})")
        metrics = os.path.join(dump, "metrics.jsonl")
        where = [f"metrics {metrics} (plot: python scripts/plot_metrics.py {metrics} -> "
                 f"{os.path.splitext(metrics)[0]}.png)"]
        if self.checkpointer.enabled and self.checkpointer.last_saved_step >= 0:
            where.insert(0, f"checkpoint {self.checkpointer.folder / f'step-{self.checkpointer.last_saved_step}'}")
        elif not self.checkpointer.enabled:
            where.insert(0, "no checkpoints (checkpoint.enable is off)")
        if exported:
            where.append(f"Hugging Face export {hf_export_path(dump, cfg.checkpoint.hf_export_folder)}")
        logger.info(f"run summary: {steps} steps ({first_step}-{self.train_state.step} of {cfg.training.steps}) "
                    f"in {_clock(seconds)}, {tokens:,} tokens; " + ", ".join(losses or ["no loss logged"]))
        logger.info("run summary: " + "; ".join(where))

    def tighten_comm_timeout(self) -> None:
        """comm.init_timeout_seconds covered start-up (rendezvous, checkpoint load, first step);
        from now on collectives time out after comm.train_timeout_seconds."""
        if self.parallel_dims.world_size == 1:  # no collectives to time out: nothing to set or say
            return
        seconds = self.cfg.comm.train_timeout_seconds
        if set_pg_timeout(seconds, groups=self.parallel_dims.mesh.get_all_groups()):
            logger.info(f"collective timeout set to {seconds}s after the first step")

    def export_hf(self, folder: str) -> None:
        """Write the trained model as a Hugging Face folder of its family (collective: every rank calls it, rank 0 writes).

        FSDP/TP shards are gathered into full tensors; pipeline stages are gathered to rank 0
        (only the first rank of each stage sends, the other ranks hold copies). A failed export
        keeps the weights (this step's checkpoint, else <dump>/final_weights) and raises on every rank.
        """
        pp = self.parallel_dims.pp_enabled
        # cpu_offload keeps full tensors on global rank 0 only: with PP each stage needs its own.
        options = StateDictOptions(full_state_dict=True, cpu_offload=not pp)
        sd = {}
        for part in self.model_parts:
            sd.update({k: v.cpu() for k, v in get_model_state_dict(part, options=options).items()})
        if pp:
            sends = all(self.parallel_dims.coordinate(dim) == 0 for dim in ("dp", "cp", "tp"))
            parts = [None] * torch.distributed.get_world_size() if self.rank == 0 else None
            torch.distributed.gather_object(sd if sends else {}, parts, dst=0)
            sd = {k: v for part in parts for k, v in part.items()} if self.rank == 0 else {}
        error = [None]
        if self.rank == 0:
            path, dump = hf_export_path(self.cfg.job.dump_folder, folder), self.cfg.job.dump_folder
            saved = self.checkpointer.folder / f"step-{self.train_state.step}"
            error[0] = export_hf_or_keep_weights(sd, self.built.args, path, self.tokenizer, dump,
                                                 saved if (saved / ".metadata").is_file() else None)
            if error[0] is None:
                logger.info(f"exported the model in Hugging Face format to {path}")
        if torch.distributed.get_world_size() > 1:  # every rank fails with rank 0's error, none waits
            torch.distributed.broadcast_object_list(error, src=0, group=self.host_group)
        if error[0] is not None:
            raise ValueError(error[0])

    def train_step(self, data_iter, stop_requested) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over the global batch; also returns whether every rank must stop now.

        ``stop_requested``: a bool, or a callable read after forward and backward, so a stop
        signal that arrives during this step stops after it."""
        t0 = time.perf_counter()
        batch = next(data_iter)  # this rank's rows of the global batch: [G/dp, seq_len + 1]
        self.metrics.counters.data_seconds += time.perf_counter() - t0
        loss_sum = self.oom_retry(self.step_fn, batch)  # in the first steps: an OOM lowers the local batch
        pp_group = self.parallel_dims.submesh("pp").get_group() if self.parallel_dims.pp_enabled else None
        grad_norm = clip_grad_norm_(self.parameters(), self.cfg.training.max_norm, pp_group=pp_group)
        not_finite = self._not_finite_anywhere(loss_sum, grad_norm)
        stopping = self._stop_requested_anywhere(stop_requested() if callable(stop_requested) else stop_requested)
        self.checkpointer.wait_for_staging()  # an async save may still be copying what step() mutates
        if self.cfg.training.skip_nan_inf and not_finite.item():  # decided now: one host sync per step
            self._skip_update()
        else:
            self.check_finite()  # the previous step's flag, read one step late: no device stall
            self.optimizer.step()
            self.float8.after_optimizer_step(self.model_parts)
            self.pending_check = PendingFiniteCheck(self.train_state.step, not_finite, loss_sum, grad_norm)
        if self.moe_monitor is not None:  # routing counts of this step; the balancing bias moves
            self.moe_monitor.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        tokens = batch["tokens"].numel() - batch["tokens"].shape[0]  # inputs: each row's last token is a label only
        self.train_state.tokens_seen += tokens
        self.metrics.counters.tokens += tokens
        self.metrics.counters.steps += 1
        return loss_sum, grad_norm, stopping

    def _not_finite_anywhere(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A device flag, the same on every rank (a MAX all-reduce, no host sync): every rank must
        take the same decision, or the next collective would hang."""
        flag = (~torch.isfinite(loss + grad_norm)).to(torch.int32)
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def _stop_requested_anywhere(self, requested: bool) -> bool:
        """SIGTERM or the time limit on any rank stops all: a host-side all-reduce (gloo), which
        never waits for the device."""
        if torch.distributed.get_world_size() == 1:
            return requested
        flag = torch.tensor([int(requested)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(flag.item())

    def check_finite(self) -> None:
        """Raise if the last recorded step had a non-finite loss or grad norm (it names that step).

        Called each step for the previous one, and for the current one before anything reads or
        saves its result (log, checkpoint, end of training)."""
        pending, self.pending_check = self.pending_check, None
        if pending is None or not pending.read():
            return
        raise FloatingPointError(
            f"loss or grad norm is not finite at step {pending.step} (loss {pending.loss.item()}, grad norm "
            f"{pending.grad_norm.item()}); lower optimizer.lr, lengthen lr_scheduler.warmup_steps, or set "
            f"training.skip_nan_inf=true to skip such updates"
        )

    def _skip_update(self) -> None:
        self.train_state.skipped_steps += 1
        logger.warning(f"step {self.train_state.step}: non-finite loss or grad norm, update skipped")

    def log(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> float:
        """Log the window's mean loss (over steps and ranks) and its largest grad norm.

        The mean over the window, as Megatron logs it, shows the trend; a single step's loss on
        a few documents is noisy. Host syncs live here, on log steps only.
        """
        loss_avg = dist_reduce(loss, "mean")
        record = self.metrics.log(
            step, loss_avg, grad_norm.item(), self.lr_scheduler.get_last_lr()[0],
            extra={"skipped_steps": self.train_state.skipped_steps, "tokens_seen": self.train_state.tokens_seen,
                   **(self.moe_monitor.metrics() if self.moe_monitor is not None else {})},
        )
        return record["loss"]

    def close(self) -> None:
        try:
            self.checkpointer.close()  # idempotent; also on the error path: finish the save in flight
        finally:
            if self.run_lock is not None:  # after the last save: the folder is free for the next run
                self.run_lock.release()
        shutdown_distributed()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
