"""Weight conversion: Meta shards -> DCP, HF <-> DCP, end-of-training HF export (CPU, offline).

Parity checks use a model with wq/wk scaled up (as in test_model.py): with near-uniform
attention a wrong RoPE q/k permutation would barely move the logits.
"""

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.components.tokenizer_training import ensure_embedded_tokenizer
from torchtitan.components.weight_conversion import (
    check_hf_export,
    copy_tokenizer_files,
    dcp_model_args,
    hf_config_to_args,
    load_dcp_model_state,
    load_hf_checkpoint,
    match_flavor,
    save_dcp,
    save_hf_checkpoint,
)
from torchtitan.inference import generate, load_for_inference
from torchtitan.models.llama.meta_checkpoint import merge_meta_shards, meta_params_to_args
from torchtitan.models.llama import RoPEScalingArgs, Transformer, TransformerModelArgs
from torchtitan.models.llama.hf_mapping import to_hf_config
from tests.helpers.builders import script_module as _script
from tests.helpers.builders import small_llama_args as _parity_args

transformers = pytest.importorskip("transformers")
# DCP warns on every single-process load (no process group): that is the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 96


def _small_args(**overrides) -> TransformerModelArgs:
    """The HF-parity model of tests/unit/test_model.py (GQA, llama3 RoPE scaling that matters), 2 layers."""
    return _parity_args(**{"n_layers": 2, **overrides})


