"""Tiny random Hugging Face LLaMA/Mistral checkpoints (transformers + torch, CPU) for tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: name -> (model_type, config overrides). Each case exercises one feature of the decoder.
CASES: dict[str, tuple[str, dict]] = {
    # GQA (4 query heads share 2 kv heads), untied head, q/k/v/o and MLP biases
    "llama_gqa": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    # Llama 3.1 rope scaling; original context 16 puts frequencies in all three bands
    "llama3_rope": ("llama", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "linear_rope": ("llama", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    # multi-query attention (one kv head) with tied input/output embeddings
    "mqa_tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # Mistral with a sliding window much shorter than the test sequences
    "mistral_window": ("mistral", dict(sliding_window=5, tie_word_embeddings=False)),
}


def hf_config(case: str, **overrides) -> transformers.PretrainedConfig:
    model_type, extra = CASES[case]
    cls = transformers.LlamaConfig if model_type == "llama" else transformers.MistralConfig
    return cls(**{**BASE, **extra, **overrides})


def random_hf_model(case: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """An eval-mode float32 HF model with every parameter randomised (norms near 1, biases != 0)."""
    cfg = hf_config(case, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def make_checkpoint(path: Path, case: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, **overrides):
    """Save a random checkpoint to ``path``; returns the (float32) torch model that was saved."""
    model = random_hf_model(case, seed, **overrides)
    if dtype != torch.float32:  # round the weights (not the rotary buffers) to ``dtype``
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    (model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)).save_pretrained(path, **kw)
    return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None, positions=None) -> np.ndarray:
    """HF logits as float32 numpy; with a mask, positions follow it (as in HF ``generate``)."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    kw = {}
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.long)
        kw["attention_mask"] = m
        kw["position_ids"] = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids_t, **kw).logits.float().numpy()


def torch_hidden(model, ids: np.ndarray, layer: int) -> np.ndarray:
    """HF residual stream after decoder layer ``layer`` (``hidden_states[layer + 1]``)."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long), output_hidden_states=True)
    return out.hidden_states[layer + 1].float().numpy()


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[batch, max_len]`` ids and a 0/1 attention mask."""
    from jax_unlearn.data import pad_rows

    return pad_rows(rows, max(len(r) for r in rows), pad_id, side="left")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


_ROOT: Path | None = None
_CACHE: dict = {}


def checkpoint(case: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               max_shard_size: str | None = None, **overrides):
    """``(folder, torch model)`` for a case, built once per test process (treat as read-only)."""
    global _ROOT
    key = (case, seed, str(dtype), max_shard_size, repr(sorted(overrides.items())))
    if key not in _CACHE:
        if _ROOT is None:
            import atexit
            import shutil
            import tempfile

            _ROOT = Path(tempfile.mkdtemp(prefix="ju_hf_ckpt_"))
            atexit.register(shutil.rmtree, _ROOT, True)
        path = _ROOT / f"{case}-{len(_CACHE)}"
        _CACHE[key] = (path, make_checkpoint(path, case, seed, dtype, max_shard_size, **overrides))
    return _CACHE[key]
