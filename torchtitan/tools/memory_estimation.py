"""Per-device peak memory of a training config, estimated without allocating the model.

How: a fake process group (world size = NGPU x NNODES, rank 0's view) and ``FakeTensorMode``;
the model, optimizer and lr schedule are built by the trainer's public build functions
(``build_parallel_dims``, ``ModelBuilder.build``: the family's parallel plan -> ``to_empty``,
without weight init), then two train steps (the first untracked) run the trainer's own
``ForwardBackward`` + clip + optimizer step on fake tensors with the configured local batch,
accumulation and seq_len. Two steps, because the optimizer state only exists from the first
``optimizer.step()`` on: the second step is the steady state.

Methods, named in the output:
- ``FSDPMemTracker``: FSDP/HSDP layouts without TP/PP/CP (tracks sharded/unsharded params,
  grads, optimizer state, activations and temporaries at the peak);
- ``MemTracker``: one process with ``disable_fake_mode`` (real tensors);
- ``analytic``: everything else (TP, PP, CP, EP, DDP, one process on fake tensors), or when a
  tracker fails: the planner's accounting (torchtitan/planner/memory.py, shared with scripts/plan.py
  and the automatic micro-batch) of the model args the trainer builds -- parameter counts exact
  per sharding class, activations from a per-block formula checked against measured runs.

Measuring a real run for comparison (``measure_real_peak``): ``torch.cuda.max_memory_allocated``
on CUDA; on CPU, torch.profiler allocation events (``profile_memory=True``). The CPU allocator
reports each allocation and free with the running total of bytes allocated since profiling
started, so starting the profiler before the Trainer materializes the model gives the live
tensor bytes of the run at every moment -- the same quantity the estimator tracks, without
the Python/torch runtime that the process RSS adds (hundreds of MB).

What a config needs that the estimate does without (each said in a note of the output):
- the tokenizer: only its size matters (``planner.vocab.run_vocab``, the planner's rule too).
  ``model.vocab_size`` if set, else the tokenizer's (as training; the embedded one's size without
  building it), else -- no tokenizer file yet, as for the shipped Llama 3 configs -- the flavor's
  own vocab_size (Llama 3: 128256);
- ``compile.enable``: estimated eager (inductor under fake tensors crashes natively, torch 2.13 CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from torchtitan.components.float8 import Float8Training
from torchtitan.components.model_builder import BuiltModel, ModelBuilder
from torchtitan.components.optimizer import build_lr_scheduler, build_optimizer
from torchtitan.components.train_step import ForwardBackward
from torchtitan.config.job_config import JobConfig
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.parallelisms.utils import clip_grad_norm_, device_type
from torchtitan.planner.vocab import run_vocab
from torchtitan.tools.logging import logger

GIB = 1024**3
STEPS = 2  # step 1 creates the optimizer state; step 2 is the steady state

# Tracker reference types (FSDPMemTracker's and MemTracker's names) -> our categories.
_CATEGORY_OF = {
    "Sharded Param": "params", "Unsharded Param": "params", "Parameter": "params", "Buffer": "params",
    "Sharded Grad": "grads", "Unsharded Grad": "grads", "Gradient": "grads",
    "OptState": "optimizer", "Optstate": "optimizer",
}  # fmt: skip
# Everything else (Activation, Temp, All Gather, Reduce Scatter, Inputs, Other) -> activations.
CATEGORIES = ("params", "grads", "optimizer", "activations")


@dataclass
class MemoryEstimate:
    """Bytes per device at the peak, by category (activations include backward temporaries
    and FSDP all-gather / reduce-scatter buffers)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    total: int
    method: str
    world_size: int
    layout: str
    notes: list[str] = field(default_factory=list)

    def table(self, title: str = "estimate") -> str:
        rows = [f"{'':<12}{title:>12}"]
        for name in (*CATEGORIES, "total"):
            rows.append(f"{name:<12}{getattr(self, name) / GIB:>12.4f}")
        head = f"per-device peak memory (GiB), method: {self.method}, world size {self.world_size}, {self.layout}"
        return "\n".join([head, *rows, *(f"note: {n}" for n in self.notes)])

    def to_dict(self) -> dict:
        return asdict(self)


def categorize(snapshot: dict[str, int], method: str, world_size: int, layout: str) -> MemoryEstimate:
    """A tracker snapshot (reference type -> bytes, plus 'Total') as a MemoryEstimate."""
    sums = dict.fromkeys(CATEGORIES, 0)
    for ref, nbytes in snapshot.items():
        if ref != "Total":
            sums[_CATEGORY_OF.get(ref, "activations")] += nbytes
    return MemoryEstimate(**sums, total=sum(sums.values()), method=method, world_size=world_size, layout=layout)


