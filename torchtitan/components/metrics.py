"""Per-window training metrics: one console line, one JSON line, optional TensorBoard and W&B.

MFU uses the bf16 dense datasheet peak of the detected GPU (``metrics.peak_flops``
overrides it; on CPU MFU is null unless it is set). flops per token come from the
model (6 x non-embedding params + 12 x layers x heads x head_dim x seq_len).

Validation results (``val_loss``, ``val_perplexity``, ``val_loss/<name>``; components/validation.py)
join the record of their step when it is a log step, else they are a record of their own
(``step`` and the ``val_*`` keys only). Their time is left out of the training window, so
``tps`` and ``step_time_s`` describe training alone. Every JSON record carries the ``run_id`` of the
run that wrote it (components/run_folder.py): runs that share a folder never mix in a plot.
"""

import json
import math
import os
import resource
import time
from dataclasses import dataclass

import torch

from torchtitan.config.job_config import Metrics as MetricsConfig
from torchtitan.tools.logging import logger

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (no sparsity).
_PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H20", 148e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def peak_flops(cfg: MetricsConfig, device: torch.device) -> float | None:
    """Peak FLOP/s for MFU, or None when unknown (CPU without metrics.peak_flops)."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS:
        if key in name:
            return flops
    logger.warning(f"unknown GPU {name!r}: MFU is null; set metrics.peak_flops to its bf16 peak")
    return None


class MemoryMonitor:
    """Peak memory since the last reset: CUDA allocator stats, or the process peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Linux lets a process reset its own peak RSS (VmHWM), so each window reports its own peak.
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def read(self) -> dict:
        gib = 1024**3
        if self.device.type == "cuda":
            s = torch.cuda.memory_stats(self.device)
            return {
                "memory_gib": s.get("active_bytes.all.peak", 0) / gib,
                "memory_reserved_gib": s.get("reserved_bytes.all.peak", 0) / gib,
                "memory_pct": 100 * s.get("reserved_bytes.all.peak", 0) / self.capacity,
                "alloc_retries": s.get("num_alloc_retries", 0),
                "ooms": s.get("num_ooms", 0),
            }
        return {"memory_gib": _peak_rss_bytes() / gib}


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); inf where exp overflows, nan for a nan loss."""
    if math.isnan(loss):
        return loss
    return math.exp(loss) if loss < 709.0 else float("inf")


class WandbWriter:
    """Every record as one ``run.log`` at its step, on the logging rank.

    Mode ``auto`` follows $WANDB_MODE when set; otherwise it tries online and, when that fails
    (no API key, no network), writes an offline run instead: ``wandb sync <run folder>`` uploads
    it later. The run folder is ``<dir>/wandb/{run,offline-run}-<time>-<id>``, dir = $WANDB_DIR or
    the dump folder.
    """

    _INIT_TIMEOUT_S = 30  # an online start without network gives up after this

    def __init__(self, cfg: MetricsConfig, dump_folder: str, run_config: dict | None = None):
        import wandb  # lazy: only runs that log to W&B pay for the import

        self.wandb = wandb
        self.kwargs = dict(
            project=cfg.wandb_project or None, entity=cfg.wandb_entity or None, name=cfg.wandb_run_name or None,
            tags=list(cfg.wandb_tags) or None, dir=os.environ.get("WANDB_DIR") or dump_folder, config=run_config,
        )
        os.makedirs(self.kwargs["dir"], exist_ok=True)
        mode = cfg.wandb_mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or "online"
        self.run, mode = self._start(mode, fallback=cfg.wandb_mode == "auto")
        # An offline run has no name until it is synced: its id is what `wandb sync` and the folder show.
        logger.info(f"W&B run {self.run.name or self.run.id} ({mode}) in {self.run.dir}"
                    + (": upload it with `wandb sync`" if mode == "offline" else ""))

    def _start(self, mode: str, fallback: bool):
        settings = self.wandb.Settings(init_timeout=self._INIT_TIMEOUT_S)
        try:
            return self.wandb.init(mode=mode, settings=settings, **self.kwargs), mode
        except self.wandb.errors.Error as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not (fallback and mode == "online"):
                raise ValueError(
                    f"metrics.enable_wandb: W&B did not start in {mode} mode ({reason}); run `wandb login`, or "
                    f"set metrics.wandb_mode='offline' and upload the run later with `wandb sync`"
                ) from None
            logger.warning(f"W&B online start failed ({reason}): writing an offline run instead; upload it "
                           f"later with `wandb sync <run folder>`")
            return self.wandb.init(mode="offline", settings=settings, **self.kwargs), "offline"

    def write(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


@dataclass
class StepCounters:
    """What the loop accumulates between two log steps (host-side numbers only)."""

    tokens: int = 0
    data_seconds: float = 0.0
    steps: int = 0


class MetricsLogger:
    def __init__(self, cfg: MetricsConfig, dump_folder: str, device: torch.device, flops_per_token: float,
                 non_data_parallel_size: int, total_steps: int, is_logging_rank: bool,
                 run_config: dict | None = None, run_id: str = ""):
        self.cfg = cfg
        self.run_id = run_id  # in every JSON record: runs that share a metrics.jsonl stay apart
        self.flops_per_token = flops_per_token
        self.non_dp = non_data_parallel_size
        self.total_steps = total_steps
        self.peak = peak_flops(cfg, device)
        self.memory = MemoryMonitor(device)
        self.counters = StepCounters()
        self.window_start = time.perf_counter()
        self.is_logging_rank = is_logging_rank
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.pending_validation: dict = {}  # this step's validation values, for the record log() writes
        self._latest: dict = {}  # the last loss and validation loss logged, for the end-of-run summary
        if is_logging_rank:
            os.makedirs(dump_folder, exist_ok=True)
            self.jsonl = open(os.path.join(dump_folder, "metrics.jsonl"), "a")
            if cfg.enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(dump_folder, cfg.save_tb_folder))
            if cfg.enable_wandb:
                self.wandb = WandbWriter(cfg, dump_folder, run_config)

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.cfg.log_freq == 0 or step == self.total_steps

    def log(self, step: int, loss: float, grad_norm: float, lr: float, extra: dict | None = None) -> dict:
        """Close the window ending at ``step``: compute rates, print, write, reset."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        c = self.counters
        # tokens/s per device: the rank's tokens are shared by the cp x tp x pp devices that process them.
        tps = c.tokens / elapsed / self.non_dp
        record = {
            "step": step,
            "loss": loss,
            "perplexity": perplexity(loss),
            "grad_norm": grad_norm,
            "lr": lr,
            "tps": tps,
            "mfu": 100 * self.flops_per_token * tps / self.peak if self.peak else None,
            "data_loading_pct": 100 * c.data_seconds / elapsed,
            "step_time_s": elapsed / max(c.steps, 1),
            **self.memory.read(),
            **(extra or {}),
            **self.pending_validation,
        }
        record["eta_s"] = record["step_time_s"] * (self.total_steps - step)
        self.pending_validation = {}
        self._latest.update(loss=loss, step=step)
        if self.is_logging_rank:
            self._emit(record)
        self.counters = StepCounters()
        self.memory.reset()
        self.window_start = time.perf_counter()
        return record

    def record_validation(self, step: int, values: dict, merge: bool) -> None:
        """The validation result of ``step`` (every rank calls it): into the record of this step's
        ``log()`` when ``merge`` (a log step), else written now as a record of its own. Either way
        its time (``val_seconds``) is taken out of the training window."""
        self.window_start += values.get("val_seconds", 0.0)
        if "val_loss" in values:
            self._latest.update(val_loss=values["val_loss"], val_step=step)
        if merge:
            self.pending_validation = dict(values)
        elif self.is_logging_rank:
            self._emit({"step": step, **values})

    def latest(self) -> dict:
        """The last window's loss (``loss``, ``step``) and the last validation loss (``val_loss``,
        ``val_step``); a key is absent until its first record."""
        return dict(self._latest)

    def _emit(self, r: dict) -> None:
        for line in console_lines(r):
            logger.info(line)
        keyed = {"step": r["step"], "run_id": self.run_id, **r} if self.run_id else r
        self.jsonl.write(json.dumps(keyed) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, r["step"])
        if self.wandb is not None:
            self.wandb.write(r)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.close()
            self.wandb = None  # close() may run twice (error path)


