"""Llama 3 model: HF parity, meta-device init, published shapes, FLOPs, flavor errors (CPU, offline)."""

import pytest
import torch

from torchtitan.models.llama import (
    RoPEScalingArgs,
    Transformer,
    TransformerModelArgs,
    build_model_args,
    get_nparams_and_flops,
    llama3_configs,
)
from torchtitan.models.llama.hf_mapping import from_hf_state_dict, to_hf_config, to_hf_state_dict
from torchtitan.models.llama.model import precompute_rope_cos_sin
from tests.helpers.builders import small_llama_args

SEQ_LEN = 96


def _seeded_model(args: TransformerModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _sharp_attention_model(args: TransformerModelArgs) -> Transformer:
    """Seeded model with q/k scaled up: at init (std 0.02) attention is nearly uniform, so
    position information (RoPE) barely moves the logits and a parity test would be weak."""
    model = _seeded_model(args).eval()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(10.0)
            layer.attention.wk.weight.mul_(10.0)
    return model


def _hf_model(hf_config_kwargs: dict, state_dict: dict):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**hf_config_kwargs)
    config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.load_state_dict(state_dict, strict=True)
    return hf


def _relative_logit_error(ours: Transformer, hf, tokens_BT: torch.Tensor) -> float:
    with torch.no_grad():
        ours_BTV = ours(tokens_BT)
        hf_BTV = hf(tokens_BT).logits
    return ((ours_BTV - hf_BTV).abs().max() / hf_BTV.abs().max()).item()


# ----------------------------------------------------------------------------- (a) HF parity


def test_hf_parity_gqa_with_rope_scaling():
    args = small_llama_args()
    model = _sharp_attention_model(args)
    hf = _hf_model(to_hf_config(args), to_hf_state_dict(model.state_dict(), args))
    tokens_BT = torch.randint(0, args.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    assert _relative_logit_error(model, hf, tokens_BT) < 1e-5


def test_hf_parity_detects_ignored_rope_scaling():
    """The parity test is sensitive: HF with plain RoPE disagrees with our scaled model."""
    args = small_llama_args()
    model = _sharp_attention_model(args)
    unscaled_config = to_hf_config(small_llama_args(rope_scaling=None))
    hf = _hf_model(unscaled_config, to_hf_state_dict(model.state_dict(), args))
    tokens_BT = torch.randint(0, args.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    assert _relative_logit_error(model, hf, tokens_BT) > 1e-2


def test_hf_state_dict_round_trip_is_exact():
    args = small_llama_args()
    sd = _seeded_model(args).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, args), args)
    assert back.keys() == sd.keys()
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor), name


def test_hf_import_of_tied_checkpoint_fills_output():
    args = small_llama_args()
    hf_sd = to_hf_state_dict(_seeded_model(args).state_dict(), args)
    del hf_sd["lm_head.weight"]
    sd = from_hf_state_dict(hf_sd, args)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


# ----------------------------------------------------------------------------- (b) meta-device init