# ---- building the trainer's pieces on a fake process group --------------------------------


def init_fake_process_group(world_size: int) -> None:
    """Rank 0 of a fake group: collectives are no-ops, so one process sees rank 0's shapes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("memory estimation needs its own (fake) process group; one is already initialized")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def layout_of(dims) -> str:
    return (f"dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} cp={dims.cp} "
            f"tp={dims.tp} pp={dims.pp} ep={dims.ep}")  # fmt: skip


@dataclass
class EstimateRun:
    """The trainer's pieces a train step needs, built by the trainer's public build functions."""

    cfg: JobConfig
    device: torch.device
    parallel_dims: object
    vocab_size: int
    local_bs: int
    accum_steps: int
    step_fn: ForwardBackward
    built: BuiltModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    float8: Float8Training
    microbatch_hooks: list = field(default_factory=list)  # called before every microbatch
    vocab_source: str = ""  # where vocab_size came from (a note of the estimate)

    @property
    def model(self):
        return self.built.model

    @property
    def model_parts(self):
        return self.built.parts

    @property
    def pipeline(self):
        return self.built.pipeline


def build_run(cfg: JobConfig, device: torch.device, tensor_mode=contextlib.nullcontext) -> EstimateRun:
    """Layout, batch split, model (no weight init: values do not change memory, and fake tensors
    have none to draw), optimizer and lr schedule, exactly as the trainer builds them. The model
    and optimizer are built under ``tensor_mode()`` (FakeTensorMode); the mesh is not."""
    from torchtitan.trainer import build_context_parallel, build_parallel_dims, resolve_batch_split

    dims = build_parallel_dims(cfg.parallelism, device.type if device.type != "meta" else device_type())
    vocab, vocab_source = run_vocab(cfg)  # the planner's lookup: one rule for both
    if cfg.training.local_batch_size == 0 and not cfg.training.memory_limit_gib and device_type() != "cuda":
        raise ValueError("training.local_batch_size = 0 (auto) sizes the batch for the device's memory; to estimate "
                         "it here set training.memory_limit_gib to the target GPU's (e.g. 80), or a local batch")
    local_bs, accum = resolve_batch_split(cfg, dims, torch.device(device_type()), vocab)
    cp = build_context_parallel(cfg, dims, device.type)
    float8 = Float8Training(cfg.float8, device, dims.fsdp_enabled)
    hooks: list = []
    step_fn = ForwardBackward(cfg.training, dims, device, cp, local_bs, accum, cfg.parallelism.loss_parallel,
                              before_microbatch=lambda enabled: [h() for h in hooks],
                              attention_mask=cfg.model.attention_mask, positions=cfg.model.positions)
    with tensor_mode():
        built = ModelBuilder(cfg, dims, device, cp, float8, init_weights=False).build(
            vocab, local_bs, step_fn.pipeline_loss)
        step_fn.attach(built)
        params = [p for part in built.parts for p in part.parameters()]
        optimizer = build_optimizer(cfg.optimizer, params, device.type)
        lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.training.steps)
    return EstimateRun(cfg, device, dims, vocab, local_bs, accum, step_fn, built, optimizer, lr_scheduler, float8,
                       hooks, vocab_source)


def eager_config(cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """``cfg`` with compile.enable off (and async TP, which needs it), and the note saying so.

    Compiling under FakeTensorMode crashes natively (Segmentation fault in inductor, torch 2.13
    CPU, after a minute of compiling). Params, grads and optimizer state do not depend on compile;
    compiled blocks usually keep fewer activations (fused intermediates), so eager errs high.
    """
    if not cfg.compile.enable:
        return cfg, []
    exp = cfg.experimental
    also = ""
    if exp.enable_async_tensor_parallel:
        exp = dataclasses.replace(exp, enable_async_tensor_parallel=False)
        also = " and without async TP (it needs compile)"
    eager = dataclasses.replace(cfg, compile=dataclasses.replace(cfg.compile, enable=False), experimental=exp)
    note = (f"compile.enable: estimated eager{also}; compiled blocks keep the same params, grads and optimizer "
            f"state and usually fewer activations (inductor fuses intermediates away)")
    return eager, [note]


def fake_batch(t: EstimateRun) -> dict[str, torch.Tensor]:
    """This rank's rows of one global batch: [local_bs x accumulation, seq_len + 1] token ids and
    their in-document positions (one document per row)."""
    rows, window = t.local_bs * t.accum_steps, t.cfg.training.seq_len + 1
    return {"tokens": torch.randint(0, t.vocab_size, (rows, window)),
            "positions": torch.arange(window).expand(rows, -1).contiguous()}


def run_train_steps(t: EstimateRun, steps: int) -> None:
    """The trainer's step: forward + backward, clip, optimizer step (no finite check: a host read)."""
    pp_group = t.parallel_dims.submesh("pp").get_group() if t.parallel_dims.pp_enabled else None
    params = [p for part in t.model_parts for p in part.parameters()]
    for _ in range(steps):
        t.step_fn(fake_batch(t))
        clip_grad_norm_(params, t.cfg.training.max_norm, pp_group=pp_group)
        t.optimizer.step()
        t.float8.after_optimizer_step(t.model_parts)
        t.optimizer.zero_grad(set_to_none=True)
        t.lr_scheduler.step()


