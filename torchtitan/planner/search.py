"""Enumerate the layouts of a model on N devices, estimate each, rank them, explain and write the best.

The search space (``enumerate_layouts``): tp over the divisors of a node's devices that divide the
head counts; pp over what is left (with each allowed schedule and microbatch count); cp; the
data-parallel rest as FSDP, HSDP (any shard degree) or DDP; ep over the divisors of dp_shard x cp
that are multiples of cp (MoE families only); each allowed activation-checkpointing mode; float8 if
allowed and the device has it; and every local batch whose accumulation keeps the global batch.
Each layout gets the memory of ``memory.peak_memory`` (the rank that needs the most) and the step
time of ``step_time.busiest``; those that fit are ranked by tokens per second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Iterator

from torchtitan.planner.hardware import Hardware
from torchtitan.planner.layout import Layout, ModelShape
from torchtitan.planner.memory import GIB, MemoryBreakdown, peak_memory
from torchtitan.planner.step_time import PARTS, StepTime, Topology, busiest, group_spans_nodes
from torchtitan.planner.vocab import run_vocab

# What each step-time part means, for the one-line explanation.
_WHY = {
    "bubble": "pipeline bubble",
    "fsdp": "exposed FSDP all-gathers / reduce-scatters",
    "tp": "tensor-parallel collectives of every block",
    "cp": "context-parallel K/V all-gathers",
    "ep": "expert-parallel all-to-alls",
    "dp": "replica all-reduce",  # + where its group runs, see _why
    "optimizer": "optimizer step",
}


@dataclass
class PlanRequest:
    shape: ModelShape
    gpus: int
    gpus_per_node: int
    hw: Hardware
    seq_len: int
    global_batch: int  # sequences per optimizer step
    ac_modes: tuple[str, ...] = ("none", "selective", "full")
    pp_schedules: tuple[str, ...] = ("1F1B", "Interleaved1F1B")
    max_pp: int = 0  # 0 = no limit
    allow_cp: bool = False
    allow_ep: bool = True
    allow_float8: bool = False
    compile: bool = True
    margin: float = 0.1  # fraction of device memory kept free (fragmentation, NCCL, the CUDA context)
    max_local_batch: int = 64
    vocab_note: str = ""  # where shape.vocab came from, printed with the plan

    @property
    def budget(self) -> float:
        return self.hw.memory_gib * GIB * (1 - self.margin)


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    fits: bool
    tokens_per_s: float  # per device
    mfu: float | None  # None when the hardware's peak is not known (the nominal cpu row)
    notes: list[str] = field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(req: PlanRequest) -> Iterator[Layout]:
    s = req.shape
    float8s = (False, True) if req.allow_float8 and req.hw.fp8_tflops else (False,)
    for tp in _divisors(min(req.gpus_per_node, req.gpus)):
        if req.gpus % tp or s.n_heads % tp or s.n_kv_heads % tp:
            continue
        for pp in _divisors(req.gpus // tp):
            if (req.max_pp and pp > req.max_pp) or (pp > 1 and not req.pp_schedules) or pp > s.n_layers:
                continue
            for cp in _divisors(req.gpus // (tp * pp)) if req.allow_cp else (1,):
                if req.seq_len % (2 * cp) and cp > 1:
                    continue
                dp = req.gpus // (tp * pp * cp)
                if req.global_batch % dp:
                    continue
                for shard in _divisors(dp):
                    for ep in _eps(s, shard, cp, req.allow_ep):
                        yield from _batches(req, tp, pp, cp, dp // shard, shard, ep, float8s)


def _eps(shape: ModelShape, shard: int, cp: int, allow: bool) -> list[int]:
    if not shape.num_experts or not allow:
        return [1]
    return [e for e in _divisors(shard * cp) if e % cp == 0 and shape.num_experts % e == 0]


def _batches(req, tp, pp, cp, replicate, shard, ep, float8s) -> Iterator[Layout]:
    rows = req.global_batch // (replicate * shard)
    schedules = [s for s in req.pp_schedules if _stages_fit(req.shape, pp, s)] if pp > 1 else ["1F1B"]
    for local in _divisors(rows):
        if local > req.max_local_batch:
            break
        for schedule in schedules:
            for micro in _microbatches(pp, schedule, local):
                for ac in req.ac_modes:
                    for f8 in float8s:
                        yield Layout(dp_replicate=replicate, dp_shard=shard, tp=tp, pp=pp, cp=cp, ep=ep,
                                     pp_schedule=schedule, pp_microbatches=micro, ac=ac, ac_option="op",
                                     local_bs=local, accum=rows // local, float8=f8, compile=req.compile)


def _microbatches(pp: int, schedule: str, local: int) -> list[int]:
    if pp == 1:
        return [0]
    layout = Layout(pp=pp, pp_schedule=schedule)
    style, per_rank, _ = layout.schedule()
    least = pp if style == "single" else pp * per_rank
    return [m for m in _divisors(local) if m >= least and m % pp == 0][:3]


def _stages_fit(shape: ModelShape, pp: int, schedule: str) -> bool:
    """Every pipeline stage gets at least one block."""
    if pp == 1:
        return True
    _, per_rank, _ = Layout(pp=pp, pp_schedule=schedule).schedule()
    return pp * per_rank <= shape.n_layers


def evaluate(req: PlanRequest, layout: Layout) -> Candidate:
    topo = Topology(req.gpus_per_node)
    mem = peak_memory(req.shape, layout, req.seq_len, req.hw.compute_bytes)
    t = busiest(req.shape, layout, req.seq_len, req.hw, topo)
    tokens = layout.global_batch * req.seq_len
    tps = tokens / t.total / req.gpus
    mfu = req.shape.flops_per_token(req.seq_len) * tps / (req.hw.peak_tflops * 1e12) if req.hw.peak_known else None
    return Candidate(layout, mem, t, mem.total <= req.budget, tps, mfu)


def _prune_replica_splits(cands: list[Candidate]) -> list[Candidate]:
    """Of the layouts that differ only in how dp splits into replicas x shards (FSDP / HSDP / DDP),
    keep those no other split beats on both speed and memory."""
    groups: dict[Layout, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(replace(c.layout, dp_replicate=1, dp_shard=1), []).append(c)
    kept = []
    for group in groups.values():
        kept += [c for c in group if not any(
            o.tokens_per_s >= c.tokens_per_s and o.memory.total <= c.memory.total and o is not c
            and (o.tokens_per_s, -o.memory.total) != (c.tokens_per_s, -c.memory.total) for o in group)]
    return kept


def plan(req: PlanRequest) -> list[Candidate]:
    """Every layout, the fitting ones first (fastest first), then the rest (smallest memory first).
    Replica splits that another split of the same layout beats on speed and memory are left out."""
    cands = [evaluate(req, layout) for layout in enumerate_layouts(req)]
    fit = sorted(_prune_replica_splits([c for c in cands if c.fits]), key=lambda c: (-c.tokens_per_s, c.memory.total))
    rest = sorted((c for c in cands if not c.fits), key=lambda c: c.memory.total)
    return fit + rest


def _why(part: str, worse: Layout, better: Layout, gpus_per_node: int) -> str:
    if part == "dp":  # the table's words: a replica group inside one node is not "across nodes"
        spans = group_spans_nodes(worse, "dp", gpus_per_node)
        return _WHY[part] + (" across nodes" if spans else " inside the node")
    if part != "compute":
        return _WHY[part]
    reasons = []
    if worse.ac_label() != better.ac_label():
        reasons.append(f"recomputation under AC {worse.ac_label()}" if worse.ac != "none" else "no recomputation")
    if worse.float8 != better.float8:
        reasons.append("bf16 linears" if not worse.float8 else "float8 casts")
    if worse.tp != better.tp or worse.local_bs != better.local_bs:
        reasons.append("matmul shapes (tp, microbatch)")
    if worse.compile != better.compile:
        reasons.append("eager elementwise ops")
    return "compute (" + (", ".join(reasons) or "more FLOPs on this rank") + ")"


def explain(a: Candidate, b: Candidate, gpus_per_node: int) -> str:
    """One line: why ``a`` is ranked above ``b``, in the table's words."""
    gain = a.tokens_per_s / b.tokens_per_s - 1
    diffs = sorted(((getattr(b.time, p) - getattr(a.time, p), p) for p in PARTS), reverse=True)
    worse, part = diffs[0]
    line = (f"#1 ({a.layout.describe()}) beats #2 ({b.layout.describe()}) by {gain:.1%} tokens/s: #2 spends "
            f"{worse * 1e3:.1f} ms more per step on {_why(part, b.layout, a.layout, gpus_per_node)}")
    if diffs[-1][0] < 0:
        better, bpart = diffs[-1]
        line += f", more than it saves on {_why(bpart, a.layout, b.layout, gpus_per_node)} ({-better * 1e3:.1f} ms)"
    if a.layout.global_batch != b.layout.global_batch:
        line += " (different global batch)"
    return line


