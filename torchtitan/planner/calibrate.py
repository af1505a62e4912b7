"""Measure the step-time model's machine constants on this host: ``plan.py --calibrate``.

``calibrate(nproc)`` starts ``nproc`` processes that run AT ONCE, as the ranks of a training run
on this host would (sharing its cores, one thread each when the cores are fewer than the ranks),
joined by a gloo process group, and measures in each phase on all of them together (every value
is the median over the processes; the processes are forked, so start-up is ~0.1 s, not an import
of torch each):

- matmul: fp32 GEMMs whose smallest dimension s is 64 ... 1024 (each s in the three positions M, K,
  N, as a forward and its backward use it); ``throughput(s) = peak x s / (s + half_size)`` is
  fitted as a line in 1 / s (``matmul_efficiency`` = 1: the fitted peak is the practical one);
- attention_efficiency: causal SDPA forward + backward at the probe's shape (below), its FLOPs as
  step_time.py counts them over its time, as a fraction of the fitted peak;
- launch_s: the probe model (below) on 8 tokens, where only the per-op dispatch is left, over the
  ops step_time.py counts (OPS_PER_BLOCK per block forward, twice that backward); on a CPU the
  dispatch adds to the compute (``launch_overlaps`` False);
- dtensor_launch_s: a tiny op on replicated DTensors over the ranks' mesh minus the same op on plain
  tensors (DTensor's sharding propagation, paid per op under TP);
- comm_overlap = 0 (gloo's threads share the cores with the compute: nothing hides) and
  shared_compute = processes x threads / cores (ranks idle in a pipeline bubble lend their cores);
- elementwise_overhead: forward + backward (with the loss) of a real model of the family (the
  probe: llama3 debugmodel, 2 x 256 tokens) against what step_time.py predicts for it with no
  overhead: overhead = (measured - launches) / matmul - 1 (at least 0), so that the model
  reproduces the measured time of one rank. CPU compile is not measured: ``compiled_overhead`` is
  the same;
- collectives: all-gather, reduce-scatter, all-reduce and all-to-all of 4 KiB ... 16 MiB over the
  ``nproc`` ranks; latency and bandwidth are fitted in the model's convention (a ring collective of
  B bytes over n ranks costs latency + (n - 1) / n x B / bw, an all-reduce twice that), minimizing
  the relative error over every point; one host, so inter = intra;
- hbm_gbps: the fused AdamW step (the trainer's CPU default) over 4M parameters per process, as
  28 bytes per parameter (what step_time.py counts) over its time; a tensor copy goes in the notes;
- memory_gib: the host's memory (or cgroup limit) shared by the ``nproc`` processes.

``measure`` returns the raw numbers, ``fit`` turns them into a ``Hardware`` (``calibrate`` does
both) and ``save_calibration`` writes the JSON that ``hardware.load_hardware`` reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchtitan.planner.hardware import Hardware

GIB = 1024**3
GEMM_DIMS = (64, 128, 256, 512, 1024)
GEMM_WORK = 256 * 1024 * 1024  # multiply-adds of each GEMM (s x other x other), other >= s
COLLECTIVE_BYTES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
ADAMW_PARAMS = 4 << 20  # per process: 64 MB of weights, gradients and moments, beyond the L3 cache
# Share of the time budget per phase (the rest: process start-up, gloo init, the gather).
_BUDGET = {"matmul": 0.2, "probe": 0.25, "collectives": 0.25, "memory": 0.08}


@dataclass(frozen=True)
class Probe:
    """The model whose forward + backward gives the elementwise overhead (and, on 8 tokens, the
    dispatch cost; its attention shape gives attention_efficiency)."""

    family: str = "llama3"
    flavor: str = "debugmodel"
    local_bs: int = 2
    seq_len: int = 256


@dataclass
class Measurements:
    """What the processes measured (each number the median over repetitions and ranks)."""

    nproc: int
    threads: int
    matmul_flops: dict[int, float]  # smallest GEMM dim -> FLOP/s of one process
    probe: Probe
    probe_s: float  # forward + backward of the probe on one process
    attention_flops: float  # of one block's causal attention, forward + backward, at the probe's shape
    attention_s: float
    dispatch_s: float  # per op of a block (step_time.OPS_PER_BLOCK per forward, twice that backward)
    dtensor_dispatch_s: float  # extra per op on (replicated) DTensors
    collective_s: dict[str, dict[int, float]]  # op -> bytes (model convention) -> seconds
    adamw_s: float
    adamw_params: int
    copy_gbps: float
    host_bytes: int
    wall_s: float = 0.0
    cpu: str = ""
    date: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- host load


class HostLoad:
    """The CPU the rest of the host used while a measurement ran, in cores: /proc/stat's busy time
    minus this process's and its waited-for children's (the ranks', torchrun's). On a shared host a
    measurement taken while others computed is slow for a reason the model cannot know."""

    def __enter__(self) -> "HostLoad":
        self.cores = float("nan")
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        end = self._snapshot()
        if self._start[1] is not None and end[1] is not None:
            wall = end[0] - self._start[0]
            self.cores = max(0.0, (end[1] - self._start[1]) - (end[2] - self._start[2])) / max(wall, 1e-9)

    @staticmethod
    def _snapshot() -> tuple[float, float | None, float]:
        ours = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
            busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = None
        return time.perf_counter(), busy, ours


# ---------------------------------------------------------------------------- the processes


def _median_time(fn, budget_s: float, min_reps: int = 2, max_reps: int = 50) -> float:
    """Median seconds of ``fn()`` after one warm-up, repeated until ``budget_s`` is spent."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_shapes(s: int) -> list[tuple[int, int, int]]:
    """GEMMs (M, K, N) whose smallest dimension is ``s``, in each of the three positions (a forward
    and its two backward GEMMs put a dimension in all three), the others sized for ~0.5 GFLOP."""
    other = max(s, round(math.sqrt(GEMM_WORK / s)))
    return sorted({(s, other, other), (other, s, other), (other, other, s)})