# ---- methods ----------------------------------------------------------------------------


def _device() -> torch.device:
    return torch.device("cuda", 0) if device_type() == "cuda" else torch.device("cpu")


def pick_method(dims, fake: bool) -> str:
    # EP: the all-to-all's split sizes are token counts, which fake tensors do not have.
    if dims.tp_enabled or dims.pp_enabled or dims.cp_enabled or dims.ep_enabled:
        return "analytic"
    if dims.fsdp_enabled:
        return "FSDPMemTracker"
    # One process: torch 2.13's to_empty cannot swap plain meta parameters for fake ones
    # (the fake-tensor converter holds a weakref), so MemTracker runs on real tensors only.
    # DDP: its C++ reducer buckets are invisible to the trackers.
    return "MemTracker" if dims.dp_replicate == 1 and not fake else "analytic"


def tracked_estimate(t, method: str) -> MemoryEstimate:
    """Peak of a steady-state train step as seen by FSDPMemTracker / MemTracker.

    The first step (which creates the optimizer state) runs before the tracker: under
    FakeTensorMode the tracker books that step's lazily created state several times over
    (torch 2.13: ~7x the parameter shard at the peak, not seen on real tensors). Its real
    peak is never above the second step's (same optimizer-step peak, no state in backward).
    """
    run_train_steps(t, STEPS - 1)
    if method == "FSDPMemTracker":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(t.model, t.optimizer)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(t.model, t.optimizer)
    # Before every microbatch's forward: the trackers refuse a second root forward
    # (gradient accumulation) unless the per-module stats are cleared.
    t.microbatch_hooks.append(tracker.reset_mod_stats)
    with tracker:
        run_train_steps(t, 1)
    peak = tracker.get_tracker_snapshot("peak")
    snap = peak.get(t.device) or next(iter(peak.values()))
    return categorize(snap, method, dist.get_world_size(), layout_of(t.parallel_dims))


def analytic_estimate(t, reason: str = "") -> MemoryEstimate:
    """Rank 0's peak by the planner's accounting (torchtitan/planner/memory.py: the one shared by
    scripts/plan.py and ``training.local_batch_size = 0``) for this run's model args and layout.

    Categories as the trackers name them: what FSDP gathers goes to params (parameters) and grads
    (unsharded gradients, a third of it), DDP's buckets to grads.
    """
    from torchtitan.planner.layout import Layout, ModelShape
    from torchtitan.planner.memory import compute_width, peak_memory

    cfg, dims = t.cfg, t.parallel_dims
    shape = ModelShape.from_args(cfg.model.name, cfg.model.flavor, t.built.args)
    layout = Layout.from_config(cfg, dims.world_size, t.local_bs, t.accum_steps, dims)
    width = compute_width(cfg.training.mixed_precision_param, device_type())
    m = peak_memory(shape, layout, cfg.training.seq_len, width, pp_rank=0,
                    loss_chunk_tokens=cfg.training.loss_chunk_tokens)
    gathered_params = 2 * m.other // 3 if dims.fsdp_enabled else 0
    est = MemoryEstimate(
        params=m.params + gathered_params, grads=m.grads + m.other - gathered_params, optimizer=m.optimizer,
        activations=m.activations, total=m.total, method="analytic", world_size=dist.get_world_size(),
        layout=layout_of(dims),
    )
    if reason:
        est.notes.append(reason)
    return est


# ---- entry points -------------------------------------------------------------------------


