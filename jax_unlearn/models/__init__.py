"""Flax NNX LLaMA/Mistral models with Hugging Face checkpoint import/export and generation.

>>> from jax_unlearn.models import load_hf, save_hf, generate
>>> model = load_hf("path/to/hf_folder", dtype=jnp.bfloat16)       # doctest: +SKIP
>>> logits = model(input_ids, attention_mask)                       # doctest: +SKIP
>>> out = generate(model, input_ids, attention_mask, max_new_tokens=20)  # doctest: +SKIP
>>> save_hf(model, "path/to/export")                                # doctest: +SKIP
"""

from .config import ModelConfig, ModelOptions, RopeScaling
from .generation import Generation, generate
from .hf_io import CheckpointError, load_hf, save_hf
from .llama import CausalLM, KVCache
from .partitioning import DEFAULT_RULES, logical_to_spec, model_shardings

__all__ = [
    "CausalLM",
    "CheckpointError",
    "DEFAULT_RULES",
    "Generation",
    "KVCache",
    "ModelConfig",
    "ModelOptions",
    "RopeScaling",
    "generate",
    "load_hf",
    "logical_to_spec",
    "model_shardings",
    "save_hf",
]
