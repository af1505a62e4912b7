"""Network-facing data fails clearly and retries honestly: an unreachable hub dataset is one line with
the fix; a stream that breaks mid-run is reopened at the exact position it had reached (no document
skipped or repeated), a bounded number of times, then fails clearly."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchtitan.datasets import hub_access
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub reachability probe: the local hub needs no network
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


# ---- an unreachable hub: one line at once, not the hub client's ~25 s of retries ----------------


@pytest.fixture
def online(monkeypatch):
    """Offline mode off, and ``load_dataset`` recording whether it was reached."""
    import datasets
    import datasets.config

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
    return calls


def test_an_unresolvable_hub_fails_at_once_without_opening_the_dataset(online, monkeypatch):
    import datasets.config

    # .invalid never resolves (RFC 2606): no request leaves for a real host.
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "https://hub.no-such-host.invalid")
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        HFSource("allenai/c4", "en")
    assert time.perf_counter() - start < hub_access.LOOKUP_SECONDS + hub_access.CONNECT_SECONDS + 1
    message = str(err.value)
    assert "'allenai/c4:en': the hub is unreachable (cannot resolve hub.no-such-host.invalid" in message
    assert "local copy" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert online == []  # never handed to the hub client and its retries


def test_a_closed_port_is_unreachable_and_a_listening_one_is_not():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub_access.unreachable_reason(f"http://127.0.0.1:{port}") is None
    assert f"cannot connect to 127.0.0.1:{port}" in hub_access.unreachable_reason(f"http://127.0.0.1:{port}")


def test_offline_mode_skips_the_probe_and_names_the_cache(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_access, "unreachable_reason", lambda endpoint: pytest.fail("probed while offline"))

    def not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/x' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(ValueError, match=r"'org/x' \(split 'train'\) is not in the Hugging Face cache and "
                                         r"HF_HUB_OFFLINE=1 forbids downloading it"):
        HFSource("org/x")
