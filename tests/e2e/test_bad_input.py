"""What a new user gets wrong: each mistake ends in one short ``error: ...`` paragraph that names the
problem and the fix (exit code 1, no traceback), and never touches an existing checkpoint.

Every case runs ``python train.py`` in a child process against a dump folder that already holds a
complete checkpoint, and checks afterwards that its files are byte-identical.
Also: files a user is handed (DCP checkpoints, Meta ``.pth`` shards) are never unpickled without
restriction: a pickle that would run code is refused and the code does not run.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import tiny_args

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 40


def train(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1")
    full.pop("TORCHTITAN_TRACEBACK", None)
    full.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=full, timeout=300, cwd=REPO)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, a short stderr without a traceback, one ``error:`` line holding every fragment."""
    err = proc.stderr
    assert proc.returncode == 1, f"exit code {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(err.splitlines()) < MAX_LINES, f"{len(err.splitlines())} lines of stderr:\n{err[-3000:]}"
    lines = [x for x in err.splitlines() if "error:" in x]
    assert lines, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    return lines[-1]


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A dump folder with one complete checkpoint (step-2) of the tiny model."""
    dump = tmp_path_factory.mktemp("trained")
    proc = train(tiny_args(dump, cache_dir, 2, "--checkpoint.enable", "--checkpoint.interval", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (dump / "checkpoint" / "step-2" / ".metadata").is_file()
    return dump


_BEFORE: dict[Path, dict[str, str]] = {}


@pytest.fixture
def dump(trained, tmp_path) -> Path:
    """A private copy of the trained dump folder; after the test its checkpoint must be unchanged
    (compared with the state ``premise()`` recorded, else with the copy as made)."""
    copy = tmp_path / "dump"
    shutil.copytree(trained, copy)
    premise(copy)
    yield copy
    assert fingerprint(copy / "checkpoint") == _BEFORE.pop(copy), "a failed run changed the existing checkpoint"


def premise(dump: Path) -> None:
    """Record the checkpoint files as they are before the run (after a test's deliberate damage)."""
    _BEFORE[dump] = fingerprint(dump / "checkpoint")


def args_for(dump: Path, cache: Path, *extra: str) -> list[str]:
    """The run resumes from the dump folder's checkpoint (were it not for the mistake)."""
    return tiny_args(dump, cache, 4, "--checkpoint.enable", "--checkpoint.interval", "2", *extra)


def fresh_args(dump: Path, cache: Path, *extra: str) -> list[str]:
    """A new run on new data, in a folder of its own beside ``dump`` (into ``dump`` it would be refused
    first: the folder holds another run)."""
    return tiny_args(dump.parent / "fresh", cache, 4, *extra)


# ---- one test per mistake ------------------------------------------------------------------------
def test_malformed_toml_names_line_and_column(dump, cache_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nsteps = 3\n[optimizer\nlr = 1e-3\n")
    proc = train(args_for(dump, cache_dir) + ["--job.config_file", str(bad)])
    assert_user_error(proc, str(bad), "not valid TOML", "line 3", "column", "Fix the syntax")


def test_unknown_key_suggests_the_closest(dump, cache_dir):
    proc = train(args_for(dump, cache_dir, "--training.stepz", "3"))
    assert_user_error(proc, "training.stepz", "did you mean 'training.steps'")


def test_degrees_not_matching_the_world_size(dump, cache_dir):
    proc = train(args_for(dump, cache_dir, "--parallelism.tp", "2", "--parallelism.dp_shard", "1"))
    assert_user_error(proc, "world_size=1", "tp=2", "Set the [parallelism] degrees")


def test_missing_tokenizer_file(dump, cache_dir, tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    proc = train(args_for(dump, cache_dir, "--tokenizer.path", str(missing)))
    assert_user_error(proc, str(missing), "does not exist", "set tokenizer.path")


def test_missing_dataset_path(dump, cache_dir, tmp_path):
    missing = tmp_path / "my_corpus"
    proc = train(fresh_args(dump, cache_dir, "--data.datasets", str(missing)))
    assert_user_error(proc, str(missing), "not a known name nor an existing path", "accepted:")


def test_empty_dataset_folder(dump, cache_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = train(fresh_args(dump, cache_dir, "--data.datasets", str(tmp_path / "empty")))
    assert_user_error(proc, str(tmp_path / "empty"), "holds no", "point data.datasets at")


def test_empty_jsonl_dataset(dump, cache_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = train(fresh_args(dump, cache_dir, "--data.datasets", str(tmp_path / "empty.jsonl")))
    assert_user_error(proc, "empty.jsonl", "has no documents", "data.text_field")


def test_dataset_shorter_than_one_sequence(dump, cache_dir, tmp_path):
    (tmp_path / "short.jsonl").write_text('{"text": "hi"}\n')
    proc = train(fresh_args(dump, cache_dir, "--data.datasets", str(tmp_path / "short.jsonl")))
    assert_user_error(proc, "short.jsonl", "fewer than one sequence", "lower training.seq_len")


def test_dump_folder_that_cannot_be_written(cache_dir, tmp_path):
    """Tests run as root, which ignores permission bits: a path through a regular file fails for
    everyone (the probe is a real write, so a read-only mount fails the same way)."""
    (tmp_path / "afile").write_text("not a folder")
    target = tmp_path / "afile" / "sub"
    proc = train(tiny_args(target, cache_dir, 2))
    assert_user_error(proc, str(target), "not a writable folder", "--job.dump_folder")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_truncated_checkpoint_data_file(dump, cache_dir):
    data = sorted((dump / "checkpoint" / "step-2").glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:1000])
    premise(dump)  # the damage is the premise; the run must add none
    proc = train(args_for(dump, cache_dir))
    assert_user_error(proc, "could not load checkpoint", "step-2", "truncated", "checkpoint.load_step")


def test_garbage_checkpoint_metadata(dump, cache_dir):
    (dump / "checkpoint" / "step-2" / ".metadata").write_bytes(b"garbage\n")
    premise(dump)
    proc = train(args_for(dump, cache_dir))
    assert_user_error(proc, ".metadata", "corrupted", "checkpoint.load_step")


def test_traceback_on_request(cache_dir, tmp_path):
    """TORCHTITAN_TRACEBACK=1 gives the developer the full traceback."""
    proc = train(tiny_args(tmp_path, cache_dir, 2, "--training.stepz", "3"), env={"TORCHTITAN_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "training.stepz" in proc.stderr


# ---- no unrestricted unpickling of what a user is handed -------------------------------------------
class _Evil:
    """Unpickling runs ``touch <marker>``; a safe loader must refuse before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_load_is_always_weights_only():
    out = subprocess.run(["grep", "-rn", "torch.load(", "torchtitan", "scripts"], capture_output=True, text=True,
                         cwd=REPO).stdout
    calls = [x for x in out.splitlines() if "torch.load(" in x.split(":", 2)[2].split("#")[0]]
    unsafe = [x for x in calls if "weights_only=True" not in x]
    assert calls and not unsafe, unsafe


def _nested_checkpoint(ckpt: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp / "flat.pt")
    return torch.load(tmp / "flat.pt", weights_only=True)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in this process
@pytest.mark.parametrize("where", ["train_state", "dataloader", "metadata"])
def test_malicious_pickle_in_a_checkpoint_is_refused(where, trained, cache_dir, tmp_path):
    """A checkpoint whose pickled parts (a non-tensor value, the data loader blob, or DCP's own
    ``.metadata``) would run code on load: the run refuses it and the code never runs."""
    import pickle

    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    dump = tmp_path / "dump"
    step = dump / "checkpoint" / "step-2"
    if where == "metadata":
        shutil.copytree(trained, dump)
        (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    else:
        sd = _nested_checkpoint(trained / "checkpoint" / "step-2", tmp_path)
        if where == "train_state":
            sd["train_state"]["step"] = _Evil(marker)
        else:
            sd["dataloader"]["blob"] = pickle.dumps(_Evil(marker))
        dcp.save(sd, checkpoint_id=str(step))
    proc = train(args_for(dump, cache_dir))
    line = assert_user_error(proc, "step-2")
    assert "nsafe" in line or "refus" in line or "Unpickl" in line or "eights only" in line, line
    assert not marker.exists(), "the malicious pickle ran"


def test_malicious_meta_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text('{"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, '
                                      '"vocab_size": 256, "norm_eps": 1e-5, "rope_theta": 500000.0}')
    torch.save({"tok_embeddings.weight": _Evil(marker)}, meta / "consolidated.00.pth")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_llama_to_dcp.py"), str(meta),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "refused to unpickle" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the malicious pickle ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,fragments", [
    (["--parallelism.ep", "2", "--parallelism.dp_shard", "1", "--parallelism.dp_replicate", "1"], ("parallelism.ep=2",)),
    (["--model.name", "qwen", "--parallelism.ep", "1"], ("model.name 'qwen'", "qwen3")),
    (["--model.name", "qwen3", "--model.flavor", "debugmodel_mo"], ("debugmodel_moe",)),
    (["--moe.score_func", "relu"], ("moe.score_func", "softmax")),
    (["--model.attention_backend", "flex", "--model.attention_mask", "block_causal"],
     ("model.attention_backend='flex'", "CUDA", "'auto'")),
    (["--model.attention_mask", "document"], ("model.attention_mask", "block_causal")),
    (["--data.max_document_tokens", "-1"], ("data.max_document_tokens=-1",)),
])
def test_model_and_expert_parallel_mistakes_are_one_line(extra, fragments, tmp_path, cache_dir):
    assert_user_error(train(tiny_args(tmp_path, cache_dir, 1, *extra)), *fragments)


def test_expert_parallel_on_a_dense_model_is_refused(tmp_path, cache_dir):
    """One process cannot hold ep=2, but the dense-model check comes first when it can: ask the builder."""
    from torchtitan.components.model_builder import build_model_args
    from torchtitan.config.manager import ConfigManager
    from torchtitan.models.registry import get_spec

    cfg = ConfigManager().parse_args(["--model.name", "qwen3", "--model.flavor", "debugmodel", "--parallelism.ep", "2"])
    with pytest.raises(ValueError, match=r"parallelism.ep=2 needs a mixture-of-experts model.*debugmodel_moe"):
        build_model_args(cfg, get_spec("qwen3"), 2048)
