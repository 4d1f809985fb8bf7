"""ModelConfig <-> HF config.json (transformers 4.x and 5.x layouts) and RoPE frequencies."""

import dataclasses

import numpy as np
import pytest
import transformers
from hf_fixtures import CASES, hf_config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from jax_unlearn.models import ModelConfig, ModelOptions, RopeScaling


def test_parse_transformers5_layout():
    cfg = ModelConfig.from_hf_dict(hf_config("llama3_rope").to_dict())
    assert cfg.model_type == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (128, 64, 96)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 256
    assert cfg.sliding_window is None and not cfg.tie_word_embeddings


def test_parse_transformers4_layout():
    d = hf_config("llama_gqa").to_dict()
    d.pop("rope_parameters")
    d4 = dict(d, rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.5})
    cfg = ModelConfig.from_hf_dict(d4)
    assert cfg.rope_theta == 123.0 and cfg.rope_scaling == RopeScaling("linear", 2.5)
    d4 = dict(d, rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert ModelConfig.from_hf_dict(d4).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    d4 = dict(d, rope_theta=1e6, rope_scaling=None)
    cfg = ModelConfig.from_hf_dict(d4)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.attention_bias and cfg.mlp_bias  # llama keeps its bias flags


def test_defaults_and_family_specific_fields():
    d = hf_config("mqa_tied").to_dict()
    for k in ("head_dim", "num_key_value_heads"):
        d.pop(k)
    d["eos_token_id"] = [2, 7]
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.head_dim == 64 // 4 and cfg.num_key_value_heads == 4
    assert cfg.eos_token_id == (2, 7) and cfg.stop_token_ids == (2, 7)
    assert cfg.tie_word_embeddings
    m = hf_config("mistral_window").to_dict()
    m["attention_bias"] = True  # transformers' Mistral has no biases: ignored like there
    cfg = ModelConfig.from_hf_dict(m)
    assert cfg.model_type == "mistral" and cfg.sliding_window == 5 and not cfg.attention_bias
    ll = hf_config("llama_gqa").to_dict()
    ll["sliding_window"] = 4  # Llama ignores a sliding window
    assert ModelConfig.from_hf_dict(ll).sliding_window is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_hf_dict_roundtrips_through_transformers(case):
    cfg = ModelConfig.from_hf_dict(hf_config(case).to_dict())
    d = cfg.to_hf_dict(dtype=np.float32)
    assert ModelConfig.from_hf_dict(d) == cfg
    hf = transformers.AutoConfig.for_model(**d)
    assert type(hf).__name__ == {"llama": "LlamaConfig", "mistral": "MistralConfig"}[cfg.model_type]
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg
    # the 4.x keys alone describe the same model (older transformers / vLLM read these)
    d4 = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert ModelConfig.from_hf_dict(d4) == cfg


@pytest.mark.parametrize("case", ["llama_gqa", "llama3_rope", "linear_rope"])
def test_inv_freq_matches_transformers(case):
    hf = hf_config(case)
    ours = ModelConfig.from_hf_dict(hf.to_dict()).inv_freq()
    ref = LlamaRotaryEmbedding(hf).inv_freq.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    if case != "llama_gqa":  # the scaling really changes the frequencies
        plain = ModelConfig.from_hf_dict({**hf.to_dict(), "rope_parameters": None, "rope_theta": hf.rope_parameters["rope_theta"]})
        assert not np.allclose(plain.inv_freq(), ours)


def test_unsupported_model_type_names_field_and_values():
    d = dict(hf_config("llama_gqa").to_dict(), model_type="gpt2")
    with pytest.raises(ValueError, match=r"'model_type' is 'gpt2'; supported values: llama, mistral"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("layout", ["5.x", "4.x"])
def test_unsupported_rope_type_names_field_and_values(layout):
    d = hf_config("llama_gqa").to_dict()
    if layout == "5.x":
        d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
        field = "rope_parameters.rope_type"
    else:
        d.pop("rope_parameters")
        d["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
        field = "rope_scaling.rope_type"
    with pytest.raises(ValueError, match=rf"'{field}' is '(yarn|dynamic)'; supported values: default, linear, llama3"):
        ModelConfig.from_hf_dict(d)


def test_head_dim_defaults_to_hidden_over_heads():
    base = ModelConfig.from_hf_dict(hf_config("llama_gqa").to_dict())
    plain = dataclasses.replace(base, head_dim=None)
    assert plain.head_dim == base.hidden_size // base.num_attention_heads
    with pytest.raises(ValueError, match=r"'head_dim' is unset and 'hidden_size' \(64\) is not a multiple of "
                                         r"'num_attention_heads' \(5\)"):
        dataclasses.replace(base, head_dim=None, num_attention_heads=5, num_key_value_heads=1)


def test_invalid_values_are_rejected():
    base = ModelConfig.from_hf_dict(hf_config("llama_gqa").to_dict())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        dataclasses.replace(base, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf_dict(dict(hf_config("llama_gqa").to_dict(), hidden_act="gelu"))
    with pytest.raises(ValueError, match="'vocab_size' is missing"):
        ModelConfig.from_hf_dict({k: v for k, v in hf_config("llama_gqa").to_dict().items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="remat_policy"):
        ModelOptions(remat_policy="sometimes")
    with pytest.raises(ValueError, match="attention_impl"):
        ModelOptions(attention_impl="flash")
