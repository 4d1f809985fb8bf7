"""Flax NNX LLaMA/Mistral models with Hugging Face checkpoint import/export and generation.

>>> from jax_unlearn.models import load_hf, save_hf, generate
>>> model = load_hf("path/to/hf_folder", dtype=jnp.bfloat16)       # doctest: +SKIP
>>> logits = model(input_ids, attention_mask)                       # doctest: +SKIP
>>> out = generate(model, input_ids, attention_mask, max_new_tokens=20)  # doctest: +SKIP
>>> save_hf(model, "path/to/export")                                # doctest: +SKIP
>>> lora = add_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))  # doctest: +SKIP
>>> save_peft(lora, "path/to/adapter")                              # doctest: +SKIP
>>> same = load_hf("path/to/hf_folder", peft="path/to/adapter")     # doctest: +SKIP
"""

from .config import ModelConfig, ModelOptions, RopeScaling
from .generation import Generation, generate
from .hf_io import CheckpointError, check_hf, load_hf, read_config, save_hf
from .llama import CausalLM, KVCache
from .lora import LoRAConfig, add_lora, load_peft, lora_config, merge_lora, save_peft, without_lora
from .partitioning import DEFAULT_RULES, logical_to_spec, model_shardings

__all__ = [
    "CausalLM",
    "CheckpointError",
    "DEFAULT_RULES",
    "Generation",
    "KVCache",
    "LoRAConfig",
    "ModelConfig",
    "ModelOptions",
    "RopeScaling",
    "add_lora",
    "check_hf",
    "generate",
    "load_hf",
    "load_peft",
    "logical_to_spec",
    "lora_config",
    "merge_lora",
    "read_config",
    "model_shardings",
    "save_hf",
    "save_peft",
    "without_lora",
]
