"""Network-facing data fails clearly and retries honestly: an unreachable hub dataset is one line with
the fix; a stream that breaks mid-run is reopened at the exact position it had reached (no document
skipped or repeated), a bounded number of times, then fails clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan.datasets.sources import HFSource

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"document {i} " + "word " * (i % 5) for i in range(23)]


class FlakyStream:
    """A real streaming dataset (local jsonl) whose connection breaks before the records whose
    global index is in ``breaks`` (each break fires ``times`` times in a row)."""

    def __init__(self, dataset, breaks: set[int], times: int = 1):
        self.dataset, self.breaks, self.times = dataset, dict.fromkeys(breaks, times), times
        self.served = 0  # records handed out (across reopenings)

    def iter(self, batch_size: int):
        for batch in self.dataset.iter(batch_size=batch_size):
            if self.breaks.get(self.served, 0) > 0:
                self.breaks[self.served] -= 1
                raise ConnectionError(f"Connection reset by peer (before record {self.served})")
            self.served += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """``datasets.load_dataset(<any repo>, streaming=True)`` answered from a local jsonl file."""
    import datasets

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    real = datasets.load_dataset

    def load(repo, name=None, split="train", streaming=True):
        return real("json", data_files=str(path), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return load


def _take(source, n: int) -> list[str]:
    it = iter(source)
    return [next(it) for _ in range(n)]


def test_a_broken_stream_resumes_at_the_exact_document(local_hub):
    clean = _take(HFSource("some/repo"), 2 * len(TEXTS) + 5)  # into the third epoch
    flaky = HFSource("some/repo", retries=2, retry_seconds=0)
    flaky.dataset = FlakyStream(flaky.dataset, breaks={0, 7, 8, 30}, times=2)  # twice in a row at 7
    assert _take(flaky, len(clean)) == clean
    assert flaky.dataset.breaks == dict.fromkeys((0, 7, 8, 30), 0)  # every injected break happened


def test_a_stream_that_stays_broken_fails_in_one_line(local_hub):
    source = HFSource("some/repo", retries=2, retry_seconds=0)
    source.dataset = FlakyStream(source.dataset, breaks={5}, times=3)
    with pytest.raises(ValueError, match=r"'some/repo': the stream broke 3 times in a row \(ConnectionError"):
        _take(source, 10)


def test_an_unreachable_hub_dataset_is_one_line_with_the_fix(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf"))
    args = ["--job.config_file", str(REPO / "train_configs/debug_model.toml"), "--job.dump_folder",
            str(tmp_path / "run"), "--data.datasets", "hf:no-such-user/no-such-dataset", "--training.steps", "1"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "no-such-user/no-such-dataset" in errors[0] and "local copy" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
