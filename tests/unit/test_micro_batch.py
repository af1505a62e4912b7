"""Automatic local batch and the OOM retry, as pure functions and with a fake forward/backward."""

import pytest
import torch

from torchtitan.components.auto_batch import (
    GIB,
    MemoryLimit,
    OOMRetry,
    batch_candidates,
    choose_local_batch,
    lower_local_batch,
    memory_limit,
    pipeline_microbatches,
)
from torchtitan.config.job_config import Parallelism, Training
from torchtitan.config.manager import ConfigManager


def fake_peak(per_row: int, fixed: int = 0):
    calls = []

    def peak_of(local_bs: int) -> int:
        calls.append(local_bs)
        return fixed + per_row * local_bs

    return peak_of, calls


def test_candidates_are_divisors_largest_first():
    assert batch_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert batch_candidates(12, multiple_of=2) == [12, 6, 4, 2]
    assert batch_candidates(8, multiple_of=3) == []


def test_the_largest_batch_that_fits_is_chosen():
    limit = MemoryLimit(10 * GIB, "test", 0.1)  # 9 GiB usable
    peak_of, calls = fake_peak(GIB, fixed=2 * GIB)
    assert choose_local_batch(16, peak_of, limit) == (4, 6 * GIB)  # 8 needs 10 GiB
    assert calls == [16, 8, 4]
    assert choose_local_batch(16, fake_peak(GIB // 2)[0], limit)[0] == 16  # everything fits: no accumulation


def test_margin_is_kept_free():
    peak_of, _ = fake_peak(GIB)
    assert choose_local_batch(8, peak_of, MemoryLimit(8 * GIB, "test", 0.0))[0] == 8
    assert choose_local_batch(8, peak_of, MemoryLimit(8 * GIB, "test", 0.5))[0] == 4


def test_pipeline_microbatches_restrict_the_candidates():
    peak_of, calls = fake_peak(GIB)
    assert choose_local_batch(12, peak_of, MemoryLimit(5 * GIB, "test", 0.0), multiple_of=2)[0] == 4
    assert calls == [12, 6, 4]
    assert pipeline_microbatches(Parallelism()) == 1
    assert pipeline_microbatches(Parallelism(pp=2)) == 2  # 1F1B: one per stage by default
    assert pipeline_microbatches(Parallelism(pp=2, pp_microbatches=4)) == 4
    assert pipeline_microbatches(Parallelism(pp=2, pp_schedule="Interleaved1F1B")) == 4  # 2 stages per rank


def test_nothing_fits_is_one_line_naming_the_estimate_and_the_limit():
    with pytest.raises(ValueError) as err:
        choose_local_batch(8, fake_peak(GIB, fixed=3 * GIB)[0], MemoryLimit(4 * GIB, "training.memory_limit_gib",
                                                                          0.1), fix="use more GPUs")
    message = str(err.value)
    assert "\n" not in message
    assert "even a local batch of 1 needs an estimated 4.0 GiB" in message
    assert "3.6 GiB (limit 4.0 GiB, margin 10%) from training.memory_limit_gib" in message
    assert message.endswith("use more GPUs")


def test_memory_limit_sources(monkeypatch):
    cpu = torch.device("cpu")
    explicit = memory_limit(Training(memory_limit_gib=2.5, memory_margin=0.2), cpu)
    assert (explicit.limit, explicit.usable, explicit.source) == (int(2.5 * GIB), int(2 * GIB), "training.memory_limit_gib")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    host = memory_limit(Training(), cpu)
    assert host.margin == 0.1 and "/ 4 process(es)" in host.source and host.limit > 0


def test_lower_local_batch():
    assert [lower_local_batch(b) for b in (8, 6, 9, 5, 2, 1)] == [4, 3, 3, 1, 1, None]


class FakeStep:
    """A forward/backward that runs out of memory above ``fits`` rows per microbatch."""

    def __init__(self, local_bs: int, accum_steps: int, fits: int):
        self.local_bs, self.accum_steps, self.fits = local_bs, accum_steps, fits
        self.device = torch.device("cpu")
        self.calls, self.discarded = [], 0

    def __call__(self, batch):
        self.calls.append((batch["step"], self.local_bs))
        if self.local_bs > self.fits:
            raise torch.OutOfMemoryError("fake")
        return torch.tensor(float(batch["step"]))

    def discard_step(self):
        self.discarded += 1

    def set_local_batch(self, local_bs):
        rows = self.local_bs * self.accum_steps
        self.local_bs, self.accum_steps = local_bs, rows // local_bs


def test_oom_lowers_the_batch_once_and_retries_the_same_batch():
    step, retry = FakeStep(4, 2, fits=2), OOMRetry(enabled=True)
    assert retry(step, {"step": 1}).item() == 1.0
    assert step.calls == [(1, 4), (1, 2)]  # the same batch again, at half the rows
    assert (step.local_bs, step.accum_steps, step.discarded) == (2, 4, 1)
    retry(step, {"step": 2})
    assert step.calls[-1] == (2, 2) and not retry.armed()


def test_oom_is_raised_when_the_batch_cannot_be_lowered_again_or_too_late():
    step = FakeStep(4, 1, fits=1)  # 4 -> 2 still fails: lowered once only
    with pytest.raises(torch.OutOfMemoryError):
        OOMRetry(enabled=True)(step, {"step": 1})
    assert step.calls == [(1, 4), (1, 2)]
    with pytest.raises(torch.OutOfMemoryError):
        OOMRetry(enabled=True)(FakeStep(1, 4, fits=0), {"step": 1})
    with pytest.raises(torch.OutOfMemoryError):
        OOMRetry(enabled=False)(FakeStep(4, 1, fits=2), {"step": 1})
    late, retry = FakeStep(4, 1, fits=4), OOMRetry(enabled=True, steps=3)
    for s in (1, 2, 3):
        retry(late, {"step": s})
    late.fits = 2  # the 4th step: past the start-up window
    with pytest.raises(torch.OutOfMemoryError):
        retry(late, {"step": 4})


def parse(*argv):
    return ConfigManager().parse_args(list(argv))


def test_config_accepts_auto_and_checks_the_new_keys():
    assert parse("--training.local_batch_size", "0").training.local_batch_size == 0
    for argv, pattern in (
        (("--training.local_batch_size", "-2"), r"local_batch_size must be a positive integer, -1 .* or 0 \(auto\)"),
        (("--training.memory_limit_gib", "-1"), r"memory_limit_gib must be >= 0"),
        (("--training.memory_margin", "1"), r"memory_margin must be in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=pattern):
            parse(*argv)
