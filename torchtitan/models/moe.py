"""A generic, dropless token-choice mixture-of-experts layer (Qwen3-MoE / DeepSeek-V3 style).

Every token picks ``top_k`` routed experts (SwiGLU MLPs stored as 3-D weights [E, F, D]); its
output is the routing-weighted sum of theirs plus an optional shared expert that sees every
token. No capacity factor: no token is dropped, the experts get groups of any size (also 0).

Tensor names carry their shape: B batch, T sequence, D model dim, F expert hidden dim,
E experts, K top_k, N tokens (B x T), R routed token copies (N x K).

Parallelism lives in ``parallelisms/expert_parallel.py``: its hooks decide which token rows
reach ``GroupedExperts`` and which shard of the weights it holds (local DTensor shards).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchtitan.models.layers import FeedForward

_SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class MoEArgs:
    num_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 256  # per routed expert
    num_shared_experts: int = 0  # one shared SwiGLU of hidden_dim * num_shared_experts
    score_func: str = "softmax"
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (Qwen3)
    route_scale: float = 1.0
    load_balance_coeff: float = 0.0  # aux-loss-free bias update rate (DeepSeek-V3); 0 = off
    aux_loss_coeff: float = 0.0  # Switch load-balancing loss E * sum_i f_i * P_i
    z_loss_coeff: float = 0.0  # router z-loss mean(logsumexp(logits)^2)
    use_grouped_mm: bool = True

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"moe num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe top_k={self.top_k} must be between 1 and num_experts={self.num_experts}: "
                f"each token picks top_k distinct experts; lower top_k or raise num_experts"
            )
        if self.score_func not in _SCORE_FUNCS:
            raise ValueError(f"moe score_func={self.score_func!r} is unknown: use one of {_SCORE_FUNCS}")


class TokenChoiceTopKRouter(nn.Module):
    """Scores every expert per token and keeps the top_k.

    For softmax + norm_topk_prob this is exactly Hugging Face's Qwen3MoeTopKRouter: softmax
    in fp32, torch.topk (same tie order), renormalise in fp32, then cast to the input dtype.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 norm_topk_prob: bool = True, route_scale: float = 1.0):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.norm_topk_prob, self.route_scale = score_func, norm_topk_prob, route_scale

    def forward(self, x_ND: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        """-> (weights_NK in x's dtype, experts_NK int64, scores_NE fp32, logits_NE)."""
        logits_NE = self.gate(x_ND)
        if self.score_func == "softmax":
            scores_NE = F.softmax(logits_NE, dim=-1, dtype=torch.float32)
        else:
            scores_NE = torch.sigmoid(logits_NE.float())
        if expert_bias_E is None:
            weights_NK, experts_NK = torch.topk(scores_NE, self.top_k, dim=-1)
        else:
            # The bias only steers WHICH experts are picked; the weights stay the raw scores (DeepSeek-V3).
            _, experts_NK = torch.topk(scores_NE + expert_bias_E, self.top_k, dim=-1)
            weights_NK = scores_NE.gather(-1, experts_NK)
        if self._normalize():
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        weights_NK = (weights_NK * self.route_scale).to(x_ND.dtype)
        return weights_NK, experts_NK, scores_NE, logits_NE

    def _normalize(self) -> bool:
        # A single sigmoid weight renormalised is always 1 and the gate would get no gradient.
        return self.norm_topk_prob and (self.score_func == "softmax" or self.top_k > 1)

    def init_weights(self, init_std: float = 0.02):
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=0.02)


class _GroupedMM(torch.autograd.Function):
    """out_RO = x_RI @ w_EOI[e].T for the rows of each expert e, backward also with _grouped_mm.

    torch 2.13 on CPU runs ``_grouped_mm``'s forward but its autograd backward fails
    ("Invalid strides/sizes"); both gradients are again plain grouped GEMMs: grad_x uses the
    3-D weights, grad_w the 2-D x 2-D form whose offsets run along K (empty groups give 0).
    """

    @staticmethod
    def forward(ctx, x_RI, w_EOI, offs_E):
        ctx.save_for_backward(x_RI, w_EOI, offs_E)
        return torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs_E)

    @staticmethod
    def backward(ctx, grad_RO):
        x_RI, w_EOI, offs_E = ctx.saved_tensors
        grad_RO = grad_RO.contiguous()
        grad_x_RI = torch._grouped_mm(grad_RO, w_EOI, offs=offs_E)
        grad_w_EOI = torch._grouped_mm(grad_RO.t(), x_RI, offs=offs_E)
        return grad_x_RI, grad_w_EOI, None


