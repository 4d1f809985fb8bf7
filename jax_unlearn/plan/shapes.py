"""Named model shapes for planning without the model's folder (``--shape``): the published
``config.json`` fields of the models the paper configs and the benchmarks name.

- ``1b``, ``3b``: Llama-3.2-1B / 3B; ``8b``: Llama-3.1-8B; ``70b``: Llama-3.1-70B
  (Hugging Face ``meta-llama/*/config.json``).
- ``mistral-7b``: Mistral-7B-v0.1, the architecture of Zephyr-7B-beta, the paper's WMDP model
  (``HuggingFaceH4/zephyr-7b-beta/config.json``: 32k vocabulary, sliding window 4096).
"""

from __future__ import annotations

from jax_unlearn.config import ConfigError
from jax_unlearn.models import ModelConfig

_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0,
               max_position_embeddings=131072, rms_norm_eps=1e-5)
SHAPES: dict[str, dict] = {
    "1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               head_dim=64, tie_word_embeddings=True),
    "3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               head_dim=128, tie_word_embeddings=True),
    "8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               head_dim=128),
    "70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                head_dim=128),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_theta=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096),
}


def shape_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a named shape; raises `ConfigError` listing the names."""
    if name not in SHAPES:
        raise ConfigError(f"--shape {name!r} is not a known shape; expected one of {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name])
