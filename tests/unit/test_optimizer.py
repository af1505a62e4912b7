import math

import pytest
import torch

from torchtitan.components.optimizer import build_lr_scheduler, build_optimizer, lr_multiplier
from torchtitan.config.job_config import LRScheduler, Optimizer


def _lrs(cfg: LRScheduler, total: int, peak: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_lr_scheduler(cfg, opt, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])  # the lr the step uses
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_linear_decay():
    lrs = _lrs(LRScheduler(warmup_steps=4, decay_type="linear", min_lr_ratio=0.0), total=14)
    assert lrs[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert lrs[4] == pytest.approx(1.0)  # first decay step is the peak
    assert lrs[9] == pytest.approx(1.0 - 5 / 9)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_decays_to_min_ratio():
    lrs = _lrs(LRScheduler(warmup_steps=2, decay_type="cosine", min_lr_ratio=0.1), total=12, peak=2.0)
    assert lrs[2] == pytest.approx(2.0)
    mid = 2 + 9 / 2  # progress 0.5 at step 6.5; check step 6 exactly
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (6 - 2) / 9))
    assert lrs[6] == pytest.approx(2.0 * expected)
    assert lrs[-1] == pytest.approx(0.2)
    assert mid > 0


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    lrs = _lrs(LRScheduler(warmup_steps=2, decay_type="wsd", decay_ratio=0.25, min_lr_ratio=0.0), total=20)
    assert lrs[2:15] == pytest.approx([1.0] * 13)  # decay starts at step 20 - 5 = 15
    assert lrs[15] == pytest.approx(1.0)
    assert lrs[17] == pytest.approx(1 - 2 / 4)
    assert lrs[19] == pytest.approx(0.0, abs=1e-12)


def test_scheduler_state_resumes_the_same_values():
    cfg = LRScheduler(warmup_steps=3, decay_type="cosine", min_lr_ratio=0.05)
    full = _lrs(cfg, total=10)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(cfg, opt, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_lr_scheduler(cfg, opt2, 10)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr()[0] == pytest.approx(full[4])


def test_bad_schedule_settings_are_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="decay_type"):
        build_lr_scheduler(LRScheduler(warmup_steps=0, decay_type="exp"), opt, 10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_lr_scheduler(LRScheduler(min_lr_ratio=2.0), opt, 10)


def test_multiplier_never_exceeds_one_and_warmup_starts_above_zero():
    for decay in ("linear", "cosine", "wsd"):
        vals = [lr_multiplier(s, 5, 50, decay, 0.2, 0.0) for s in range(50)]
        assert 0 < vals[0] < 1 and max(vals) == pytest.approx(1.0)


@pytest.mark.parametrize("impl", ["foreach", "for-loop", "fused", "auto"])
def test_adamw_implementations_agree(impl):
    torch.manual_seed(0)
    ref_p = torch.nn.Parameter(torch.randn(8, 8))
    p = torch.nn.Parameter(ref_p.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = build_optimizer(Optimizer(lr=1e-2, implementation=impl), [p], "cpu")
    for _ in range(3):
        g = torch.randn(8, 8)
        ref_p.grad, p.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-7)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer.name"):
        build_optimizer(Optimizer(name="Lion"), [torch.nn.Parameter(torch.zeros(1))], "cpu")
