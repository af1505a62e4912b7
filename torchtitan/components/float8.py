"""Float8 training of the Linear layers through torchao.

The meta-device model's ``nn.Linear`` layers become torchao ``Float8Linear`` before any
parallelism is applied (``Float8Training.convert``), so TP, AC, compile and FSDP all see the
float8 modules. What stays in high precision: the layers named in ``float8.filter_fqns``
(by default the output projection, whose logits feed the loss) and every Linear whose in or out
features are not multiples of 16 (``torch._scaled_mm`` needs 16-aligned dims).

Recipes: ``tensorwise`` (one scale per tensor; composes with float8 FSDP all-gather and
float8 TP) and ``rowwise`` (one scale per row, more accurate, slower; plain bf16 all-gathers).

Hardware: float8 matmuls need an SM89+ GPU (H100, L4, ...). On CPU ``torch._scaled_mm`` has
a reference kernel, which is how the tests train with it; it is not a speed path there.
"""

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from torchtitan.config.job_config import Float8 as Float8Config
from torchtitan.tools.logging import logger

RECIPES = ("tensorwise", "rowwise")


def _import_torchao():
    # torchao's import warns about every CUDA kernel library a CPU build cannot load, and torch
    # about a deprecated pytree registration of torchao's: noise for a user, hidden here.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        import torchao.float8  # noqa: F401 -- checked here so the error names the fix
    except ImportError as e:
        raise ValueError(
            "float8.enable_float8_linear needs torchao: `pip install torchao` (see requirements.txt), "
            f"or set float8.enable_float8_linear=false ({e})"
        ) from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return torchao.float8


def module_filter(filter_fqns: list[str]) -> Callable[[nn.Module, str], bool]:
    """Which Linear layers are converted: not named in filter_fqns, both dims multiples of 16."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(name in fqn for name in filter_fqns):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return keep


class Float8Training:
    """Validates the float8 section once, converts models, and runs the post-step hook."""

    def __init__(self, cfg: Float8Config, device: torch.device, fsdp_enabled: bool):
        self.cfg = cfg
        self.device_type = device.type
        self.enabled = cfg.enable_float8_linear
        self.precompute_scales = False
        if not self.enabled:
            if cfg.enable_fsdp_float8_all_gather or cfg.precompute_float8_dynamic_scale_for_fsdp:
                logger.warning("float8 FSDP options are ignored: float8.enable_float8_linear is false")
            return
        self.torchao = _import_torchao()
        if cfg.recipe_name not in RECIPES:
            raise ValueError(f"float8.recipe_name must be one of {', '.join(RECIPES)}, got {cfg.recipe_name!r}")
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(
                f"float8 training needs a GPU of compute capability 8.9 or newer (H100, H200, L4, "
                f"B200); this {torch.cuda.get_device_name(device)} is {major}.{minor}. Set "
                "float8.enable_float8_linear=false (bf16 is the fastest path on this GPU)"
            )
        if cfg.recipe_name == "rowwise" and cfg.enable_fsdp_float8_all_gather:
            raise ValueError(
                "float8.enable_fsdp_float8_all_gather works with the tensorwise recipe only (a rowwise "
                "scale cannot be computed from one shard); set it to false or use recipe_name='tensorwise'"
            )
        if cfg.precompute_float8_dynamic_scale_for_fsdp and not cfg.enable_fsdp_float8_all_gather:
            raise ValueError(
                "float8.precompute_float8_dynamic_scale_for_fsdp precomputes the scales of float8 "
                "all-gathers: set float8.enable_fsdp_float8_all_gather=true as well, or turn it off"
            )
        if cfg.enable_fsdp_float8_all_gather and not fsdp_enabled:
            logger.warning("float8.enable_fsdp_float8_all_gather has no effect without FSDP (dp_shard = 1)")
        self.fsdp_float8 = cfg.enable_fsdp_float8_all_gather and fsdp_enabled
        self.precompute_scales = self.fsdp_float8 and cfg.precompute_float8_dynamic_scale_for_fsdp

    @property
    def tensorwise(self) -> bool:
        return self.enabled and self.cfg.recipe_name == "tensorwise"

    def linear_config(self):
        Float8LinearConfig = self.torchao.Float8LinearConfig
        if self.cfg.recipe_name == "rowwise":
            return Float8LinearConfig.from_recipe_name("rowwise")
        return Float8LinearConfig(enable_fsdp_float8_all_gather=self.fsdp_float8)

    def convert(self, model: nn.Module) -> nn.Module:
        """Swap the eligible Linear layers for Float8Linear (in place; meta or real weights)."""
        if not self.enabled:
            return model
        before = {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.torchao.convert_to_float8_training(
            model, config=self.linear_config(), module_filter_fn=module_filter(self.cfg.filter_fqns)
        )
        from torchao.float8.float8_linear import Float8Linear

        converted = {fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)}
        kept = sorted(before - converted)
        logger.info(
            f"float8 ({self.cfg.recipe_name}, fsdp float8 all-gather {self.fsdp_float8}): "
            f"{len(converted)} Linear layers converted; kept in high precision: {', '.join(kept) or 'none'}"
        )
        if not converted:
            raise ValueError(
                "float8.enable_float8_linear converted no Linear layer: every one is filtered by "
                f"float8.filter_fqns={self.cfg.filter_fqns} or has dims that are not multiples of 16"
            )
        return model

    def tp_styles(self) -> dict | None:
        """Float8 TP styles for the blocks' colwise / rowwise / prepare_input, or None for the plain ones.

        Tensorwise on GPU: torchao's float8 styles, which cast before the all-gather so TP
        communicates float8. Rowwise (torchao has no rowwise float8 TP), and on CPU (gloo has no
        float8 dtype): the plain styles; the matmuls still run in float8, the TP collectives in
        high precision.
        """
        if not self.tensorwise or self.device_type == "cpu":
            return None
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        return {"colwise": Float8ColwiseParallel, "rowwise": Float8RowwiseParallel,
                "prepare_input": PrepareFloat8ModuleInput}

    def after_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        """One all-reduce computes the float8 scales of every sharded weight for the next all-gather."""
        if self.precompute_scales:
            for part in model_parts:
                self.torchao.precompute_float8_dynamic_scale_for_fsdp(part)