def _matmul_phase(budget_s: float) -> dict[int, float]:
    out = {}
    for s in GEMM_DIMS:
        shapes = gemm_shapes(s)
        pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
        flops = sum(2 * m * k * n for m, k, n in shapes)
        dist.barrier()  # every process multiplies at the same time, as ranks do
        # Total work over total time (not a median of calls): processes that share a core get
        # their share of it, as ranks do, even when one GEMM fits in a scheduler time slice.
        reps, end = 0, time.perf_counter() + budget_s / len(GEMM_DIMS)
        t0 = time.perf_counter()
        while reps < 2 or time.perf_counter() < end:
            [a @ b for a, b in pairs]
            reps += 1
        out[s] = flops * reps / (time.perf_counter() - t0)
    return out


def _probe_phase(probe: Probe, budget_s: float) -> dict[str, float]:
    """Seconds of the probe model's forward + backward (with the loss) and of its attention alone."""
    import torch.nn.functional as F

    from torchtitan.models.registry import get_spec

    spec = get_spec(probe.family)
    args = spec.build_args(probe.flavor, vocab_size=spec.flavors[probe.flavor].vocab_size, max_seq_len=probe.seq_len)
    torch.manual_seed(0)
    model = spec.model_cls(args)
    tokens = torch.randint(0, args.vocab_size, (probe.local_bs, probe.seq_len))
    targets = torch.randint(0, args.vocab_size, (probe.local_bs, probe.seq_len))

    def step():
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()

    # One block's causal attention, forward + backward: [B, heads, T, head_dim] (kv repeated).
    q, k, v = (torch.randn(probe.local_bs, args.n_heads, probe.seq_len, args.dim // args.n_heads,
                           requires_grad=True) for _ in range(3))

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    # The same model on 8 tokens: its time is the per-op dispatch (eager launch) cost alone.
    few = tokens[:1, :8]

    def dispatch():
        F.cross_entropy(model(few).flatten(0, 1).float(), targets[:1, :8].flatten()).backward()

    # The same tiny op on replicated DTensors (no communication): DTensor's sharding propagation per op.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    small = torch.ones(8, 8)
    dsmall = distribute_tensor(small, mesh, [Replicate()])

    def ops(x, n=20):
        for _ in range(n):
            x = x * 1.0001
        return x

    dist.barrier()
    model_s = _median_time(step, budget_s * 0.7)
    dist.barrier()
    attention_s = _median_time(attention, budget_s * 0.15)
    dist.barrier()
    dispatch_s = _median_time(dispatch, budget_s * 0.1, min_reps=5)
    plain_s = _median_time(lambda: ops(small), budget_s * 0.02, min_reps=5)
    dtensor_s = _median_time(lambda: ops(dsmall), budget_s * 0.03, min_reps=5)
    return {"model": model_s, "attention": attention_s, "dispatch": dispatch_s, "n_layers": args.n_layers,
            "n_heads": args.n_heads, "head_dim": args.dim // args.n_heads,
            "dtensor_extra": max(0.0, dtensor_s - plain_s) / 20}