def format_table(cands: list[Candidate], top: int, req: PlanRequest) -> str:
    head = (f"{'#':>3} {'layout':<44}{'local x acc':>12}{'mem GiB':>9}{'state':>7}{'gath':>6}{'act':>6}"
            f"{'step s':>8}{'comp':>7}{'bubb':>6}{'comm':>6}{'tok/s/gpu':>10}{'MFU':>6}")
    rows = [head]
    for i, c in enumerate(cands[:top], 1):
        m, t = c.memory, c.time
        state = (m.params + m.grads + m.optimizer) / GIB
        mark = "" if c.fits else "  (does not fit)"
        mfu = "n/a" if c.mfu is None else f"{c.mfu:.1%}"
        rows.append(
            f"{i:>3} {c.layout.describe():<44}{f'{c.layout.local_bs} x {c.layout.accum}':>12}{m.total / GIB:>9.1f}"
            f"{state:>7.1f}{m.other / GIB:>6.1f}{m.activations / GIB:>6.1f}{t.total:>8.3f}{t.compute:>7.3f}"
            f"{t.bubble:>6.3f}{t.comm:>6.3f}{c.tokens_per_s:>10,.0f}{mfu:>6}{mark}"
        )
    return "\n".join(rows)


def to_config_overrides(c: Candidate, req: PlanRequest) -> dict[str, dict]:
    """The sections and keys of a trainer config that run this candidate."""
    lay = c.layout
    return {
        "model": {"name": req.shape.family, "flavor": req.shape.flavor},
        "training": {"seq_len": req.seq_len, "global_batch_size": lay.global_batch, "local_batch_size": lay.local_bs},
        "parallelism": {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp, "pp": lay.pp,
                        "cp": lay.cp, "ep": lay.ep, "pp_schedule": lay.pp_schedule,
                        "pp_microbatches": lay.pp_microbatches},
        "activation_checkpoint": {"mode": lay.ac, "selective_ac_option": lay.ac_option},
        "compile": {"enable": lay.compile},
        "float8": {"enable_float8_linear": lay.float8, "enable_fsdp_float8_all_gather": lay.float8 and lay.fsdp > 1,
                   "precompute_float8_dynamic_scale_for_fsdp": lay.float8 and lay.fsdp > 1},
    }