def test_meta_build_then_init_matches_direct_build():
    args = small_llama_args()
    with torch.device("meta"):
        meta_model = Transformer(args)
    meta_model.to_empty(device="cpu")  # parameters and freqs_cis now hold garbage
    torch.manual_seed(0)
    meta_model.init_weights(buffer_device=torch.device("cpu"))
    direct = _seeded_model(args, seed=0)

    for (name, a), (_, b) in zip(meta_model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.isfinite(meta_model.freqs_cis).all()
    assert torch.equal(meta_model.freqs_cis, direct.freqs_cis)
    assert "freqs_cis" not in meta_model.state_dict()  # non-persistent: derived, never checkpointed


def test_rope_scaling_changes_frequencies():
    scaled = precompute_rope_cos_sin(16, SEQ_LEN, 500000.0, RoPEScalingArgs(original_max_position_embeddings=32))
    plain = precompute_rope_cos_sin(16, SEQ_LEN, 500000.0)
    assert scaled.shape == (SEQ_LEN, 8, 2)
    assert not torch.allclose(scaled, plain)
    assert torch.equal(scaled[:, 0], plain[:, 0])  # the highest frequency is left untouched


def test_forward_tolerates_pipeline_deleted_modules():
    args = small_llama_args()
    model = _seeded_model(args)
    model.tok_embeddings, model.norm, model.output = None, None, None
    del model.layers["0"]
    model.init_weights()
    h_BTD = torch.randn(2, 8, args.dim)
    assert model(h_BTD).shape == (2, 8, args.dim)


# ----------------------------------------------------------------------------- (c) published shapes


@pytest.mark.parametrize(
    "flavor, ffn_hidden", [("1B", 8192), ("3B", 8192), ("8B", 14336), ("70B", 28672), ("405B", 53248)]
)
def test_published_ffn_hidden_sizes(flavor, ffn_hidden):
    args = build_model_args(flavor, vocab_size=128256, max_seq_len=8192, n_layers=1)
    with torch.device("meta"):
        model = Transformer(args)
    ff = model.layers["0"].feed_forward
    assert ff.w1.weight.shape == (ffn_hidden, args.dim)
    assert ff.w2.weight.shape == (args.dim, ffn_hidden)


def test_8b_parameter_count():
    with torch.device("meta"):
        model = Transformer(build_model_args("8B", vocab_size=128256, max_seq_len=8192))
    nparams, _ = get_nparams_and_flops(model, model.model_args, seq_len=8192)
    assert abs(nparams - 8.03e9) / 8.03e9 < 0.01


# ----------------------------------------------------------------------------- (d) FLOPs


def test_flops_formula_by_hand():
    args = build_model_args("debugmodel_tiny", vocab_size=100, max_seq_len=32)
    model = Transformer(args)
    nparams, flops = get_nparams_and_flops(model, args, seq_len=32)
    d, f, v, layers = 64, args.ffn_hidden_dim, 100, 2
    kv_dim = 2 * (64 // 4)  # 2 kv heads of head_dim 16
    per_layer = d * d + 2 * d * kv_dim + d * d + 3 * d * f + 2 * d  # wq, wk+wv, wo, ffn, 2 norms
    expected_params = v * d + layers * per_layer + d + d * v  # embedding, layers, norm, output
    assert nparams == expected_params
    assert flops == 6 * (expected_params - v * d) + 12 * layers * 4 * 16 * 32


# ----------------------------------------------------------------------------- (e) flavors


def test_unknown_flavor_suggests_the_closest():
    with pytest.raises(ValueError, match="debugmodel") as excinfo:
        build_model_args("debugmodle", vocab_size=100, max_seq_len=32)
    assert "Did you mean 'debugmodel'" in str(excinfo.value)
    with pytest.raises(ValueError, match="Did you mean '8B'"):
        build_model_args("8b", vocab_size=100, max_seq_len=32)


def test_build_model_args_overrides_without_mutating_flavors():
    args = build_model_args("debugmodel", vocab_size=1000, max_seq_len=64, n_layers=2, dim=128)
    assert (args.n_layers, args.dim, args.vocab_size, args.max_seq_len) == (2, 128, 1000, 64)
    assert llama3_configs["debugmodel"].n_layers == 6
    kept = build_model_args("debugmodel", vocab_size=1000, max_seq_len=64)
    assert (kept.n_layers, kept.dim) == (6, 256)


def test_pinned_attention_backend_matches_auto_and_mha_override():
    args = build_model_args("debugmodel_tiny", vocab_size=100, max_seq_len=32, n_kv_heads=4)
    assert args.n_kv_heads == args.n_heads == 4
    tokens = torch.randint(0, 100, (2, 32))
    torch.manual_seed(0)
    auto = Transformer(args)
    auto.init_weights()
    pinned = Transformer(build_model_args("debugmodel_tiny", vocab_size=100, max_seq_len=32, n_kv_heads=4,
                                          attention_backend="math"))
    pinned.load_state_dict(auto.state_dict())
    torch.testing.assert_close(pinned(tokens), auto(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend 'flash2' is not one of auto, flash"):
        build_model_args("debugmodel_tiny", vocab_size=100, max_seq_len=32, attention_backend="flash2")