def _grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if x_RI.is_cuda:  # CUDA has a native backward
        return torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs_E)
    return _GroupedMM.apply(x_RI, w_EOI, offs_E)


def _local(w: torch.Tensor) -> torch.Tensor:
    # After EP/TP the weights are DTensors: compute with this rank's shard; the parallel
    # style's hooks already sent this rank the tokens of its experts.
    return w.to_local() if hasattr(w, "to_local") else w


class GroupedExperts(nn.Module):
    """E SwiGLU experts held as 3-D weights, each [out, in] per expert like nn.Linear.weight."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = True):
        super().__init__()
        self.num_experts, self.use_grouped_mm = num_experts, use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows of x grouped by expert in expert order; counts per (local) expert."""
        w1_EFD, w2_EDF, w3_EFD = _local(self.w1), _local(self.w2), _local(self.w3)
        assert num_tokens_per_expert_E.numel() == w1_EFD.shape[0], "one count per local expert"
        if self._grouped_mm_ok(x_RD, w1_EFD):
            offs_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
            h_RF = F.silu(_grouped_mm(x_RD, w1_EFD, offs_E)) * _grouped_mm(x_RD, w3_EFD, offs_E)
            return _grouped_mm(h_RF, w2_EDF, offs_E)
        return self._loop(x_RD, num_tokens_per_expert_E, w1_EFD, w2_EDF, w3_EFD)

    def _grouped_mm_ok(self, x_RD: torch.Tensor, w1_EFD: torch.Tensor) -> bool:
        if not self.use_grouped_mm:
            return False
        # CUDA's grouped GEMM takes bf16 only (no fp32 kernel): fp32 on CUDA uses the loop.
        if x_RD.is_cuda and x_RD.dtype != torch.bfloat16:
            return False
        # _grouped_mm needs every non-unit stride to be a multiple of 16 bytes (D and F rows).
        align = 16 // x_RD.element_size()
        return x_RD.shape[-1] % align == 0 and w1_EFD.shape[1] % align == 0

    @staticmethod
    def _loop(x_RD, counts_E, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
        # split needs the counts on the host: one device sync, acceptable for a fallback.
        outs = []
        for e, x_nD in enumerate(torch.split(x_RD, counts_E.tolist(), dim=0)):
            h_nF = F.silu(x_nD @ w1_EFD[e].T) * (x_nD @ w3_EFD[e].T)
            outs.append(h_nF @ w2_EDF[e].T)
        return torch.cat(outs, dim=0)

    def init_weights(self, init_std: float):
        nn.init.trunc_normal_(self.w1, mean=0.0, std=0.02)
        for w in (self.w2, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=init_std)


class _AddAuxLossGrad(torch.autograd.Function):
    """Identity on the output; in backward also sends ``scale`` into the auxiliary loss.

    Same gradient as adding ``scale * aux_loss`` to the training loss, without returning it:
    the MoE's output signature (and a pipeline stage's) stays a plain tensor.
    """

    @staticmethod
    def forward(ctx, out, aux_loss, scale: float):
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_out.device)
        return grad_out, grad_aux, None