def apply_overrides(cfg, overrides: dict[str, dict]):
    """A copy of the config tree with the planner's keys set."""
    cfg = dataclasses.replace(cfg)
    for section, keys in overrides.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **keys))
    return cfg


def shape_of_config(cfg, vocab: int = 0) -> ModelShape:
    """The model a trainer config names, with ``vocab`` or else the one the run will train with
    (``vocab.run_vocab``: model.vocab_size, else the tokenizer's)."""
    from torchtitan.models.registry import flavor_error, get_spec

    m = cfg.model
    spec = get_spec(m.name)
    if m.flavor not in spec.flavors:
        raise flavor_error(spec.name, m.flavor, list(spec.flavors))
    vocab = vocab or run_vocab(cfg)[0]
    args = spec.build_args(m.flavor, vocab_size=vocab, max_seq_len=cfg.training.seq_len, n_layers=m.n_layers,
                           dim=m.dim, n_kv_heads=m.n_kv_heads)
    return ModelShape.from_args(m.name, m.flavor, args)


def predict_for_config(cfg, world_size: int, hw: Hardware, gpus_per_node: int = 0,
                       shape: ModelShape | None = None) -> Candidate:
    """The planner's estimate of the run a trainer config describes (what --write_config inverts)."""
    from torchtitan.trainer import batch_split

    layout = Layout.from_config(cfg, world_size, 1, 1)
    req = PlanRequest(shape or shape_of_config(cfg), world_size, gpus_per_node or world_size, hw,
                      cfg.training.seq_len, cfg.training.global_batch_size, compile=cfg.compile.enable)
    rows = batch_split(cfg.training.global_batch_size, -1, layout.dp)[0]
    if cfg.training.local_batch_size == 0:  # auto: the largest local batch that fits this hardware
        tried = [evaluate(req, layout.with_batch(b, rows // b)) for b in reversed(_divisors(rows))]
        return next((c for c in tried if c.fits), tried[-1])
    local, accum = batch_split(cfg.training.global_batch_size, cfg.training.local_batch_size, layout.dp)
    return evaluate(req, layout.with_batch(local, accum))
