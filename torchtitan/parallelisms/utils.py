"""Process-group set-up, determinism and the distributed reductions the loop needs."""

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from torchtitan.config.job_config import Comm
from torchtitan.tools.logging import logger


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(comm: Comm, dump_folder: str) -> torch.device:
    """Join the process group (nccl on CUDA, gloo otherwise) and pick this rank's device.

    Works under torchrun and also in a bare process (world size 1), so tests and
    notebooks need no launcher.
    """
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dtype = device_type()
    if dtype == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        _set_nccl_env(comm, dump_folder)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=comm.init_timeout_seconds)
        store = _restart_store(timeout)
        explicit = dict(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend, timeout=timeout, **(explicit if store is not None else {}))
    return device


def _restart_store(timeout: timedelta) -> dist.Store | None:
    """After a torchrun restart (``--max-restarts``): the rendezvous store, under a prefix of its own.

    torchrun's workers reuse the agent's TCPStore across restarts, and the process group's
    address exchange keys of the failed attempt are still there: a restarted rank read the dead
    rank 0's address and failed with "Connection refused" (torch 2.13, gloo). None on the first
    attempt: the default env:// rendezvous.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=not agent_store and os.environ["RANK"] == "0", timeout=timeout,
    )
    return dist.PrefixStore(f"torchtitan_attempt_{attempt}", store)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_nccl_env(comm: Comm, dump_folder: str) -> None:
    # Async error handling turns a hung collective into an exception instead of a hang.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if comm.trace_buf_size > 0:
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(comm.trace_buf_size))
        trace_dir = os.path.join(dump_folder, "comm_trace")
        os.makedirs(trace_dir, exist_ok=True)
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(trace_dir, "rank_"))
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def set_pg_timeout(seconds: float, groups=()) -> bool:
    """Give the default group (and ``groups``) a new collective timeout; True if it was applied.

    Start-up (rendezvous, first compile, checkpoint load) is slow, so the process group starts with
    ``comm.init_timeout_seconds``; once a step has completed, a hung collective should fail fast, so
    the loop tightens it to ``comm.train_timeout_seconds``. torch 2.13 has no public
    ``torch.distributed.set_timeout``: we use ``distributed_c10d._set_pg_timeout`` (sets the gloo and
    nccl backends' default timeout, applied to collectives issued from now on), else
    ``ProcessGroup.set_timeout``, else keep the start-up timeout with a warning.
    """
    if not dist.is_initialized():
        return False
    timeout = timedelta(seconds=seconds)
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    for group in (None, *groups):
        try:
            if setter is not None:
                setter(timeout, group)
            else:
                (group or dist.distributed_c10d._get_default_group()).set_timeout(timeout)
        except (AttributeError, RuntimeError, ValueError) as e:
            logger.warning(f"could not set the collective timeout to {seconds}s ({e!r}); "
                           f"comm.train_timeout_seconds is ignored, the start-up timeout stays")
            return False
    return True


def shutdown_distributed() -> None:
    # Without a final barrier, gloo ranks abort at exit at random (see shared notes).
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed every generator; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def dist_reduce(x: torch.Tensor, op: str, group=None) -> float:
    """Reduce a scalar tensor over ``group`` (all ranks when None) and return a float.

    This is a host sync: the loop calls it on log steps only.
    """
    assert op in ("sum", "max", "mean"), op
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return x.item()
    x = x.detach().clone()
    # gloo has no AVG: sum, then divide.
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return x.item() / (dist.get_world_size(group) if op == "mean" else 1)


def clip_grad_norm_(params, max_norm: float, pp_group=None) -> torch.Tensor:
    """Total gradient norm over every parameter of the model (all ranks), clipped to ``max_norm``.

    With DTensor gradients (FSDP, TP, EP) the norm of each is already global over its mesh.
    Gradients live on different meshes (expert parallel: the experts on their EP mesh, the rest
    on the FSDP mesh), and DTensor ops cannot mix meshes: the norm is taken per mesh and the
    squares added. Pipeline stages hold disjoint parameters, so their squared norms are summed
    over ``pp_group``. ``max_norm <= 0`` only measures.
    """
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # One mesh (every layout without EP): that norm itself, bit for bit as before.
    total = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()
    if pp_group is not None:
        total = total**2
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
