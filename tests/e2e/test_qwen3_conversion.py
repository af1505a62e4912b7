"""Qwen3-MoE through the conversion scripts and the end-of-training export: the family is picked
from config.json's model_type or the run's config.toml, the round trips are exact, and the
exported folder loads in transformers with the logits of the trained model."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtitan.components.weight_conversion import dcp_model_args, load_dcp_model_state, load_hf_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """2 steps of the tiny Qwen3-MoE with a checkpoint and the end-of-training HF export."""
    dump = tmp_path_factory.mktemp("qwen3_moe_run")
    cmd = [
        sys.executable, str(REPO / "train.py"), "--model.name", "qwen3", "--model.flavor", "debugmodel_moe_tiny",
        "--training.steps", "2", "--training.seq_len", "64", "--training.global_batch_size", "4",
        "--checkpoint.enable", "--checkpoint.hf_export_folder", "hf", "--job.dump_folder", str(dump),
        "--tokenizer.cache_dir", str(cache_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dump


def test_export_is_qwen3_moe_and_matches_the_checkpoint(trained, tmp_path):
    ckpt = trained / "checkpoint" / "step-2"
    _script("convert_dcp_to_hf").main([str(ckpt), str(tmp_path / "hf")])  # family from config.toml
    exported, converted = load_file(trained / "hf" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)
    config = json.loads((trained / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]

    sd = load_dcp_model_state(ckpt)
    args = dcp_model_args(ckpt, sd)
    from torchtitan.models.qwen3 import Qwen3Model

    ours = Qwen3Model(args)
    ours.load_state_dict(sd)
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        err = ((ours(tokens) - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, err


def test_hf_to_dcp_to_hf_round_trip_is_exact(trained, tmp_path):
    """convert_hf_to_dcp reads model_type qwen3_moe; back through convert_dcp_to_hf: same tensors."""
    _script("convert_hf_to_dcp").main([str(trained / "hf"), str(tmp_path / "dcp")])
    assert json.loads((tmp_path / "dcp" / "model_args.json").read_text())["model_name"] == "qwen3"
    _script("convert_dcp_to_hf").main([str(tmp_path / "dcp"), str(tmp_path / "hf2")])
    a, b = load_file(trained / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd, args = load_hf_checkpoint(trained / "hf")
    assert args.moe is not None and args.moe.top_k == 2 and "layers.0.moe.experts.w1" in sd
