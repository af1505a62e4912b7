"""The trainer: named build steps, then one loop that reads top to bottom.

Order of set-up (each a ``build_*`` function below): process group -> mesh ->
tokenizer -> data -> model on the meta device -> parallelize -> materialize and
init -> optimizer -> lr schedule -> checkpoint load -> metrics.
"""

import gc
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.components.checkpoint import BlobState, CheckpointManager, ModelState, OptimizerState
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.optimizer import build_lr_scheduler, build_optimizer
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import dump_config
from torchtitan.datasets.dataloader import build_dataloader
from torchtitan.models.llama import Transformer, build_model_args, get_nparams_and_flops
from torchtitan.models.llama.parallelize import parallelize_llama
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.utils import (
    clip_grad_norm_,
    dist_reduce,
    init_distributed,
    set_determinism,
    shutdown_distributed,
)
from torchtitan.tools.logging import init_logger, logger


@dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self):
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd):
        self.step, self.tokens_seen, self.skipped_steps = sd["step"], sd["tokens_seen"], sd["skipped_steps"]


class StopRequest:
    """SIGTERM (preemption) or the wall-time limit: finish the step, checkpoint, exit 0."""

    def __init__(self, max_seconds: float):
        self.deadline = time.monotonic() + max_seconds if max_seconds > 0 else None
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or (self.deadline is not None and time.monotonic() > self.deadline)