def _sharp_model(args: TransformerModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(10.0)
            layer.attention.wk.weight.mul_(10.0)
    return model.eval()


def _tokens(vocab_size: int, batch: int = 2, seq: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


def _dcp_loaded_model(args: TransformerModelArgs, folder: Path) -> Transformer:
    """A fresh model (different seed) loaded the way a trainer loads DCP: in place, "model" key."""
    model = Transformer(args)
    sd = model.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(folder))
    return model.eval()


def _hf_from_pretrained(folder: Path):
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def _relative_error(a_BTV: torch.Tensor, b_BTV: torch.Tensor) -> float:
    return ((a_BTV - b_BTV).abs().max() / b_BTV.abs().max()).item()


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------- Meta format


def _meta_shards(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split a full state dict as fairscale model parallelism lays it out (written independently
    of the converter's table): embedding by columns, column-parallel by rows, row-parallel by columns."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            pieces = t.chunk(n, dim=1)
        elif name.endswith("norm.weight"):
            pieces = [t.clone() for _ in range(n)]
        else:  # wq, wk, wv, w1, w3, output
            pieces = t.chunk(n, dim=0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for shard in shards:
        shard["rope.freqs"] = torch.randn(8)  # Meta checkpoints carry this derived buffer
    return shards


def _write_meta_checkpoint(folder: Path, model: Transformer, n_shards: int) -> None:
    a = model.model_args
    params = {
        "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "ffn_dim_multiplier": a.ffn_dim_multiplier,
        "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "use_scaled_rope": a.rope_scaling is not None,
    }  # fmt: skip
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(_meta_shards(model.state_dict(), n_shards)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


def test_meta_two_shards_convert_to_identical_logits(tmp_path):
    # Meta's params.json has no original_max_position_embeddings (8192 in its code): keep the default.
    args = _small_args(rope_scaling=RoPEScalingArgs(factor=8.0), ffn_dim_multiplier=1.3)
    model = _sharp_model(args)
    _write_meta_checkpoint(tmp_path / "meta", model, n_shards=2)

    _script("convert_llama_to_dcp").main([str(tmp_path / "meta"), str(tmp_path / "dcp"), "--max-seq-len", "128"])

    assert dcp_model_args(tmp_path / "dcp", load_dcp_model_state(tmp_path / "dcp")) == args
    loaded = _dcp_loaded_model(args, tmp_path / "dcp")
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_meta_replicated_weights_must_agree():
    sd = _sharp_model(_small_args()).state_dict()
    shards = _meta_shards(sd, 2)
    shards[1]["norm.weight"] += 1.0
    with pytest.raises(ValueError, match="norm.weight should be replicated"):
        merge_meta_shards(shards)


def test_meta_params_to_args_matches_published_flavor():
    params_8b = {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }  # fmt: skip
    assert match_flavor(meta_params_to_args(params_8b)) == "8B"
    params_1b = {
        "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }  # fmt: skip
    args_1b = meta_params_to_args(params_1b)
    assert args_1b.rope_scaling.factor == 32.0  # Llama 3.2's factor, taken from the 1B flavor
    assert match_flavor(args_1b) == "1B"


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_export_matches_transformers_logits(tmp_path):
    """DCP -> HF folder (sharded) -> LlamaForCausalLM.from_pretrained: same logits as our model."""
    args = _small_args()
    model = _sharp_model(args)
    save_dcp(model.state_dict(), args, tmp_path / "dcp")
    # A 1 MB shard limit forces several safetensors files and the index json.
    _script("convert_dcp_to_hf").main([str(tmp_path / "dcp"), str(tmp_path / "hf"), "--max-shard-gb", "0.001"])
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    hf = _hf_from_pretrained(tmp_path / "hf")
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        err = _relative_error(model(tokens), hf(tokens).logits)
    assert err < 1e-5, err


def test_ours_to_hf_to_ours_is_exact(tmp_path):
    args = _small_args()
    sd = _sharp_model(args).state_dict()
    save_hf_checkpoint(sd, args, tmp_path / "hf", max_shard_bytes=2**20)
    back, back_args = load_hf_checkpoint(tmp_path / "hf")
    _assert_same_tensors(back, sd)
    # HF stores only intermediate_size: (multiple_of, ffn_dim_multiplier) may differ, the FFN size may not.
    assert back_args.ffn_hidden_dim == args.ffn_hidden_dim
    assert dataclasses.replace(back_args, multiple_of=args.multiple_of) == args


def test_hf_to_ours_to_hf_is_exact(tmp_path):
    """A folder written by transformers itself -> DCP -> HF: same tensors, same logits."""
    args = _small_args()
    config = transformers.LlamaConfig(**to_hf_config(args))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # sharp attention, as in _sharp_model: a wrong q/k permutation shows
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    hf.save_pretrained(tmp_path / "hf_in")

    _script("convert_hf_to_dcp").main([str(tmp_path / "hf_in"), str(tmp_path / "dcp")])
    _script("convert_dcp_to_hf").main([str(tmp_path / "dcp"), str(tmp_path / "hf_out")])

    _assert_same_tensors(load_file(tmp_path / "hf_out" / "model.safetensors"),
                         load_file(tmp_path / "hf_in" / "model.safetensors"))
    ours = _dcp_loaded_model(dcp_model_args(tmp_path / "dcp", load_dcp_model_state(tmp_path / "dcp")),
                             tmp_path / "dcp")
    tokens = _tokens(args.vocab_size)
    with torch.no_grad():
        hf.config._attn_implementation = "eager"
        assert _relative_error(ours(tokens), hf(tokens).logits) < 1e-5


def test_hf_config_of_transformers_4_style():
    """Older config.json files keep rope_theta and rope_scaling at the top level."""
    config = {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }  # fmt: skip
    assert match_flavor(hf_config_to_args(config)) == "1B"
    with pytest.raises(ValueError, match="yarn"):
        hf_config_to_args({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_bfloat16_export_loads_in_transformers(tmp_path):
    args = _small_args()
    sd = _sharp_model(args).state_dict()
    save_hf_checkpoint(sd, args, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16


def test_export_rejects_wrong_flavor(tmp_path):
    args = _small_args()
    save_dcp(_sharp_model(args).state_dict(), args, tmp_path / "dcp")
    sd = load_dcp_model_state(tmp_path / "dcp")
    with pytest.raises(ValueError, match="shape"):
        dcp_model_args(tmp_path / "dcp", sd, flavor="debugmodel")  # 16 heads / 8 kv heads: wk differs


def test_flat_model_only_checkpoint_is_read(tmp_path):
    """Model-only saves (seed checkpoint, model_weights_only) hold flat FQNs, no "model." entry."""
    sd = _sharp_model(_small_args()).state_dict()
    dcp.save(sd, checkpoint_id=str(tmp_path / "flat"), no_dist=True)
    _assert_same_tensors(load_dcp_model_state(tmp_path / "flat"), sd)


# ----------------------------------------------------------------------------- a real training run


def _train(dump: Path, cache_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A 2-step debugmodel_tiny run of train.py (deterministic: the same args give the same weights)."""
    cmd = [
        sys.executable, str(REPO / "train.py"), "--model.flavor", "debugmodel_tiny", "--training.steps", "2",
        "--training.seq_len", "64", "--training.global_batch_size", "4",
        "--job.dump_folder", str(dump), "--tokenizer.cache_dir", str(cache_dir), *extra,
    ]  # fmt: skip
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A 2-step debugmodel_tiny run with a checkpoint and the end-of-training HF export."""
    dump = tmp_path_factory.mktemp("run")
    proc = _train(dump, cache_dir, "--checkpoint.enable", "--checkpoint.hf_export_folder", "hf")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dump


def test_training_checkpoint_exports_and_matches(trained, tmp_path):
    ckpt = trained / "checkpoint" / "step-2"
    _script("convert_dcp_to_hf").main([str(ckpt), str(tmp_path / "hf")])

    sd = load_dcp_model_state(ckpt)
    args = dcp_model_args(ckpt, sd)  # from the checkpoint's config.toml
    assert match_flavor(args) == "debugmodel_tiny" and args.max_seq_len == 64
    ours = _dcp_loaded_model(args, ckpt)  # fresh init, then the trained weights
    _assert_same_tensors(ours.state_dict(), sd)
    with torch.no_grad():
        for layer in ours.layers.values():  # sharpen both sides identically, through the HF round trip
            layer.attention.wq.weight.mul_(10.0)
            layer.attention.wk.weight.mul_(10.0)
    save_hf_checkpoint(ours.state_dict(), args, tmp_path / "hf_sharp")
    hf = _hf_from_pretrained(tmp_path / "hf_sharp")
    tokens = _tokens(args.vocab_size, seq=64)
    with torch.no_grad():
        err = _relative_error(ours(tokens), hf(tokens).logits)
    assert err < 1e-5, err


def test_end_of_training_export_is_loadable(trained, tmp_path):
    """checkpoint.hf_export_folder wrote the final weights: equal to the last checkpoint's export."""
    _script("convert_dcp_to_hf").main([str(trained / "checkpoint" / "step-2"), str(tmp_path / "hf")])
    _assert_same_tensors(
        load_file(trained / "hf" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    )
    config = json.loads((trained / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["max_position_embeddings"] == 64
    hf = _hf_from_pretrained(trained / "hf")
    with torch.no_grad():
        logits = hf(_tokens(config["vocab_size"], seq=16)).logits
    assert torch.isfinite(logits).all()


def test_imported_hf_weights_start_a_run_through_initial_load_path(trained, tmp_path, cache_dir):
    """HF folder -> convert_hf_to_dcp -> checkpoint.initial_load_path: the run starts from exactly
    those weights (same first loss as starting from the original training checkpoint)."""
    _script("convert_hf_to_dcp").main([str(trained / "hf"), str(tmp_path / "dcp")])
    first_losses = []
    for name, source in (("from_hf", tmp_path / "dcp"), ("from_ckpt", trained / "checkpoint" / "step-2")):
        dump = tmp_path / name
        cmd = [
            sys.executable, str(REPO / "train.py"), "--model.flavor", "debugmodel_tiny", "--training.steps", "1",
            "--training.seq_len", "64", "--training.global_batch_size", "4", "--metrics.log_freq", "1",
            "--job.dump_folder", str(dump), "--tokenizer.cache_dir", str(cache_dir),
            "--checkpoint.enable", "--checkpoint.initial_load_path", str(source),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"starting from the model weights of {source}" in proc.stderr
        first_losses.append(json.loads((dump / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert first_losses[0] == first_losses[1]


# ----------------------------------------------------------------------------- nothing lost, nothing hidden

# Loaded as sitecustomize into a training run: safetensors' writes fail as on a full disk, after
# the start-up check (which only imports the package) has passed.
_FULL_DISK_SAFETENSORS = """
import errno, os
import safetensors.torch

def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

safetensors.torch.save_file = _full_disk
"""


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def test_failed_export_keeps_the_final_weights(trained, tmp_path, cache_dir):
    """Checkpointing off and the export failing at the end: one error line says where the final
    weights are (the trained ones) and gives the command that exports them later, which works."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_FULL_DISK_SAFETENSORS)
    dump = tmp_path / "run"
    proc = _train(dump, cache_dir, "--checkpoint.hf_export_folder", "hf",
                  env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert proc.returncode == 1
    errors = _error_lines(proc)
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-4000:]
    assert f"the final weights are safe in {dump / 'final_weights'}" in errors[0]
    command = re.search(r"^\s*python scripts/convert_dcp_to_hf\.py (\S+) (\S+)$", proc.stderr, re.M).groups()
    assert command == (str(dump / "final_weights"), str(dump / "hf"))
    # The same run with checkpointing on saved the same weights (training is deterministic on CPU).
    _assert_same_tensors(load_dcp_model_state(dump / "final_weights"),
                         load_dcp_model_state(trained / "checkpoint" / "step-2"))
    _script("convert_dcp_to_hf").main(list(command))
    _assert_same_tensors(load_file(dump / "hf" / "model.safetensors"), load_file(trained / "hf" / "model.safetensors"))
    assert (dump / "hf" / "tokenizer.json").read_text() == (trained / "hf" / "tokenizer.json").read_text()


def test_unwritable_export_folder_is_refused_before_training(tmp_path, cache_dir):
    blocker = tmp_path / "a_file"  # a path through a regular file: unwritable for root too
    blocker.write_text("")
    proc = _train(tmp_path / "run", cache_dir, "--checkpoint.hf_export_folder", str(blocker / "hf"))
    assert proc.returncode == 1
    errors = _error_lines(proc)
    assert len(errors) == 1 and f"checkpoint.hf_export_folder='{blocker / 'hf'}' is not a writable folder" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


def test_missing_safetensors_is_one_line(tmp_path, monkeypatch, capsys):
    args = _small_args()
    save_dcp(_sharp_model(args).state_dict(), args, tmp_path / "dcp")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(ValueError, match=r"hf_export_folder='hf' .* needs the safetensors package.*pip install"):
        check_hf_export("hf", str(tmp_path), tokenizer=None)
    with pytest.raises(SystemExit):
        _script("convert_dcp_to_hf").main([str(tmp_path / "dcp"), str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "convert_dcp_to_hf.py needs the safetensors package" in err[0], err
    assert not (tmp_path / "hf").exists()


def test_written_files_get_the_mode_open_gives(tmp_path, cache_dir):
    """0644 files and 0755 folders under umask 022 (safetensors alone writes 0600)."""
    args = _small_args(vocab_size=4096)  # the embedded tokenizer's size
    old = os.umask(0o022)
    try:
        save_hf_checkpoint(_sharp_model(args).state_dict(), args, tmp_path / "hf", max_shard_bytes=2**21,
                           tokenizer=build_tokenizer("", str(cache_dir)))
        _script("convert_hf_to_dcp").main([str(tmp_path / "hf"), str(tmp_path / "dcp")])
    finally:
        os.umask(old)
    paths = [p for p in tmp_path.rglob("*")]
    assert {p.name for p in paths} >= {"model.safetensors.index.json", "tokenizer.json", "tokenizer", ".metadata"}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    assert modes == {k: "0o755" if (tmp_path / k).is_dir() else "0o644" for k in modes}


def test_trainer_export_files_get_the_mode_open_gives(trained):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (trained / "hf").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_hf_to_dcp_carries_the_tokenizer_to_generate(trained, tmp_path):
    """HF export -> DCP -> generate, no --tokenizer: the carried tokenizer encodes as the run's, and
    the greedy tokens equal those of the training checkpoint; converted back, it is exported again."""
    _script("convert_hf_to_dcp").main([str(trained / "hf"), str(tmp_path / "dcp")])
    carried = sorted(p.name for p in (tmp_path / "dcp" / "tokenizer").iterdir())
    assert carried == ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    converted = load_for_inference(None, tmp_path / "dcp")
    original = load_for_inference(None, trained / "checkpoint" / "step-2")  # the run's config.toml
    text = "def fibonacci(n):\n    return n"
    prompt = original.tokenizer.encode(text, bos=True, eos=False)
    assert converted.tokenizer.encode(text, bos=True, eos=False) == prompt
    assert converted.tokenizer.eos_id == original.tokenizer.eos_id
    assert generate(converted, [prompt], 8) == generate(original, [prompt], 8)
    _script("convert_dcp_to_hf").main([str(tmp_path / "dcp"), str(tmp_path / "hf")])
    assert build_tokenizer(str(tmp_path / "hf")).encode(text, bos=True, eos=False) == prompt


def test_meta_conversion_carries_tokenizer_model(tmp_path, cache_dir):
    """A Meta folder's tokenizer.model (tiktoken format) goes along into the DCP's tokenizer/."""
    model = _sharp_model(_small_args())
    _write_meta_checkpoint(tmp_path / "meta", model, n_shards=1)
    embedded = ensure_embedded_tokenizer(str(cache_dir)).read_bytes()  # the tiktoken format, as Meta's
    (tmp_path / "meta" / "tokenizer.model").write_bytes(embedded)
    _script("convert_llama_to_dcp").main([str(tmp_path / "meta"), str(tmp_path / "dcp")])
    assert (tmp_path / "dcp" / "tokenizer" / "tokenizer.model").read_bytes() == embedded
    assert copy_tokenizer_files(tmp_path / "dcp", tmp_path / "none") is None  # a DCP root has none of its own
