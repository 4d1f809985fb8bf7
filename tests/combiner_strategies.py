"""Hypothesis strategies and float64 NumPy statements of the combiner formulas (for tests)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import jax_unlearn as ju

DTYPES = (jnp.float32, jnp.bfloat16)
# Relative rounding of one stored value: float32 and bfloat16 unit roundoff, with margin.
ROUNDOFF = {jnp.dtype(jnp.float32): 2.0**-22, jnp.dtype(jnp.bfloat16): 2.0**-7}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Placeholder leaf of a tree skeleton (not a pytree node)."""

    dims: tuple[int, ...]


def _is_shape(x) -> bool:
    return isinstance(x, Shape)


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(lambda d: Shape(tuple(d)))
skeletons = st.recursive(
    shapes,
    lambda children: st.lists(children, min_size=1, max_size=3)
    | st.dictionaries(st.sampled_from(["attn", "mlp", "w", "b", "norm"]), children, min_size=1, max_size=3),
    max_leaves=6,
)


@st.composite
def two_task_grads(draw, dtypes=DTYPES, relation=None):
    """A ``TwoTaskGrads`` over a random skeleton: scalar to 3-D leaves, float32 or bfloat16,
    magnitudes 1e-6..1e3 (forget and retain scaled separately), exact zeros and sparse
    leaves, and forget signs independent of, aligned with or opposed to the retain signs."""
    skeleton = draw(skeletons)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f_scale, r_scale = (10.0 ** draw(st.floats(-6, 3)) for _ in range(2))
    f_zero, r_zero = (draw(st.sampled_from([0.0, 0.0, 0.5, 0.9, 1.0])) for _ in range(2))
    relation = relation or draw(st.sampled_from(["independent", "aligned", "opposed", "mixed"]))

    def make(shape: Shape):
        r = rng.standard_normal(shape.dims) * r_scale * (rng.random(shape.dims) >= r_zero)
        f = rng.standard_normal(shape.dims) * f_scale * (rng.random(shape.dims) >= f_zero)
        if relation == "aligned":
            f = np.abs(f) * np.sign(r)
        elif relation == "opposed":
            f = -np.abs(f) * np.sign(r)
        elif relation == "mixed":  # half the coordinates opposed, with zeros where r is zero
            f = np.where(rng.random(shape.dims) < 0.5, -1, 1) * np.abs(f) * np.sign(r)
        return jnp.asarray(f, dtype), jnp.asarray(r, dtype)

    pairs = jax.tree.map(make, skeleton, is_leaf=_is_shape)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and all(isinstance(a, jax.Array) for a in x)
    forget = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    retain = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    return ju.TwoTaskGrads(forget, retain)


weights = st.floats(0.05, 20.0)


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def ref_weighted_sum(f, r, alpha, gamma):
    return gamma * f64(f) + alpha * f64(r)


def ref_sago(f, r, alpha, gamma, agree="forget"):
    f, r = f64(f), f64(r)
    conflict = np.sign(f) * np.sign(r) < 0
    keep = gamma * f + alpha * r if agree == "sum" else gamma * f
    return np.where(conflict, alpha * r, keep)


def ref_pcgrad(fs, rs, alpha, gamma, scope="module"):
    """PCGrad on lists of leaves in float64, written as `jax_unlearn.combiners.pcgrad` states it."""
    fs, rs = [f64(f) for f in fs], [f64(r) for r in rs]

    def project(f, r, d, n):
        if d < 0:
            f = f - d / (n + 1e-10) * r
        return gamma * f + alpha * r

    if scope == "global":
        d = sum(np.vdot(f, r) for f, r in zip(fs, rs))
        n = sum(np.vdot(r, r) for r in rs)
        return [project(f, r, d, n) for f, r in zip(fs, rs)]
    return [project(f, r, np.vdot(f, r), np.vdot(r, r)) for f, r in zip(fs, rs)]


def ref_diagnostics(fs, rs, us) -> dict:
    """Global diagnostics in float64 from lists of leaves."""
    fs, rs, us = ([f64(x).ravel() for x in xs] for xs in (fs, rs, us))
    f, r, u = (np.concatenate(x) if x else np.zeros(0) for x in (fs, rs, us))
    fn, rn, un = (np.linalg.norm(x) for x in (f, r, u))
    cos = lambda a, b, na, nb: float(np.dot(a, b) / max(na * nb, 1e-30))
    return {
        "conflict_fraction": float(np.mean(np.sign(f) * np.sign(r) < 0)) if f.size else 0.0,
        "cos_forget_retain": cos(f, r, fn, rn),
        "cos_update_retain": cos(u, r, un, rn),
        "forget_norm": fn,
        "retain_norm": rn,
        "update_norm": un,
    }