def _run_collective(op: str, nbytes: int, n: int):
    """A closure running one collective whose size in the model's convention is ``nbytes``:
    all-gather / reduce-scatter of a full (unsharded) buffer of nbytes, all-reduce of nbytes,
    all-to-all of nbytes sent by each rank."""
    numel = max(n, nbytes // 4 // n * n)
    full, part = torch.ones(numel), torch.ones(numel // n)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, part)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(part, full)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    out = torch.empty_like(full)
    return lambda: dist.all_to_all_single(out, full)


def _collective_phase(n: int, budget_s: float, min_rounds: int = 2, max_rounds: int = 9) -> dict[str, dict[int, float]]:
    """Seconds per collective, the median over rounds of the whole grid (op x size); in a round each
    point runs back-to-back loops (amortizing the ranks' skew). Rank 0's clock decides, for all,
    whether another round fits in the budget, so every rank calls the same collectives."""
    points = [(op, b, _run_collective(op, b, n)) for op in COLLECTIVES for b in COLLECTIVE_BYTES]
    for _, _, fn in points:
        fn()  # warm-up: gloo's buffers and connections
    samples: dict[tuple[str, int], list[float]] = {(op, b): [] for op, b, _ in points}
    start, more = time.perf_counter(), torch.ones(1)
    for rounds in range(1, max_rounds + 1):
        for op, nbytes, fn in points:
            loop = max(1, min(20, (4 << 20) // nbytes))
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(loop):
                fn()
            samples[op, nbytes].append((time.perf_counter() - t0) / loop)
        spent = time.perf_counter() - start
        more.fill_(float(rounds < min_rounds or spent * (rounds + 1) / rounds < budget_s))
        dist.broadcast(more, src=0)
        if not more.item():
            break
    out: dict[str, dict[int, float]] = {op: {} for op in COLLECTIVES}
    for (op, nbytes), times in samples.items():
        out[op][nbytes] = statistics.median(times)
    return out


def _memory_phase(budget_s: float) -> tuple[float, float]:
    """(seconds of one fused AdamW step over ADAMW_PARAMS parameters, copy GB/s)."""
    params = [torch.nn.Parameter(torch.full((ADAMW_PARAMS // 8,), 0.5)) for _ in range(8)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dist.barrier()
    adamw = _median_time(opt.step, budget_s * 0.7)
    src, dst = torch.ones(16 << 20), torch.empty(16 << 20)  # 64 MB each
    dist.barrier()
    copy = _median_time(lambda: dst.copy_(src), budget_s * 0.3)
    return adamw, 2 * src.numel() * 4 / copy / 1e9


def _worker(rank: int, nproc: int, port: int, threads: int, seconds: float, probe: Probe, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=max(60.0, 3 * seconds))
    dist.init_process_group("gloo", rank=rank, world_size=nproc, timeout=timeout)
    dist.barrier()
    try:
        result, clock = {"phase_s": {}, "ready_at": time.time()}, time.perf_counter()
        for name, run in (("matmul", lambda b: _matmul_phase(b)), ("probe", lambda b: _probe_phase(probe, b)),
                          ("collectives", lambda b: _collective_phase(nproc, b)), ("memory", _memory_phase)):
            result[name] = run(seconds * _BUDGET[name])
            result["phase_s"][name], clock = time.perf_counter() - clock, time.perf_counter()
        gathered = [None] * nproc if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(gathered, f)
        dist.barrier()  # see CPU_DISTRIBUTED_FACTS: without it processes abort at exit at random
    finally:
        dist.destroy_process_group()


def _median_over_ranks(per_rank: list[dict], get) -> float:
    return statistics.median(get(r) for r in per_rank)


def measure(nproc: int, seconds: float = 60.0, probe: Probe = Probe()) -> Measurements:
    """Run the measurements on ``nproc`` processes at once (about ``seconds`` in all)."""
    from torchtitan.models.registry import get_spec
    from torchtitan.parallelisms.utils import free_port
    from torchtitan.tools.memory_check import host_memory

    if nproc < 2:
        raise ValueError(f"calibrate needs at least 2 processes (collectives); got nproc={nproc}")
    start, start_wall = time.perf_counter(), time.time()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    get_spec(probe.family)  # imported once here: forked processes inherit the model code
    # Forked processes start in a fraction of a second (torch is imported); spawned ones import it
    # again each (~3 s of CPU per process on a busy 2-core host). Only single-threaded ones fork: an
    # OpenMP pool the parent used does not survive a fork.
    method = "fork" if threads == 1 and "fork" in mp.get_all_start_methods() else "spawn"
    phase_s = max(4.0, seconds - (2.0 if method == "fork" else 1.5 * nproc + 3))
    with tempfile.TemporaryDirectory() as tmp, HostLoad() as load:
        out_path = os.path.join(tmp, "calibration.json")
        mp.start_processes(_worker, args=(nproc, free_port(), threads, phase_s, probe, out_path), nprocs=nproc,
                           join=True, start_method=method)
        with open(out_path) as f:
            ranks = json.load(f)
    matmul = {int(s): _median_over_ranks(ranks, lambda r, s=s: r["matmul"][s]) for s in ranks[0]["matmul"]}
    coll = {op: {int(b): _median_over_ranks(ranks, lambda r, op=op, b=b: r["collectives"][op][b])
                 for b in ranks[0]["collectives"][op]} for op in COLLECTIVES}
    host, probe_shape = host_memory(), ranks[0]["probe"]
    return Measurements(
        nproc=nproc, threads=threads, matmul_flops=matmul, probe=probe,
        probe_s=_median_over_ranks(ranks, lambda r: r["probe"]["model"]), collective_s=coll,
        attention_flops=_attention_flops(probe, probe_shape["n_heads"], probe_shape["head_dim"]),
        attention_s=_median_over_ranks(ranks, lambda r: r["probe"]["attention"]),
        dispatch_s=_median_over_ranks(ranks, lambda r: r["probe"]["dispatch"]) / _block_ops(probe_shape["n_layers"]),
        dtensor_dispatch_s=_median_over_ranks(ranks, lambda r: r["probe"]["dtensor_extra"]),
        adamw_s=_median_over_ranks(ranks, lambda r: r["memory"][0]), adamw_params=ADAMW_PARAMS,
        copy_gbps=_median_over_ranks(ranks, lambda r: r["memory"][1]), host_bytes=host[0] if host else 0,
        wall_s=time.perf_counter() - start, cpu=cpu_name(), date=datetime.date.today().isoformat(),
        extra={"startup_s": ranks[0]["ready_at"] - start_wall, "host_load_cores": load.cores,
               "phase_s": ranks[0]["phase_s"]},
    )


def _block_ops(n_layers: int) -> int:
    """Ops the model counts for a forward + backward of ``n_layers`` blocks."""
    from torchtitan.planner.step_time import OPS_PER_BLOCK

    return n_layers * 3 * OPS_PER_BLOCK


def _attention_flops(probe: Probe, n_heads: int, head_dim: int) -> float:
    """step_time.py's count: 12 x heads x head_dim x seq_len per token, half of it under the causal mask."""
    return probe.local_bs * probe.seq_len * 12 * n_heads * head_dim * probe.seq_len * 0.5


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- the fits


def fit_matmul(flops: dict[int, float]) -> tuple[float, float]:
    """(peak FLOP/s, half_size) of throughput(s) = peak x s / (s + half): 1 / thr is a line in 1 / s."""
    xs = [1 / s for s in flops]
    ys = [1 / f for f in flops.values()]
    slope, intercept = _line(xs, ys)
    if intercept <= 0:  # no saturation visible: the largest shape is the peak
        return max(flops.values()), 0.0
    return 1 / intercept, max(0.0, slope / intercept)


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def _collective_terms(op: str, nbytes: float, n: int) -> tuple[float, float]:
    """(latency count, bytes over the bandwidth) of one collective in the model's convention."""
    k = 2 if op == "all_reduce" else 1
    return k, k * (n - 1) / n * nbytes


def fit_collectives(coll: dict[str, dict[int, float]], n: int) -> tuple[float, float]:
    """(latency s, bandwidth B/s) minimizing the relative error of every measured point."""
    rows = [(*_collective_terms(op, b, n), t) for op, sizes in coll.items() for b, t in sizes.items()]
    # Weighted least squares of [k / t, bytes / t] . [lat, 1 / bw] = 1.
    a11 = sum((k / t) ** 2 for k, _, t in rows)
    a12 = sum(k * b / t**2 for k, b, t in rows)
    a22 = sum((b / t) ** 2 for _, b, t in rows)
    r1 = sum(k / t for k, _, t in rows)
    r2 = sum(b / t for _, b, t in rows)
    det = a11 * a22 - a12**2
    lat, inv_bw = (r1 * a22 - r2 * a12) / det, (a11 * r2 - a12 * r1) / det
    if lat <= 0:  # bandwidth alone: refit it, latency from the smallest size
        lat = min(t / k for k, _, t in rows)
        inv_bw = max(1e-15, sum((t - k * lat) * b / t**2 for k, b, t in rows) / a22)
    if inv_bw <= 0:
        inv_bw = 1e-15
        lat = r1 / a11
    return lat, 1 / inv_bw


def predict_collective(hw: Hardware, op: str, nbytes: float, n: int) -> float:
    """What step_time.py's CommModel charges for one of the measured collectives."""
    from torchtitan.planner.layout import Layout
    from torchtitan.planner.step_time import CommModel, Topology

    comm = CommModel(hw, Topology(n), Layout(dp_shard=n))
    if op == "all_reduce":
        return comm.all_reduce("fsdp", nbytes)
    if op == "all_to_all":
        comm = CommModel(hw, Topology(n), Layout(dp_shard=n, ep=n))
        return comm.all_to_all("ep", nbytes)
    return comm.gather("fsdp", nbytes)


def _probe_prediction(hw: Hardware, probe: Probe) -> tuple[float, float]:
    """(matmul seconds, launch seconds) step_time.py predicts for the probe's forward + backward."""
    from torchtitan.planner.layout import Layout, ModelShape
    from torchtitan.planner.step_time import Topology, step_time

    shape = ModelShape.from_flavor(probe.family, probe.flavor, probe.seq_len)
    layout = Layout(local_bs=probe.local_bs)
    c0, c1 = (step_time(shape, layout, probe.seq_len, dataclasses.replace(hw, elementwise_overhead=ov), Topology(1))
              .compute for ov in (0.0, 1.0))
    return c1 - c0, 2 * c0 - c1


def fit(m: Measurements) -> Hardware:
    """The ``Hardware`` whose step-time model reproduces the measurements."""
    peak, half = fit_matmul(m.matmul_flops)
    lat, bw = fit_collectives(m.collective_s, m.nproc)
    hw = Hardware(
        name=f"cpu-{m.nproc}proc", memory_gib=m.host_bytes / m.nproc / GIB, peak_tflops=peak / 1e12,
        fp8_tflops=0.0, hbm_gbps=28 * m.adamw_params / m.adamw_s / 1e9, intra_gbps=bw / 1e9, inter_gbps=bw / 1e9,
        latency_s=lat, inter_latency_s=lat, matmul_efficiency=1.0, half_size=half,
        attention_efficiency=m.attention_flops / m.attention_s / peak, elementwise_overhead=0.0,
        compiled_overhead=0.0, launch_s=m.dispatch_s, launch_overlaps=False, compute_bytes=4,
        dtensor_launch_s=m.dtensor_dispatch_s, comm_overlap=0.0,
        shared_compute=max(1.0, m.nproc * m.threads / (os.cpu_count() or 1)),
    )
    matmul_s, launch_s = _probe_prediction(hw, m.probe)
    overhead = max(0.0, (m.probe_s - launch_s) / matmul_s - 1)
    return dataclasses.replace(hw, elementwise_overhead=overhead, compiled_overhead=overhead,
                               notes=_notes(m, matmul_s, launch_s))


def _notes(m: Measurements, matmul_s: float, launch_s: float) -> str:
    p, ms = m.probe, lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    per_op = {op: fit_collectives({op: sizes}, m.nproc) for op, sizes in m.collective_s.items()}
    return (
        f"calibrated {m.date} on {m.cpu} ({os.cpu_count()} cores), {m.nproc} processes at once, {m.threads} "
        f"thread(s) each, gloo, {m.wall_s:.0f} s, other processes {m.extra.get('host_load_cores', math.nan):.2f} "
        f"cores; probe {p.family} {p.flavor} {p.local_bs}x{p.seq_len} fwd+bwd {ms(m.probe_s)} vs model matmul "
        f"{ms(matmul_s)} + launches {ms(launch_s)} (dispatch {m.dispatch_s * 1e6:.0f} us per op, "
        f"+{m.dtensor_dispatch_s * 1e6:.0f} us on DTensors); attention "
        f"{m.attention_flops / m.attention_s / 1e9:.1f} GFLOP/s; per-op fits (latency us / GB/s): "
        + ", ".join(f"{op} {lt * 1e6:.0f} / {b / 1e9:.2f}" for op, (lt, b) in per_op.items())
        + f"; copy {m.copy_gbps:.1f} GB/s; compile not measured (compiled_overhead = elementwise_overhead)"
    )


def calibrate(nproc: int, seconds: float = 60.0) -> Hardware:
    """This host's ``Hardware`` for ``nproc`` ranks, measured with ``nproc`` processes at once."""
    return fit(measure(nproc, seconds))


def save_calibration(hw: Hardware, path: str) -> None:
    """Write ``hw`` as the JSON ``hardware.load_hardware`` (``--hardware FILE``) reads."""
    fields = dataclasses.asdict(hw)
    bad = [k for k, v in fields.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"calibration has non-finite fields {bad}: measure again")
    with open(path, "w") as f:
        f.write(hw.to_json() + "\n")
