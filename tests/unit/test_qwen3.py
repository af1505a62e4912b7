"""Qwen3 (dense and MoE): HF transformers parity, state-dict / config round trips, flavors, FLOPs.

Parity: our fp32 logits vs `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` loaded with `from_pretrained`
from a folder written with our mapping (config.json from `args_to_config`, safetensors from
`to_hf_state_dict`): the path a real export takes. Random weights, tiny shapes, no downloads.
"""

import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file

from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3.flavors import build_model_args, qwen3_configs
from torchtitan.models.qwen3.hf_mapping import args_to_config, config_to_args, from_hf_state_dict, to_hf_state_dict
from torchtitan.models.qwen3.model import Qwen3ModelArgs, Qwen3Model, get_nparams_and_flops, inactive_expert_nparams

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # max |ours - hf| / max |hf|, fp32
# GQA (4 query heads on 2 kv heads) and head_dim 32 != dim / n_heads = 16.
DENSE = Qwen3ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, vocab_size=128,
                       max_seq_len=32)  # fmt: skip
TIED = replace(DENSE, tie_word_embeddings=True)
# Top-3 of 8 experts, renormalized; layer 1 is a dense block inside the MoE model (mlp_only_layers).
MOE = replace(DENSE, n_layers=3, moe=MoEArgs(num_experts=8, top_k=3, hidden_dim=48, norm_topk_prob=True),
              mlp_only_layers=(1,))  # fmt: skip


def _model(args: Qwen3ModelArgs, seed: int = 0) -> Qwen3Model:
    """Random fp32 model; norms, router and experts made large enough that a wrong mapping shows in the logits."""
    torch.manual_seed(seed)
    model = Qwen3Model(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "router" in name:
                p.normal_(0.0, 0.3)  # peaked routing: top-k well separated
            elif "experts" in name:
                p.normal_(0.0, 0.15)  # experts' share of the logits comparable to the residual's
    return model.eval()


def _hf_model(args: Qwen3ModelArgs, sd: dict, folder, **config_overrides):
    """HF model from_pretrained on a folder written by our mapping (config.json + model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**args_to_config(args, torch.float32), **config_overrides}
    (folder / "config.json").write_text(json.dumps(config))
    hf_sd = {k: v.detach().contiguous() for k, v in to_hf_state_dict(sd, args).items()}
    save_file(hf_sd, folder / "model.safetensors", metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _parity(model: Qwen3Model, hf_model) -> float:
    tokens = torch.randint(0, model.model_args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return _rel_diff(model(tokens), hf_model(input_ids=tokens).logits)


@pytest.mark.parametrize("args", [DENSE, TIED, MOE], ids=["dense", "tied", "moe"])
def test_logits_match_hf(args, tmp_path):
    model = _model(args)
    hf_model = _hf_model(args, model.state_dict(), tmp_path / "hf")
    expected_cls = "Qwen3MoeForCausalLM" if args.moe else "Qwen3ForCausalLM"
    assert type(hf_model).__name__ == expected_cls
    if args.tie_word_embeddings:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    diff = _parity(model, hf_model)
    print(f"{expected_cls} tied={args.tie_word_embeddings} rel diff {diff:.2e}")
    assert diff < TOL


def test_moe_logits_match_hf_without_topk_renorm(tmp_path):
    args = replace(MOE, moe=replace(MOE.moe, norm_topk_prob=False))
    model = _model(args)
    assert _parity(model, _hf_model(args, model.state_dict(), tmp_path / "hf")) < TOL


def test_parity_check_catches_wrong_routing(tmp_path):
    """The check has teeth: renormalization switched, or two experts swapped, fail it by far."""
    model = _model(MOE)
    sd = model.state_dict()
    flipped = _parity(model, _hf_model(MOE, sd, tmp_path / "flipped", norm_topk_prob=False))
    swapped_sd = dict(sd)
    for w in ("w1", "w2", "w3"):  # experts 0 and 1 exchange weights, the router still picks by index
        name = f"layers.0.moe.experts.{w}"
        swapped_sd[name] = sd[name][[1, 0, *range(2, MOE.moe.num_experts)]]
    swapped = _parity(model, _hf_model(MOE, swapped_sd, tmp_path / "swapped"))
    print(f"broken routing rel diff: norm_topk_prob flipped {flipped:.2e}, experts swapped {swapped:.2e}")
    assert flipped > 1000 * TOL and swapped > 1000 * TOL


def test_hf_in_memory_state_dict_reads_back(tmp_path):
    """transformers 5.x state_dict() holds fused experts (gate_up_proj, down_proj); we read that too."""
    model = _model(MOE)
    hf_model = _hf_model(MOE, model.state_dict(), tmp_path / "hf")
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf_model.state_dict()
    back = from_hf_state_dict(hf_model.state_dict(), MOE)
    ours = model.state_dict()
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("args", [DENSE, TIED, MOE], ids=["dense", "tied", "moe"])
def test_state_dict_round_trip_is_exact(args):
    sd = _model(args).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, args), args)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    partial = {k: v for k, v in sd.items() if k.startswith("layers.1.")}  # a pipeline stage's keys
    assert from_hf_state_dict(to_hf_state_dict(partial, args), args).keys() == partial.keys()


def test_expert_bias_dropped_on_export_and_tied_lm_head_checked():
    args = replace(MOE, moe=replace(MOE.moe, load_balance_coeff=1e-3))
    sd = _model(args).state_dict()
    assert "layers.0.moe.expert_bias" in sd
    hf_sd = to_hf_state_dict(sd, args)
    assert not any("bias" in k for k in hf_sd)
    tied_sd = to_hf_state_dict(_model(TIED).state_dict(), TIED)
    assert "lm_head.weight" not in tied_sd
    with_head = {**tied_sd, "lm_head.weight": tied_sd["model.embed_tokens.weight"].clone()}
    assert torch.equal(from_hf_state_dict(with_head, TIED)["output.weight"], tied_sd["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        from_hf_state_dict({**with_head, "lm_head.weight": torch.zeros_like(with_head["lm_head.weight"])}, TIED)


@pytest.mark.parametrize("args", [DENSE, TIED, MOE, qwen3_configs["30B-A3B"], qwen3_configs["0.6B"]])
def test_config_round_trip(args):
    assert config_to_args(args_to_config(args, torch.bfloat16)) == args


def test_args_rebuild_from_asdict_and_json():
    """A checkpoint stores args as JSON (dataclasses.asdict): the MoE dict and layer list come back."""
    args = replace(MOE, moe=replace(MOE.moe, load_balance_coeff=1e-3))
    assert Qwen3ModelArgs(**json.loads(json.dumps(asdict(args)))) == args


def test_published_config_json_reads_as_flavor():
    """Qwen/Qwen3-30B-A3B's config.json (transformers 4.x keys: top-level rope_theta) -> the flavor."""
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936,
    }  # fmt: skip
    assert config_to_args(config) == replace(qwen3_configs["30B-A3B"], max_seq_len=40960)
    # transformers 5.x save_pretrained writes num_experts under its attribute_map name.
    config["num_local_experts"] = config.pop("num_experts")
    assert config_to_args(config).moe.num_experts == 128