class MoE(nn.Module):
    """Router -> sort token copies by expert -> GroupedExperts -> weighted scatter-add (+ shared expert).

    ``aux_loss_scale`` is set by the trainer to 1 / (gradient accumulation steps x pipeline
    microbatches), the factor the training loss of one forward carries. Routing statistics
    accumulate on plain tensor attributes (not buffers: a meta-built model materialised with
    ``to_empty`` would leave buffers uninitialised) until ``pop_stats()``.
    """

    def __init__(self, moe_args: MoEArgs, dim: int):
        super().__init__()
        a = moe_args
        self.moe_args, self.num_experts, self.top_k = a, a.num_experts, a.top_k
        self.router = TokenChoiceTopKRouter(dim, a.num_experts, a.top_k, a.score_func, a.norm_topk_prob, a.route_scale)
        self.experts = GroupedExperts(dim, a.hidden_dim, a.num_experts, a.use_grouped_mm)
        self.shared_experts = FeedForward(dim, a.hidden_dim * a.num_shared_experts) if a.num_shared_experts else None
        if a.load_balance_coeff > 0:
            self.register_buffer("expert_bias", torch.zeros(a.num_experts, dtype=torch.float32), persistent=True)
        else:
            self.expert_bias = None
        self.aux_loss_scale: float = 1.0
        self._stats: dict[str, torch.Tensor] | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        weights_NK, experts_NK, scores_NE, logits_NE = self.router(x_ND, self.expert_bias)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E.scatter_add_(0, experts_NK.reshape(-1), torch.ones_like(experts_NK.reshape(-1)))
        # Stable sort: a token's copies stay in token order within each expert's group.
        order_R = torch.argsort(experts_NK.reshape(-1), stable=True)
        token_R = order_R // self.top_k
        y_RD = self.experts(x_ND[token_R], counts_E)
        y_RD = y_RD * weights_NK.reshape(-1)[order_R, None]  # expert output x weight, as HF
        out_ND = y_RD.new_zeros(B * T, D).index_add(0, token_R, y_RD)
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        out_ND = self._aux_losses(out_ND, counts_E, scores_NE, logits_NE)
        return out_ND.reshape(B, T, D)

    def _aux_losses(self, out_ND, counts_E, scores_NE, logits_NE) -> torch.Tensor:
        a = self.moe_args
        want_grad = torch.is_grad_enabled() and (a.aux_loss_coeff > 0 or a.z_loss_coeff > 0)
        with torch.set_grad_enabled(want_grad):
            aux, z = load_balance_loss(counts_E, scores_NE, a.score_func), z_loss(logits_NE)
        if want_grad:
            total = a.aux_loss_coeff * aux + a.z_loss_coeff * z
            out_ND = _AddAuxLossGrad.apply(out_ND, total, self.aux_loss_scale)
        self._accumulate(counts_E, aux, z, routed=scores_NE.shape[0] * self.top_k)
        return out_ND

    def _accumulate(self, counts_E, aux, z, routed: int) -> None:
        # Activation-checkpoint recomputation runs inside backward: that forward already counted.
        if torch._C._current_graph_task_id() != -1:
            return
        if self._stats is None:
            self._stats = self._zero_stats(counts_E.device)
        s = self._stats
        s["tokens_per_expert"] += counts_E.detach().float()
        s["aux_loss"] += aux.detach().float()
        s["z_loss"] += z.detach().float()
        s["forwards"] += 1
        s["routed"] += routed  # token copies asked for: N x top_k (dropless: all reach an expert)

    def _zero_stats(self, device) -> dict[str, torch.Tensor]:
        zero = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
        return {"tokens_per_expert": zero(self.num_experts), "aux_loss": zero(()), "z_loss": zero(()),
                "forwards": zero(()), "routed": zero(())}

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Token counts per expert [E] (fp32), summed aux/z loss values and the forward count since
        the last call (zeros when none); then reset. Local to this rank: reduce them yourself."""
        stats = self._stats if self._stats is not None else self._zero_stats(self.router.gate.weight.device)
        self._stats = None
        return stats

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower the
        others'. Pass counts already summed over every rank so all ranks apply the same update."""
        if self.expert_bias is None:
            raise ValueError("update_expert_bias needs moe load_balance_coeff > 0 (the expert bias is off)")
        counts_E = tokens_per_expert_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.moe_args.load_balance_coeff * torch.sign(counts_E.mean() - counts_E)

    def init_weights(self, init_std: float):
        self.router.init_weights()
        self.experts.init_weights(init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std)
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()


def load_balance_loss(counts_E: torch.Tensor, scores_NE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Switch / Qwen3 aux loss E * sum_i f_i * P_i: f_i the share of tokens sent to expert i
    (sums to top_k, as HF), P_i its mean routing probability (sigmoid scores normalised per token)."""
    if score_func == "sigmoid":
        scores_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    n_tokens = scores_NE.shape[0]
    f_E = counts_E.float() / max(n_tokens, 1)
    return scores_NE.shape[1] * (f_E * scores_NE.mean(dim=0)).sum()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): keeps the logits small so the softmax stays well conditioned."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def moe_modules(model: nn.Module) -> dict[str, MoE]:
    """Every MoE in ``model`` by its clean FQN (activation-checkpoint / compile wrappers stripped)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            found[name] = module
    return found