def console_lines(r: dict) -> list[str]:
    """A record's console lines (training, validation): each name is the record's JSON key, each value
    in that key's unit, so a number read on the console is found in metrics.jsonl under the same name."""
    lines = []
    if "loss" in r:
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"step {r['step']:>6}  loss {r['loss']:8.4f}  perplexity {r['perplexity']:9.2f}  grad_norm "
            f"{r['grad_norm']:7.3f}  lr {r['lr']:.2e}  tps {r['tps']:,.0f}  mfu {mfu}  "
            f"memory_gib {r['memory_gib']:.2f}  data_loading_pct {r['data_loading_pct']:.1f}  eta_s {r['eta_s']:,.0f}"
            + (f"  skipped_steps {r['skipped_steps']}" if r.get("skipped_steps") else "")
            + (f"  moe_load_imbalance {r['moe_load_imbalance']:.2f}" if "moe_load_imbalance" in r else "")
        )
    if "val_loss" in r:
        per_source = "".join(f"  {k} {v:.4f}" for k, v in r.items() if k.startswith("val_loss/"))
        lines.append(
            f"step {r['step']:>6}  val_loss {r['val_loss']:8.4f}  val_perplexity {r['val_perplexity']:9.2f}"
            f"{per_source}  val_tokens {r['val_tokens']:,}  val_seconds {r['val_seconds']:.2f}"
        )
    return lines