@pytest.mark.parametrize(
    "override, match",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
        ({"model_type": "qwen3_moe", "num_experts": 8, "decoder_sparse_step": 2}, "decoder_sparse_step"),
        ({"model_type": "qwen2"}, "qwen2"),
    ],
)
def test_config_refuses_unsupported(override, match):
    config = {**args_to_config(DENSE, torch.float32), **override}
    with pytest.raises(ValueError, match=match):
        config_to_args(config)


def _meta_model(flavor: str) -> tuple[Qwen3Model, Qwen3ModelArgs]:
    args = build_model_args(flavor, vocab_size=151936, max_seq_len=4096)
    with torch.device("meta"):
        return Qwen3Model(args), args


@pytest.mark.parametrize(
    "flavor, total, active",
    # Model cards: 0.6B (596M with the embedding), 8.2B, 30.5B total / "3.3B activated" (3.35B counting
    # the embedding and the output head, top 8 of 128 experts per layer).
    [("0.6B", 596e6, 596e6), ("8B", 8.19e9, 8.19e9), ("30B-A3B", 30.5e9, 3.35e9)],
)
def test_flavor_param_counts_match_published(flavor, total, active):
    model, args = _meta_model(flavor)
    nparams, _ = get_nparams_and_flops(model, args, seq_len=4096)
    assert abs(nparams / total - 1) < 0.01, nparams
    assert abs((nparams - inactive_expert_nparams(model, args)) / active - 1) < 0.01


def test_flops_count_active_params_and_tied_embedding_once():
    seq = 4096
    attention = 12 * 48 * 32 * 128 * seq
    model, args = _meta_model("30B-A3B")
    nparams, flops = get_nparams_and_flops(model, args, seq)
    active = nparams - inactive_expert_nparams(model, args)
    assert flops == 6 * (active - model.tok_embeddings.weight.numel()) + attention
    assert inactive_expert_nparams(model, args) == 48 * 3 * 2048 * 768 * (128 - 8)
    model, args = _meta_model("0.6B")  # tied: the shared matrix is the output matmul
    nparams, flops = get_nparams_and_flops(model, args, seq)
    assert nparams == sum(p.numel() for p in model.parameters()) and model.output.weight is model.tok_embeddings.weight
    assert flops == 6 * nparams + 12 * 28 * 16 * 128 * seq


def test_build_model_args_and_validation():
    args = build_model_args("debugmodel_moe_tiny", vocab_size=1000, max_seq_len=64, n_layers=3)
    assert (args.vocab_size, args.max_seq_len, args.n_layers, args.moe.num_experts) == (1000, 64, 3, 8)
    assert qwen3_configs["debugmodel_moe_tiny"].n_layers == 2  # the flavor itself is untouched
    with pytest.raises(ValueError, match="Did you mean '30B-A3B'"):
        build_model_args("30b-a3", vocab_size=1000, max_seq_len=64)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        replace(DENSE, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim=15"):
        replace(DENSE, head_dim=15)
    with pytest.raises(ValueError, match="attention backend"):
        replace(DENSE, attention_backend="fast")


def test_forward_rejects_long_sequence_and_stage_init():
    model = _model(DENSE)
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    model.tok_embeddings = model.output = None  # a middle pipeline stage: h_BTD in, h_BTD out
    model.init_weights()
    h = torch.randn(1, 8, DENSE.dim)
    assert model(h).shape == h.shape


def test_tied_embedding_survives_meta_init():
    """meta -> to_empty -> layout-independent init keeps one shared matrix (to_empty alone would untie it)."""
    from torchtitan.parallelisms.init import init_model_weights

    with torch.device("meta"):
        model = Qwen3Model(TIED)
    model.to_empty(device="cpu")
    init_model_weights(model, Qwen3Model, TIED, seed=0, device=torch.device("cpu"))
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in Qwen3Model(TIED).parameters())
