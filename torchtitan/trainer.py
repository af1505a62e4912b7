"""The trainer: named build steps, then one loop that reads top to bottom.

Order of set-up (each a ``build_*`` function below): process group -> mesh ->
tokenizer -> data -> model on the meta device -> parallelize -> materialize and
init -> optimizer -> lr schedule -> checkpoint load -> metrics.
"""

import contextlib
import gc
import os
import signal
import time
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan.components.checkpoint import BlobState, CheckpointManager, ModelState, OptimizerState
from torchtitan.components.float8 import Float8Training
from torchtitan.components.loss import cross_entropy
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.optimizer import build_lr_scheduler, build_optimizer
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.components.weight_conversion import save_hf_checkpoint
from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import dump_config
from torchtitan.datasets.dataloader import build_dataloader
from torchtitan.models.llama import Transformer, build_model_args, get_nparams_and_flops
from torchtitan.models.llama.parallelize import parallelize_llama
from torchtitan.parallelisms.init import init_model_weights
from torchtitan.parallelisms.context_parallel import ContextParallel
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.pipeline_llama import Pipeline, pipeline_llama
from torchtitan.parallelisms.utils import (
    clip_grad_norm_,
    dist_reduce,
    init_distributed,
    set_determinism,
    set_pg_timeout,
    shutdown_distributed,
)
from torchtitan.tools.logging import init_logger, logger
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
    """SIGTERM (preemption) or the wall-time limit: finish the step, checkpoint, exit 0."""

    def __init__(self, max_seconds: float):
        self.deadline = time.monotonic() + max_seconds if max_seconds > 0 else None
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or (self.deadline is not None and time.monotonic() > self.deadline)


