"""Routing statistics and aux-loss-free balancing of the MoE layers, across every layout.

The per-layer token counts of this rank's MoE layers are summed over all ranks (one all-reduce
of a [layers, experts] tensor, no host sync): after every optimizer step when the balancing bias
is on (it needs this step's counts), else once per log window. Data-, context- and
expert-parallel ranks saw different tokens, pipeline stages hold different layers (other
layers' rows are zero), and tensor-parallel ranks see the same tokens (a constant factor the
ratios below do not feel). The summed counts move each layer's balancing bias (DeepSeek-V3,
``moe.load_balance_coeff``) identically on every rank, and accumulate over the log window.

Logged (``moe_`` keys in metrics.jsonl and TensorBoard), per log window:
- ``moe_load_imbalance``: the worst layer's max / mean tokens per expert (1.0 = perfectly even);
- ``moe_load_imbalance_mean``: the same ratio averaged over the layers;
- ``moe_aux_loss`` / ``moe_z_loss``: the load-balancing and router z-loss values (mean over layers
  and forwards, before their coefficients; computed even when their coefficient is 0);
- ``moe_dropped_tokens``: routed token copies that reached no expert (dropless routing: 0).
"""

import torch
import torch.nn as nn

from torchtitan.models.moe import moe_modules

_COLUMNS = 4  # per layer besides the experts: aux loss, z loss, forwards, tokens routed (N x top_k)


class MoEMonitor:
    def __init__(self, model_parts: list[nn.Module], n_layers: int, num_experts: int, device: torch.device,
                 balancing: bool):
        self.modules = {}
        for part in model_parts:
            for fqn, moe in moe_modules(part).items():
                self.modules[int(fqn.split(".")[1])] = moe  # "layers.<id>.moe"
        self.n_layers, self.num_experts, self.device = n_layers, num_experts, device
        self.balancing = balancing  # the same on every rank: the config decides, not the stage
        self.window = None

    @classmethod
    def for_model(cls, model_parts: list[nn.Module], args, device: torch.device) -> "MoEMonitor | None":
        """None for a dense model. Every rank must agree: a family is MoE or not, whatever the stage."""
        if getattr(args, "moe", None) is None:
            return None
        return cls(model_parts, args.n_layers, args.moe.num_experts, device, args.moe.load_balance_coeff > 0)

    def after_step(self) -> None:
        """Every rank calls it once per optimizer step, after ``optimizer.step()`` (a collective
        when balancing)."""
        stats = torch.zeros(self.n_layers, self.num_experts + _COLUMNS, device=self.device)
        for layer, moe in self.modules.items():
            s = moe.pop_stats()
            E = s["tokens_per_expert"].numel()
            stats[layer, :E] = s["tokens_per_expert"].to(self.device)
            stats[layer, E:] = torch.stack([s["aux_loss"], s["z_loss"], s["forwards"], s["routed"]]).to(self.device)
        if self.balancing:
            _sum_over_ranks(stats)
            for layer, moe in self.modules.items():
                moe.update_expert_bias(stats[layer, : moe.num_experts])
        self.window = stats if self.window is None else self.window + stats

    def metrics(self) -> dict[str, float]:
        """The window's ``moe_*`` values (host sync; a collective without balancing: every rank
        calls it on log steps), then a new window."""
        window, self.window = self.window, None
        if window is None:
            return {}
        if not self.balancing:  # summed per step already when balancing
            _sum_over_ranks(window)
        E = self.num_experts
        counts, aux, z, forwards, routed = (window[:, :E], window[:, E], window[:, E + 1], window[:, E + 2],
                                            window[:, E + 3])
        moe_layers = forwards > 0
        counts = counts[moe_layers]
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)
        n = forwards[moe_layers].sum().clamp_min(1)
        return {
            "moe_load_imbalance": imbalance.max().item(),
            "moe_load_imbalance_mean": imbalance.mean().item(),
            "moe_aux_loss": (aux[moe_layers].sum() / n).item(),
            "moe_z_loss": (z[moe_layers].sum() / n).item(),
            "moe_dropped_tokens": int((routed[moe_layers].sum() - counts.sum()).item()),
        }


def _sum_over_ranks(stats: torch.Tensor) -> None:
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(stats)
