"""The combiners' float64 path: float64 gradients are combined in float64 (promote_types(float32,
dtype)), never through float32, and equal a float64 NumPy statement of the formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_unlearn as ju


def _np_pcgrad(f, r, alpha, gamma):
    dot = float(np.vdot(f, r))
    if dot < 0:
        f = f - dot / (float(np.vdot(r, r)) + 1e-10) * r
    return gamma * f + alpha * r


@pytest.mark.parametrize("name", ["weighted_sum", "pcgrad", "pcgrad_global", "sago", "sago_sum"])
def test_float64_gradients_are_combined_in_float64(name):
    rng = np.random.default_rng(0)
    # values that float32 cannot hold: 1 + O(1e-12) offsets vanish in a float32 intermediate
    shapes = {"w": (5, 3), "b": (7,)}
    f = {k: 1.0 + 1e-12 * rng.standard_normal(s) * rng.choice([-1, 1], s) for k, s in shapes.items()}
    r = {k: -(1.0 + 1e-12 * rng.standard_normal(s)) + 2.0 * (rng.random(s) < 0.5) for k, s in shapes.items()}
    alpha, gamma = 0.7, 1.3
    factories = {"weighted_sum": lambda: ju.weighted_sum(alpha, gamma), "pcgrad": lambda: ju.pcgrad(alpha, gamma),
                 "pcgrad_global": lambda: ju.pcgrad(alpha, gamma, scope="global"),
                 "sago": lambda: ju.sago(alpha, gamma), "sago_sum": lambda: ju.sago(alpha, gamma, agree="sum")}
    with jax.enable_x64(True):
        tx = factories[name]()
        grads = ju.TwoTaskGrads(jax.tree.map(jnp.asarray, f), jax.tree.map(jnp.asarray, r))
        params = jax.tree.map(jnp.zeros_like, grads.forget)
        u, state = jax.jit(tx.update)(grads, tx.init(params), params)
        u = jax.tree.map(np.asarray, u)
        assert all(x.dtype == np.float64 for x in jax.tree.leaves(u))
        assert np.isfinite(float(jax.tree.leaves(state)[0]))
    if name == "weighted_sum":
        want = {k: gamma * f[k] + alpha * r[k] for k in f}
    elif name == "pcgrad":
        want = {k: _np_pcgrad(f[k].ravel(), r[k].ravel(), alpha, gamma).reshape(f[k].shape) for k in f}
    elif name == "pcgrad_global":
        flat = _np_pcgrad(np.concatenate([f[k].ravel() for k in sorted(f)]), np.concatenate([r[k].ravel() for k in sorted(f)]),
                          alpha, gamma)
        sizes = np.cumsum([f[k].size for k in sorted(f)])[:-1]
        want = {k: part.reshape(f[k].shape) for k, part in zip(sorted(f), np.split(flat, sizes))}
    else:
        agree = (lambda k: gamma * f[k]) if name == "sago" else (lambda k: gamma * f[k] + alpha * r[k])
        want = {k: np.where(np.sign(f[k]) * np.sign(r[k]) < 0, alpha * r[k], agree(k)) for k in f}
    for k in f:
        # one rounding per operation in float64; a float32 intermediate would be off by ~1e-8
        np.testing.assert_allclose(u[k], want[k], rtol=1e-14, atol=1e-14 * float(np.abs(want[k]).max()))