def plain_loss(loss: torch.Tensor) -> torch.Tensor:
    """loss_parallel returns the loss as a replicated DTensor: the same value as a plain tensor."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


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
        self.cp = self.build_context_parallel()
        self.float8 = Float8Training(cfg.float8, self.device, self.parallel_dims.fsdp_enabled)
        self.host_group = self.build_host_group()
        self.pending_check: PendingFiniteCheck | None = None
        self.pipeline: Pipeline | None = None
        if self.parallel_dims.pp_enabled:
            self.pipeline, self.flops_per_token = self.build_pipeline()
            self.model_parts = self.pipeline.model_parts
            self.model = None  # no rank holds the whole model: use model_parts
        else:
            self.model, self.flops_per_token = self.build_model()
            self.model_parts = [self.model]
        self.autocast = self.build_autocast()
        self.optimizer = build_optimizer(cfg.optimizer, self.parameters(), self.device.type)
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

    def build_host_group(self):
        """Host-side agreements (stop requests) need a CPU group: the default one is gloo on CPU;
        on CUDA (NCCL) a gloo group beside it."""
        if self.device.type == "cpu" or torch.distributed.get_world_size() == 1:
            return None
        return torch.distributed.new_group(backend="gloo")

    def build_context_parallel(self) -> ContextParallel | None:
        if not self.parallel_dims.cp_enabled:
            return None
        p = self.cfg.parallelism
        return ContextParallel(
            self.parallel_dims.submesh("cp"), self.cfg.training.seq_len, p.cp_backend, p.cp_rotate_method,
            self.device.type,
        )

    def build_model(self) -> tuple[torch.nn.Module, float]:
        model, flops_per_token = self.build_meta_model()
        return self.parallelize_and_init(model), flops_per_token

    def build_meta_model(self) -> tuple[torch.nn.Module, float]:
        cfg = self.cfg
        if cfg.model.name != "llama3":
            raise ValueError(f"model.name {cfg.model.name!r} is not available; this build has 'llama3'")
        vocab_size = cfg.model.vocab_size or self.tokenizer.n_words
        if vocab_size < self.tokenizer.n_words:
            raise ValueError(
                f"model.vocab_size={vocab_size} is smaller than the tokenizer's {self.tokenizer.n_words} tokens; "
                "use 0 (the tokenizer's size) or a larger value"
            )
        args = build_model_args(
            cfg.model.flavor, vocab_size=vocab_size, max_seq_len=cfg.training.seq_len,
            n_layers=cfg.model.n_layers, dim=cfg.model.dim, n_kv_heads=cfg.model.n_kv_heads,
            attention_backend=cfg.model.attention_backend,
        )
        # Built on meta: no memory until the parallel plan has decided what each rank holds.
        with torch.device("meta"):
            model = Transformer(args)
        nparams, flops_per_token = get_nparams_and_flops(model, args, cfg.training.seq_len)
        self.float8.convert(model)  # before the parallel plan: TP, compile and FSDP see float8 modules
        logger.info(f"model {cfg.model.name} {cfg.model.flavor}: {nparams:,} params, {args}")
        return model, flops_per_token

    def parallelize_and_init(self, model: torch.nn.Module) -> torch.nn.Module:
        """Meta model (or pipeline stage part) -> parallelized, materialized, seeded init."""
        cfg, args = self.cfg, model.model_args
        if self.cp is not None:  # swaps attention modules: before FSDP wraps the blocks
            self.cp.prepare_model(model)
        model = parallelize_llama(
            model, self.parallel_dims, cfg.activation_checkpoint, cfg.compile,
            parallelism=cfg.parallelism, training=cfg.training, experimental=cfg.experimental,
            tp_styles=self.float8.tp_styles(),
        )
        # FSDP CPU offload keeps the sharded parameters in host memory.
        offload = cfg.training.enable_cpu_offload and self.parallel_dims.fsdp_enabled
        model.to_empty(device="cpu" if offload else self.device)
        # The same seed gives the same weights however the model is laid out (see init.py).
        init_model_weights(model, args, cfg.training.seed, self.device)
        if self.cp is not None:
            self.cp.after_init(model)  # keep the RoPE rows of this rank's positions
        model.train()
        return model

    def build_pipeline(self) -> tuple[Pipeline, float]:
        """Split the meta model into this rank's pipeline stages; each part goes through
        ``parallelize_and_init`` like a whole model, so PP composes with TP and FSDP."""
        model, flops_per_token = self.build_meta_model()

        def scaled_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
            # The schedule sums microbatch losses (scale_grads=False): divide so that the sum over
            # microbatches and accumulation steps is the mean over this rank's rows, as without PP.
            return self.loss_fn(logits_BTV, labels_BT) / (self.pipeline.n_microbatches * self.accum_steps)

        pipeline = pipeline_llama(
            model, self.parallel_dims, self.cfg.parallelism, self.local_bs, self.device,
            scaled_loss, self.parallelize_and_init,
        )
        return pipeline, flops_per_token

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter this rank holds (all pipeline stage parts)."""
        return [p for part in self.model_parts for p in part.parameters()]

    def build_autocast(self):
        """bf16 compute without FSDP: autocast (FSDP's MixedPrecisionPolicy does it when sharding)."""
        dtype = self.cfg.training.mixed_precision_param or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype == "float32" or self.parallel_dims.fsdp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype))

    def loss_context(self):
        """With TP loss_parallel the logits are vocab-sharded DTensors: the cross-entropy and its
        backward must both run inside ``loss_parallel()``."""
        if self.parallel_dims.tp_enabled and self.cfg.parallelism.loss_parallel:
            return loss_parallel()
        return contextlib.nullcontext()

    def set_gradient_sync(self, enabled: bool) -> None:
        """FSDP: reduce-scatter only on the last microbatch (gradients accumulate unsharded)."""
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)

    def build_checkpointer(self) -> CheckpointManager:
        config_path = dump_config(self.cfg, self.cfg.job.dump_folder) if self.rank == 0 else None
        states = {
            "model": ModelState(self.model_parts),
            "optimizer": OptimizerState(self.model_parts, self.optimizer),
            "lr_scheduler": self.lr_scheduler,
            "dataloader": BlobState(self.dataloader),
            "train_state": self.train_state,
        }
        config_toml = config_path.read_text() if config_path else ""
        if self.cfg.job.print_config and config_toml:
            logger.info(f"resolved config ({config_path}):\n{config_toml}")
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
                    loss, grad_norm, stopping = self.train_step(data_iter, stop.requested())
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
        self.checkpointer.close()  # an async save still in flight finishes before we return
        if self.cfg.checkpoint.hf_export_folder and self.train_state.step >= cfg.steps:  # not on a stop
            self.export_hf(self.cfg.checkpoint.hf_export_folder)
        self.metrics.close()
        return losses

    def tighten_comm_timeout(self) -> None:
        """comm.init_timeout_seconds covered start-up (rendezvous, checkpoint load, first step);
        from now on collectives time out after comm.train_timeout_seconds."""
        seconds = self.cfg.comm.train_timeout_seconds
        if set_pg_timeout(seconds, groups=self.parallel_dims.mesh.get_all_groups()):
            logger.info(f"collective timeout set to {seconds}s after the first step")

    def export_hf(self, folder: str) -> None:
        """Write the trained model as a HF Llama folder (collective: every rank calls it, rank 0 writes).

        FSDP/TP shards are gathered into full tensors; pipeline stages are gathered to rank 0
        (only the first rank of each stage sends, the other ranks hold copies).
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
        if self.rank == 0:
            path = os.path.join(self.cfg.job.dump_folder, folder)  # an absolute `folder` wins
            save_hf_checkpoint(sd, self.model_parts[0].model_args, path)
            logger.info(f"exported the model in Hugging Face format to {path}")
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()

    def train_step(self, data_iter, stop_requested: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over the global batch; also returns whether every rank must stop now."""
        t0 = time.perf_counter()
        batch = next(data_iter)  # this rank's rows of the global batch: [G/dp, seq_len + 1]
        self.metrics.counters.data_seconds += time.perf_counter() - t0
        if self.pipeline is not None:
            loss_sum = self.pipeline_forward_backward(batch)
        else:
            loss_sum = self.forward_backward(batch)
        pp_group = self.parallel_dims.submesh("pp").get_group() if self.pipeline is not None else None
        grad_norm = clip_grad_norm_(self.parameters(), self.cfg.training.max_norm, pp_group=pp_group)
        not_finite = self._not_finite_anywhere(loss_sum, grad_norm)
        stopping = self._stop_requested_anywhere(stop_requested)
        self.checkpointer.wait_for_staging()  # an async save may still be copying what step() mutates
        if self.cfg.training.skip_nan_inf and not_finite.item():  # decided now: one host sync per step
            self._skip_update()
        else:
            self.check_finite()  # the previous step's flag, read one step late: no device stall
            self.optimizer.step()
            self.float8.after_optimizer_step(self.model_parts)
            self.pending_check = PendingFiniteCheck(self.train_state.step, not_finite, loss_sum, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.train_state.tokens_seen += batch.numel() - batch.shape[0]
        self.metrics.counters.tokens += batch.numel() - batch.shape[0]
        self.metrics.counters.steps += 1
        return loss_sum, grad_norm, stopping

    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's rows, local_bs at a time; returns their mean loss."""
        loss_sum = torch.zeros((), device=self.device)
        micros = batch.split(self.local_bs)
        for i, micro in enumerate(micros):
            self.set_gradient_sync(i == len(micros) - 1)
            micro = micro.to(self.device, non_blocking=True)
            inputs, labels, cp_context = self.context_parallel_split(micro)
            with cp_context:
                with self.autocast:
                    logits = self.model(inputs)
                with self.loss_context():
                    loss = self.loss_fn(logits, labels) / self.accum_steps
                    del logits  # drop our reference before backward: autograd keeps only what it needs
                    loss.backward()
            loss_sum += plain_loss(loss.detach())
        return loss_sum

    def pipeline_forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """The schedule runs once per local batch (n_microbatches each; more calls = gradient
        accumulation). Returns the mean loss over this rank's rows on every pp rank."""
        pipe = self.pipeline
        loss_sum = torch.zeros((), device=self.device)
        for chunk in batch.split(self.local_bs):
            chunk = chunk.to(self.device, non_blocking=True)
            inputs, labels, cp_context = self.context_parallel_split(chunk)
            args = (inputs,) if pipe.has_first_stage else ()
            target = labels if pipe.has_last_stage else None
            losses = []  # scaled microbatch losses; the schedule fills it on the last stage only
            # loss_context wraps the whole step: loss and backward both run inside the schedule.
            with cp_context, self.autocast, self.loss_context():
                pipe.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            for loss in losses:
                loss_sum += plain_loss(loss.detach())
        # Only the last stage has the loss: a sum over pp (others add 0) gives it to every rank.
        torch.distributed.all_reduce(loss_sum, group=self.parallel_dims.submesh("pp").get_group())
        return loss_sum

    def context_parallel_split(self, rows: torch.Tensor):
        """(inputs, labels, context) of [B, seq_len + 1] rows: with CP, this rank's share of the sequence."""
        inputs, labels = rows[:, :-1], rows[:, 1:]
        if self.cp is None:
            return inputs, labels, contextlib.nullcontext()
        return self.cp.batch_context(self.model_parts, inputs.contiguous(), labels.contiguous())

    def loss_fn(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        # fp32 cross-entropy whatever the compute dtype: bf16 log-softmax over a 128K vocab loses bits.
        return cross_entropy(logits_BTV, labels_BT, self.cfg.training.loss_chunk_tokens)

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
            extra={"skipped_steps": self.train_state.skipped_steps, "tokens_seen": self.train_state.tokens_seen},
        )
        return record["loss"]

    def close(self) -> None:
        self.checkpointer.close()  # idempotent; also on the error path: finish the save in flight
        shutdown_distributed()
