"""torch.compile applied per transformer block (family-independent)."""

import torch.nn as nn

from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.tools.logging import logger


def apply_compile(model: nn.Module, cfg: CompileConfig) -> None:
    """Compile each block on its own: same graph for every layer, so it compiles once.

    Under TP the blocks take and return Shard(1) DTensors (see tensor_parallel.apply_tp_edges),
    which is what keeps per-block compile working together with sequence parallel. A
    mixture-of-experts block has data-dependent shapes (tokens per expert, all-to-all splits):
    only its attention is compiled, the MoE (router, dispatch, grouped GEMM) runs eagerly.
    """
    n_moe = 0
    for block in model.layers.children():
        if getattr(block, "moe_enabled", False):
            n_moe += 1
            block.attention.compile(backend=cfg.backend, fullgraph=True)
        else:
            block.compile(backend=cfg.backend, fullgraph=True)
    extra = f" ({n_moe} MoE blocks: attention only)" if n_moe else ""
    logger.info(f"compiled each transformer block with torch.compile (backend {cfg.backend}){extra}")