def batch_split(global_bs: int, local_bs: int, dp: int) -> tuple[int, int]:
    """(local batch, gradient accumulation steps) from the global and local batch sizes."""
    if global_bs % dp:
        raise ValueError(
            f"training.global_batch_size={global_bs} does not divide by the data-parallel degree {dp}; "
            f"use a multiple of {dp}"
        )
    local_bs = global_bs // dp if local_bs == -1 else local_bs
    if local_bs <= 0 or global_bs % (local_bs * dp):
        raise ValueError(
            f"training.global_batch_size={global_bs} must be a multiple of local_batch_size={local_bs} x "
            f"data-parallel degree {dp}; gradient accumulation is global / (local x dp)"
        )
    return local_bs, global_bs // (local_bs * dp)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        init_logger()
        os.makedirs(cfg.job.dump_folder, exist_ok=True)
        self.device = init_distributed(cfg.comm, cfg.job.dump_folder)
        self.parallel_dims = self.build_parallel_dims()
        set_determinism(cfg.training.seed, cfg.training.deterministic)
        self.tokenizer = build_tokenizer(cfg.tokenizer.path, cfg.tokenizer.cache_dir)
        self.local_bs, self.accum_steps = batch_split(
            cfg.training.global_batch_size, cfg.training.local_batch_size, self.parallel_dims.dp
        )
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, cfg.training.seq_len, cfg.training.global_batch_size,
            self.parallel_dims.dp_rank, self.parallel_dims.dp, device_type=self.device.type,
        )
        self.model, self.flops_per_token = self.build_model()
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters(), self.device.type)
        self.lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, self.optimizer, cfg.training.steps)
        self.train_state = TrainState()
        self.checkpointer = self.build_checkpointer()
        self.metrics = MetricsLogger(
            cfg.metrics, cfg.job.dump_folder, self.device, self.flops_per_token,
            self.parallel_dims.non_data_parallel_size, cfg.training.steps, is_logging_rank=self.rank == 0,
        )

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    def build_parallel_dims(self) -> ParallelDims:
        p = self.cfg.parallelism
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, torch.distributed.get_world_size())
        dims.build_mesh(self.device.type)
        return dims

    def build_model(self) -> tuple[torch.nn.Module, float]:
        cfg = self.cfg
        args = build_model_args(
            cfg.model.flavor, vocab_size=self.tokenizer.n_words, max_seq_len=cfg.training.seq_len,
            n_layers=cfg.model.n_layers, dim=cfg.model.dim,
        )
        # Built on meta: no memory until the parallel plan has decided what each rank holds.
        with torch.device("meta"):
            model = Transformer(args)
        nparams, flops_per_token = get_nparams_and_flops(model, args, cfg.training.seq_len)
        logger.info(f"model {cfg.model.name} {cfg.model.flavor}: {nparams:,} params, {args}")
        model = parallelize_llama(model, self.parallel_dims, cfg.activation_checkpoint, cfg.compile)
        model.to_empty(device=self.device)
        # The same seed gives the same weights however the model is laid out (see parallelize).
        torch.manual_seed(cfg.training.seed)
        with torch.no_grad():
            model.init_weights()
        model.train()
        return model, flops_per_token

    def build_checkpointer(self) -> CheckpointManager:
        config_path = dump_config(self.cfg, self.cfg.job.dump_folder) if self.rank == 0 else None
        states = {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.lr_scheduler,
            "dataloader": BlobState(self.dataloader),
            "train_state": self.train_state,
        }
        config_toml = config_path.read_text() if config_path else ""
        return CheckpointManager(self.cfg.checkpoint, self.cfg.job.dump_folder, states, config_toml)

    # ---- the loop ----------------------------------------------------------------
    def train(self) -> list[float]:
        """Train to ``training.steps``; returns the losses logged (for tests and notebooks)."""
        cfg = self.cfg.training
        self.train_state.step = self.checkpointer.load()
        data_iter = iter(self.dataloader)
        stop = StopRequest(cfg.max_seconds)
        gc.disable()  # collected every gc_freq steps instead, at the same point on every rank
        gc.collect(1)
        logger.info(
            f"training from step {self.train_state.step} to {cfg.steps}: global batch "
            f"{cfg.global_batch_size} = local {self.local_bs} x accumulation {self.accum_steps} x "
            f"dp {self.parallel_dims.dp}, seq_len {cfg.seq_len}"
        )
        losses = []
        window_losses, window_norms = [], []  # device tensors: no host sync until the log step
        while self.train_state.step < cfg.steps:
            self.train_state.step += 1
            step = self.train_state.step
            if step % cfg.gc_freq == 0:
                gc.collect(1)
            loss, grad_norm, stopping = self.train_step(data_iter, stop.requested())
            window_losses.append(loss)
            window_norms.append(grad_norm)
            if self.metrics.should_log(step):
                losses.append(self.log(step, torch.stack(window_losses).mean(), torch.stack(window_norms).max()))
                window_losses, window_norms = [], []
            if self.checkpointer.should_save(step, cfg.steps) or (stopping and self.checkpointer.enabled):
                self.checkpointer.save(step)
            if stopping:
                logger.info(f"stop requested: stopped cleanly after step {step}")
                break
        self.metrics.close()
        return losses

    def train_step(self, data_iter, stop_requested: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over the global batch; also returns whether every rank must stop now."""
        t0 = time.perf_counter()
        batch = next(data_iter)  # this rank's rows of the global batch: [G/dp, seq_len + 1]
        self.metrics.counters.data_seconds += time.perf_counter() - t0
        loss_sum = torch.zeros((), device=self.device)
        for micro in batch.split(self.local_bs):
            micro = micro.to(self.device, non_blocking=True)
            inputs, labels = micro[:, :-1], micro[:, 1:]
            loss = self.loss_fn(self.model(inputs), labels) / self.accum_steps
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm)
        not_finite, stopping = self._step_flags(loss_sum, grad_norm, stop_requested)
        if not not_finite:
            self.optimizer.step()
        else:
            self._handle_not_finite(loss_sum, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.train_state.tokens_seen += batch.numel() - batch.shape[0]
        self.metrics.counters.tokens += batch.numel() - batch.shape[0]
        self.metrics.counters.steps += 1
        return loss_sum, grad_norm, stopping

    @staticmethod
    def loss_fn(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        # fp32 cross-entropy whatever the compute dtype: bf16 log-softmax over a 128K vocab loses bits.
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(0, 1))

    def _step_flags(self, loss: torch.Tensor, grad_norm: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
        """(non-finite anywhere, stop requested anywhere): one max all-reduce, one host sync.

        Every rank must take the same decision, or the next collective would hang.
        """
        flags = torch.stack([(~torch.isfinite(loss + grad_norm)).float(),
                             torch.tensor(float(stop_requested), device=self.device)])
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        not_finite, stopping = flags.tolist()
        return not_finite > 0, stopping > 0

    def _handle_not_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        step = self.train_state.step
        if not self.cfg.training.skip_nan_inf:
            raise FloatingPointError(
                f"loss or grad norm is not finite at step {step} (loss {loss.item()}, grad norm "
                f"{grad_norm.item()}); lower optimizer.lr, lengthen lr_scheduler.warmup_steps, or set "
                f"training.skip_nan_inf=true to skip such updates"
            )
        self.train_state.skipped_steps += 1
        self.metrics.counters.skipped_steps += 1
        logger.warning(f"step {step}: non-finite loss or grad norm, update skipped")

    def log(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> float:
        """Log the window's mean loss (over steps and ranks) and its largest grad norm.

        The mean over the window, as Megatron logs it, shows the trend; a single step's loss on
        a few documents is noisy. Host syncs live here, on log steps only.
        """
        loss_avg = dist_reduce(loss, "mean")
        record = self.metrics.log(step, loss_avg, grad_norm.item(), self.lr_scheduler.get_last_lr()[0])
        return record["loss"]

    def close(self) -> None:
        shutdown_distributed()
