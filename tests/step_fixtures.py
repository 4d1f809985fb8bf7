"""A tiny model, batches and optimizers shared by the step and training tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jax_unlearn as ju
from jax_unlearn import objectives as obj
from jax_unlearn.models import CausalLM, ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4)


def tiny_model(seed: int = 0, **options) -> CausalLM:
    from jax_unlearn.models import ModelOptions

    return CausalLM(CFG, ModelOptions(**options) if options else None, rngs=nnx.Rngs(seed))


def make_batch(seed: int, rows: int = 8, seq: int = 8, ragged: bool = True) -> dict:
    """Random token rows; with ``ragged``, rows get left padding and prompt tokens without
    loss, so rows carry different numbers of label tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (rows, seq))
    am = np.ones((rows, seq), np.int32)
    labels = ids.copy()
    if ragged:
        for i in range(rows):
            pad = rng.integers(0, seq // 2)
            am[i, :pad] = 0
            labels[i, : pad + rng.integers(0, 3)] = -100
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(am),
            "labels": jnp.asarray(labels, jnp.int32)}


OBJECTIVES = {
    "grad_ascent": lambda: obj.grad_ascent(),
    "grad_diff": lambda: obj.grad_diff(),
    "grad_diff_kl": lambda: obj.grad_diff(retain="kl"),
    "npo": lambda: obj.npo(beta=0.5),
    "simnpo": lambda: obj.simnpo(beta=1.0, delta=0.0),
    "rmu": lambda: obj.rmu(CFG.hidden_size, layer=1, steering=4.0, trainable=r"layers\.[01]\.mlp\.down_proj"),
}

COMBINERS = {
    "weighted_sum": lambda: ju.weighted_sum(),
    "pcgrad": lambda: ju.pcgrad(),
    "pcgrad_global": lambda: ju.pcgrad(scope="global"),
    "sago": lambda: ju.sago(),
    "sago_sum": lambda: ju.sago(agree="sum"),
}


def chain(combiner, lr: float = 1e-2) -> optax.GradientTransformation:
    return optax.chain(combiner, optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))


def assert_moves_close(a, b, start, rtol=1e-5):
    """``a - start`` and ``b - start`` agree leaf by leaf to ``rtol`` relative, plus ``rtol`` times the
    leaf's largest move, plus 4 float32 ulps of the parameter itself (moves are read off float32
    parameters). A gradient coordinate sums the contributions of every token (8 rows x 8
    positions through 3 layers), so its rounding error scales with the leaf's largest
    contributions, not with its own value, which may be a near-cancelled sum."""
    ulp = np.finfo(np.float32).eps

    def check(x, y, s):
        s = np.asarray(s, np.float64)
        dx, dy = np.asarray(x, np.float64) - s, np.asarray(y, np.float64) - s
        bound = rtol * np.abs(dy) + rtol * np.abs(dy).max() + 4 * ulp * np.abs(s)
        assert np.all(np.abs(dx - dy) <= bound), float(np.max(np.abs(dx - dy) - bound))
    jax.tree.map(check, a, b, start)