def estimate_memory(cfg: JobConfig, world_size: int, fake: bool | None = None) -> MemoryEstimate:
    """Rank 0's peak memory for ``cfg`` at ``world_size``; ``fake=False`` uses real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = not cfg.memory_estimation.disable_fake_mode if fake is None else fake
    cfg, notes = eager_config(cfg)
    init_fake_process_group(world_size)
    try:
        p = cfg.parallelism
        method = pick_method(ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, world_size, ep=p.ep), fake)
        if method == "analytic":
            t = build_run(cfg, torch.device("meta"))
            est = analytic_estimate(t, f"analytic model for {layout_of(t.parallel_dims)}")
        else:
            mode = FakeTensorMode() if fake else contextlib.nullcontext()
            t = build_run(cfg, _device(), lambda: mode)
            with mode:
                try:
                    est = tracked_estimate(t, method)
                except Exception as e:  # the trackers are private torch tools: never fatal
                    logger.warning(f"{method} failed ({type(e).__name__}: {e}); using the analytic model")
                    est = analytic_estimate(t, f"{method} failed: {type(e).__name__}: {e}")
        if not fake:
            est.notes.append("disable_fake_mode: real tensors on a fake process group")
        steps = f", peak of train step {STEPS} of {STEPS}" if est.method != "analytic" else ""
        est.notes.append(
            f"local batch {t.local_bs} x accumulation {t.accum_steps}, seq_len {cfg.training.seq_len}{steps}"
        )
        est.notes += [t.vocab_source, *notes]
        return est
    finally:
        dist.destroy_process_group()


def run_estimation(cfg: JobConfig, world_size: int, json_out: str = "") -> MemoryEstimate:
    """Estimate, print the table, and optionally write it as JSON (the train.py hook calls this)."""
    start = time.perf_counter()
    est = estimate_memory(cfg, world_size)
    print(est.table(), flush=True)
    logger.info(f"memory estimate took {time.perf_counter() - start:.1f}s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(est.to_dict(), f, indent=1)
    return est


def run_estimation_from_launcher(cfg: JobConfig) -> MemoryEstimate | None:
    """``train.py`` with ``memory_estimation.enable``: the world size is the launched one
    (torchrun's WORLD_SIZE = NGPU x NNODES); rank 0 estimates alone, the other ranks exit."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    return run_estimation(cfg, int(os.environ.get("WORLD_SIZE", 1)))


# ---- measuring a real run (for the accuracy check) -----------------------------------------


class TensorPeakProbe:
    """Peak bytes of live tensors on this rank, from ``start()`` (the window) to exit.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: torch.profiler allocation
    events, whose running total counts every tensor allocated since the profiler started
    (so enter before the model is materialized). Both exclude the runtime's own memory.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.window_start_ns = 0
        self.prof = None

    def __enter__(self) -> "TensorPeakProbe":
        if self.device.type != "cuda":
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def start(self) -> None:
        """Open the window: peaks before it (model init) are not counted."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.window_start_ns = time.time_ns()

    def __exit__(self, *exc) -> None:
        if self.prof is not None:
            self.prof.__exit__(*exc)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        from torch._C._profiler import _EventType

        def walk(nodes):
            for n in nodes:
                yield n
                yield from walk(n.children)

        totals = [
            n.extra_fields.total_allocated
            for n in walk(self.prof.profiler.kineto_results.experimental_event_tree())
            if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"
            and n.start_time_ns >= self.window_start_ns
        ]
        return max(totals, default=0)


def measure_real_peak(cfg: JobConfig, steps: int = STEPS) -> dict:
    """Build the real Trainer (under torchrun) and run ``steps`` train steps; returns this
    run's peak tensor bytes over the steps (rank 0's and the max over ranks)."""
    from torchtitan.trainer import Trainer

    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type() == "cuda" else torch.device("cpu")
    with TensorPeakProbe(dev) as probe:
        trainer = Trainer(cfg)
        data_iter = iter(trainer.dataloader)
        probe.start()
        for _ in range(steps):
            trainer.train_step(data_iter, False)
    peak = probe.peak()
    peaks = torch.tensor([peak], dtype=torch.float64, device=trainer.device)
    gathered = [torch.zeros_like(peaks) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, peaks)
    how = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "torch.profiler allocation events"
    result = {"rank0": int(gathered[0].item()), "max_over_ranks": int(max(g.item() for g in gathered)),
              "how": how, "world_size": dist.get_world_size(), "steps": steps}  # fmt: skip
    trainer.close()
    return result


def compare(est: MemoryEstimate, measured_bytes: int) -> str:
    rel = (est.total - measured_bytes) / measured_bytes
    return (f"estimate {est.total / GIB:.4f} GiB ({est.method}) vs measured {measured_bytes / GIB:.4f} GiB: "
            f"{100 * rel:+.1f}%")  # fmt: skip


def load_estimate(path: str) -> MemoryEstimate:
    with open(path) as f:
        return MemoryEstimate(**json.load(f))
