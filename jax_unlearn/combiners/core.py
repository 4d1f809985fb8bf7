"""The core of the combiners: ``TwoTaskGrads``, the diagnostics, ``weighted_sum``, ``pcgrad``, ``sago``.

Two-task gradient combiners as optax transformations.

Each combiner takes ``TwoTaskGrads(forget=g_f, retain=g_r)`` (two pytrees shaped like the
params, both gradients of losses to *minimise*) and returns one update tree ``u`` shaped like
the params, so any optax transform can follow it in ``optax.chain``:

- ``weighted_sum``: ``u = gamma*g_f + alpha*g_r`` (the naive baseline).
- ``pcgrad``: if ``<g_f,g_r> < 0`` then ``g_f <- g_f - <g_f,g_r>/(|g_r|^2+1e-10) * g_r``;
  ``u = gamma*g_f + alpha*g_r``. Per leaf (``scope="module"``) or over all leaves at once
  (``scope="global"``).
- ``sago``: element-wise conflict ``c = sign(g_f)*sign(g_r) < 0`` (a zero never conflicts);
  ``u = where(c, alpha*g_r, gamma*g_f)`` (``agree="forget"``) or
  ``where(c, alpha*g_r, gamma*g_f + alpha*g_r)`` (``agree="sum"``).

A *tensor* is one leaf, or one slice of a stacked leaf: a gradient tree of Flax NNX variables
whose logical axes (the ``out_sharding`` metadata) begin with ``"layers"`` (a model built with
``scan_layers=True`` stacks every layer's tensor along that leading axis) holds one tensor per
index of that axis. ``pcgrad(scope="module")`` and `per_leaf_diagnostics` work per tensor, so a
scanned model is combined exactly as the same model with one leaf per layer.

Every leaf keeps its dtype; each leaf is combined, and its dot products and norms accumulate,
in ``promote_types(float32, leaf dtype)`` (bfloat16 in float32, float64 stays float64). The
state holds the last update's global diagnostics (float32) (``conflict_fraction``, ``cos_forget_retain``,
``cos_update_retain``, ``forget_norm``, ``retain_norm``, ``update_norm``), readable with
``optax.tree_utils.tree_get(state, name)``.

`COMBINERS` is the registry of combiner factories by name (configs and the CLI read it); the
package's other modules (`jax_unlearn.combiners.unlearning`, `jax_unlearn.combiners.aggregators`)
register theirs in it. A combiner that remembers something between updates (an EMA, the last
weights) keeps it in a `StatefulCombinerState` beside the same diagnostics.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_unlearn.registry import Registry

STACK_AXIS = "layers"  # logical axis name of the stacked layers of a scan_layers=True model
_AXIS_METADATA = ("out_sharding", "sharding_names", "sharding")  # where Flax versions keep logical axes
PCGRAD_EPS = 1e-10  # added to |g_r|^2 in the PCGrad projection, as in the reference
_COS_EPS = 1e-30  # guards the cosines against 0/0 (an all-zero tree gives cosine 0)
_F32 = jnp.float32


class TwoTaskGrads(NamedTuple):
    """The forget and retain gradients of one step: two pytrees shaped like the params."""

    forget: Any
    retain: Any


class RetainBackward(abc.ABC):
    """The retain side of ``TwoTaskGrads`` when the retain gradient is not yet taken, so that a
    per-tensor combiner can form its update inside the retain backward pass
    (`jax_unlearn.step.RetainPass` is the implementation; `jax_unlearn.step.StepConfig`
    ``fuse_combine=True`` builds it, users never need to).

    `gradient` returns the plain retain gradient ``g_r`` (what every combiner that needs
    whole-tree sums first takes). `combine` runs the retain backward with each parameter leaf's
    cotangent ``g_r[i]`` turned into ``rule(i, g_f[i], g_r[i]) -> (u_i, stats_i)`` as it arrives,
    and returns ``(update leaves, per-leaf stats)``. Whichever runs records the retain
    ``(loss, aux)`` in ``result``. Not a pytree: it lives inside one trace of the step. An
    interface: the combiners' layer takes no gradients, `jax_unlearn.step.RetainPass` implements it.
    """

    result: tuple | None = None

    @abc.abstractmethod
    def gradient(self) -> Any:
        """The retain gradient ``g_r`` (a tree shaped like the parameters)."""

    @abc.abstractmethod
    def combine(self, forget: Any, rule: Callable, chunking: Callable | None = None) -> tuple[list, list]:
        """``(update leaves, per-leaf stats)``: ``rule`` applied to each leaf in the retain backward.
        ``chunking(i) -> (sums, apply) | None`` says how leaf ``i``'s update may be formed from
        slices along its first axis (see `make_combiner`), so the slices of its retain gradient
        may be made one at a time."""


def materialize(grads: Any) -> Any:
    """``grads`` with a `RetainBackward` retain side replaced by the retain gradient it takes."""
    if isinstance(grads, TwoTaskGrads) and isinstance(grads.retain, RetainBackward):
        return TwoTaskGrads(grads.forget, grads.retain.gradient())
    return grads


class CombinerState(NamedTuple):
    """Diagnostics of the last update, global over all leaves (float32 scalars)."""

    conflict_fraction: chex.Array  # share of coordinates with sign(g_f)*sign(g_r) < 0
    cos_forget_retain: chex.Array  # <g_f,g_r> / (|g_f| |g_r|)
    cos_update_retain: chex.Array  # <u,g_r> / (|u| |g_r|)
    forget_norm: chex.Array  # |g_f|
    retain_norm: chex.Array  # |g_r|
    update_norm: chex.Array  # |u|


class StatefulCombinerState(NamedTuple):
    """The state of a combiner with memory: the last update's ``diagnostics`` (a `CombinerState`,
    its fields found by name with ``optax.tree_utils.tree_get`` as for the stateless ones) and the
    method's ``memory`` (fixed-shape arrays, or a tree shaped like the params)."""

    diagnostics: CombinerState
    memory: Any


class LeafStats(NamedTuple):
    """The sums behind the diagnostics (in the leaf's accumulation dtype): one value per tensor
    (shaped like a leaf's stacked axes, ``[]`` for an unstacked leaf) or summed over leaves."""

    size: chex.Array  # number of coordinates
    conflicts: chex.Array  # number of coordinates with opposite non-zero signs
    fr: chex.Array  # <g_f, g_r>
    ff: chex.Array  # |g_f|^2
    rr: chex.Array  # |g_r|^2
    ur: chex.Array  # <u, g_r>
    uu: chex.Array  # |u|^2


# ----------------------------------------------------------------------------- validation


def _check_weight(name: str, value: Any) -> None:
    """A weight given as a plain number must be finite and >= 0 (arrays are left alone so
    that ``optax.inject_hyperparams`` can pass traced schedules)."""
    if isinstance(value, bool) or (isinstance(value, numbers.Number) and not isinstance(value, numbers.Real)):
        raise TypeError(f"combiner weight {name!r} must be a real number or a scalar array, got {value!r}")
    if isinstance(value, numbers.Real) and not (value >= 0 and value != float("inf")):
        raise ValueError(f"combiner weight {name!r} must be a finite number >= 0, got {value!r}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")


def _split(grads: Any, combiner: str) -> tuple[list, list, jax.tree_util.PyTreeDef]:
    """Checks a ``TwoTaskGrads`` and returns its forget leaves, retain leaves and treedef."""
    if not isinstance(grads, TwoTaskGrads):
        raise TypeError(
            f"{combiner}: update expects jax_unlearn.TwoTaskGrads(forget=..., retain=...), got "
            f"{type(grads).__name__}. Put the combiner at the head of the optax chain and pass "
            "both gradients."
        )
    f_paths, f_def = jax.tree_util.tree_flatten_with_path(grads.forget)
    r_leaves, r_def = jax.tree_util.tree_flatten(grads.retain)
    if f_def != r_def:
        raise ValueError(
            f"{combiner}: forget and retain gradients have different tree structures:\n"
            f"  forget: {f_def}\n  retain: {r_def}"
        )
    f_leaves = []
    for (path, f), r in zip(f_paths, r_leaves):
        if jnp.shape(f) != jnp.shape(r) or jnp.result_type(f) != jnp.result_type(r):
            raise ValueError(
                f"{combiner}: gradient leaf {jax.tree_util.keystr(path) or '<root>'} differs between "
                f"forget {jnp.shape(f)} {jnp.result_type(f)} and retain {jnp.shape(r)} "
                f"{jnp.result_type(r)}; both must have the same shape and dtype"
            )
        f_leaves.append(f)
    return f_leaves, r_leaves, f_def


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leading(names: Any, axis: str) -> int:
    """How many of the logical axis ``names`` (a tuple, or anything else = none) lead with ``axis``."""
    if not isinstance(names, (tuple, list)):
        return 0
    k = 0
    while k < len(names) and names[k] == axis:
        k += 1
    return k


def stacked_axes(tree: Any, axis: str | None = STACK_AXIS) -> list[int]:
    """For each array leaf of ``tree`` (in ``jax.tree.leaves`` order), the number of its leading
    axes that stack separate tensors: those named ``axis`` at the start of the leaf's logical
    axes (Flax NNX variable metadata, e.g. ``("layers", "embed", "mlp")`` -> 1). Leaves that
    are not held by an NNX variable, and every leaf when ``axis`` is None, count 0.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> w = nnx.Param(jnp.ones((3, 2)), out_sharding=("layers", "embed"), eager_sharding=False)
    >>> stacked_axes({"w": w, "b": jnp.ones(2)})
    [0, 1]
    """
    out: list[int] = []
    for x in jax.tree.leaves(tree, is_leaf=_is_variable):
        if not _is_variable(x):
            out.append(0)
            continue
        meta = x.get_metadata()
        names = next((meta[k] for k in _AXIS_METADATA if isinstance(meta.get(k), (tuple, list))), ())
        for leaf in jax.tree.leaves(x):
            out.append(0 if axis is None else min(_leading(names, axis), jnp.ndim(leaf)))
    return out


def _stacks(grads: TwoTaskGrads, params: Any, n: int, axis: str | None) -> list[int]:
    """`stacked_axes` of the forget gradients or, when they carry no NNX metadata, of ``params``."""
    for tree in (grads.forget, params):
        if tree is not None and any(_is_variable(x) for x in jax.tree.leaves(tree, is_leaf=_is_variable)):
            dims = stacked_axes(tree, axis)
            if len(dims) == n:
                return dims
    return [0] * n


# ----------------------------------------------------------------------------- maths


def _f32(x: chex.Array) -> chex.Array:
    return jnp.asarray(x).astype(_F32)


def widen(x: chex.Array) -> chex.Array:
    """``x`` in ``promote_types(float32, x.dtype)``: bfloat16/float16 -> float32, float64 kept."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(_F32, x.dtype))


def as_weight(w: chex.Array, like: chex.Array) -> chex.Array:
    """A combiner weight in the accumulation dtype of leaf ``like``."""
    return jnp.asarray(w).astype(jnp.promote_types(_F32, jnp.result_type(like)))


def _conflict(f: chex.Array, r: chex.Array) -> chex.Array:
    """Element-wise ``sign(f)*sign(r) < 0`` without forming ``f*r`` (which can underflow).
    Give it the widened leaves (`widen`, exact, so the signs are the same): on the raw bfloat16
    leaves XLA:GPU kept one more gradient-sized buffer alive (docs/benchmarks.md)."""
    return ((f > 0) & (r < 0)) | ((f < 0) & (r > 0))


def tensor_sum(x: chex.Array, stack: int = 0) -> chex.Array:
    """Sum over every axis but the ``stack`` leading ones (in ``x``'s dtype)."""
    return jnp.sum(x, axis=tuple(range(stack, jnp.ndim(x))), dtype=x.dtype)


def _per_tensor(b: chex.Array, like: chex.Array) -> chex.Array:
    """A per-tensor value ``b`` (shaped like ``like``'s stacked axes) broadcastable against ``like``."""
    return jnp.reshape(b, jnp.shape(b) + (1,) * (jnp.ndim(like) - jnp.ndim(b)))


def pair_stats(f: chex.Array, r: chex.Array, stack: int = 0) -> tuple[chex.Array, ...]:
    """(size, conflicts, <f,r>, |f|^2, |r|^2) of one leaf in its accumulation dtype, one value
    per tensor: shaped ``f.shape[:stack]`` (scalars for an unstacked leaf).

    The conflict count is ``-sum(min(sign f * sign r, 0))``: on XLA:CPU this sums as fast as a
    product, while a boolean count is twice as slow; no intermediate is shared between the
    four sums, so XLA reads ``f`` and ``r`` once for all of them.
    """
    fw, rw = widen(f), widen(r)
    conflicts = -tensor_sum(jnp.minimum(jnp.sign(fw) * jnp.sign(rw), 0), stack)
    size = jnp.full(jnp.shape(f)[:stack], int(np.prod(jnp.shape(f)[stack:])), fw.dtype)  # coordinates per tensor
    return (size, conflicts, tensor_sum(fw * rw, stack), tensor_sum(fw * fw, stack), tensor_sum(rw * rw, stack))


def with_update(pair: tuple, u: chex.Array, r: chex.Array, stack: int = 0) -> LeafStats:
    """The pair sums plus ``<u,r>`` and ``|u|^2`` of the stored update ``u``. (Deriving them from
    the pair sums, e.g. ``|u|^2 = g^2|f|^2 + 2gb<f,r> + b^2|r|^2``, would save a pass but cancels
    catastrophically when ``g*f`` nearly opposes ``b*r``, as after a PCGrad projection.)"""
    uw, rw = widen(u), widen(r)
    return LeafStats(*pair, ur=tensor_sum(uw * rw, stack), uu=tensor_sum(uw * uw, stack))


def leaf_stats(f: chex.Array, r: chex.Array, u: chex.Array, stack: int = 0) -> LeafStats:
    """All diagnostic sums of one leaf from its forget, retain and update arrays, one value per
    tensor (``stack`` leading axes of stacked tensors; 0: the leaf is one tensor)."""
    return with_update(pair_stats(f, r, stack), u, r, stack)


def _total(stats: list[LeafStats]) -> LeafStats:
    """Sums per-tensor stats over tensors and leaves (zeros for an empty tree)."""
    if not stats:
        return LeafStats(*(jnp.zeros((), _F32) for _ in LeafStats._fields))
    totals = [[x if jnp.ndim(x) == 0 else jnp.sum(x, dtype=jnp.result_type(x)) for x in column]
              for column in zip(*stats)]
    return LeafStats(*[sum(column[1:], column[0]) for column in totals])


def _diagnostics(s: LeafStats | None) -> CombinerState:
    """Turns the sums into the reported float32 diagnostics (NaN when they were not computed).
    Every field is its own array (a state whose fields shared one buffer could not be donated)."""
    if s is None:
        return CombinerState(*(jnp.full((), jnp.nan, _F32) for _ in CombinerState._fields))
    fn, rn = jnp.sqrt(s.ff), jnp.sqrt(s.rr)
    un = jnp.sqrt(jnp.maximum(s.uu, 0.0))
    return CombinerState(*(_f32(x) for x in (
        s.conflicts / jnp.maximum(s.size, 1.0),
        s.fr / jnp.maximum(fn * rn, _COS_EPS),
        s.ur / jnp.maximum(un * rn, _COS_EPS),
        fn, rn, un)))


def make_combiner(name: str, combine: Callable, alpha, gamma, diagnostics: bool, stack_axis: str | None = None,
              init_memory: Callable[[Any], Any] | None = None, per_tensor: bool = False,
              elementwise: bool = False, chunk_sums: Callable | None = None, chunk_apply: Callable | None = None):
    """Wraps ``combine(forget_leaves, retain_leaves, alpha, gamma, stacks) -> (update_leaves, stats)``
    into an ``optax.GradientTransformation`` whose update takes a ``TwoTaskGrads``; ``stacks``
    holds each leaf's number of stacked leading axes (`stacked_axes` over ``stack_axis``).

    ``per_tensor=True`` declares that ``combine`` treats each leaf on its own (``combine`` of a
    list is the list of ``combine`` of each leaf): given a `RetainBackward`, the update is then
    formed leaf by leaf inside the retain backward pass; otherwise the retain gradient is taken
    first (`materialize`) and combined as usual. A per-tensor combiner may also say how an
    unstacked leaf's update is formed from slices along its first axis, so that the output
    projection's and the embedding's leaves can be combined a vocabulary chunk at a time
    (`jax_unlearn.head_grad`): ``elementwise=True`` (each coordinate on its own, stats that are
    sums: ``combine`` of a slice is the slice of ``combine``), or ``chunk_sums(f, r)`` (partial
    sums over a slice, added up over all slices first) and ``chunk_apply(f, r, sums, alpha,
    gamma) -> (u, stats)`` (a slice's update and stats given the whole leaf's sums).

    With ``init_memory(params) -> memory`` the combiner keeps memory between updates: its state is
    a `StatefulCombinerState` and ``combine`` takes the memory as a sixth argument and returns
    ``(update_leaves, stats, new_memory)``."""
    _check_weight("alpha", alpha)
    _check_weight("gamma", gamma)
    if not isinstance(diagnostics, bool):
        raise TypeError(f"{name}: diagnostics must be True or False, got {diagnostics!r}")

    def init_fn(params):
        zeros = CombinerState(*(jnp.zeros((), _F32) for _ in CombinerState._fields))
        return zeros if init_memory is None else StatefulCombinerState(zeros, init_memory(params))

    def fused(updates, params):
        f, treedef = jax.tree_util.tree_flatten(updates.forget)
        stacks = _stacks(updates, params, len(f), stack_axis) if stack_axis is not None else [0] * len(f)

        def rule(i, fi, ri):
            u, stats = combine([fi], [ri], alpha, gamma, [stacks[i]])
            return u[0], stats[0]

        def chunking(i):
            if elementwise:
                return None, lambda fi, ri, _: rule(i, fi, ri)
            if chunk_apply is not None and stacks[i] == 0:
                return chunk_sums, lambda fi, ri, sums: chunk_apply(fi, ri, sums, alpha, gamma)
            return None

        u, stats = updates.retain.combine(updates.forget, rule, chunking)
        return jax.tree.unflatten(treedef, u), stats

    def update_fn(updates, state, params=None):
        if per_tensor and init_memory is None and isinstance(updates, TwoTaskGrads) and isinstance(
                updates.retain, RetainBackward):
            u, stats = fused(updates, params)
            return u, _diagnostics(_total(stats) if diagnostics else None)
        f, r, treedef = _split(materialize(updates), name)
        stacks = _stacks(updates, params, len(f), stack_axis) if stack_axis is not None else [0] * len(f)
        if init_memory is None:
            u, stats = combine(f, r, alpha, gamma, stacks)
        else:
            u, stats, memory = combine(f, r, alpha, gamma, stacks, state.memory)
        diag = _diagnostics(_total(stats) if diagnostics else None)
        new_state = diag if init_memory is None else StatefulCombinerState(diag, memory)
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- global combinations


def acc_dtype(tree: Any) -> jnp.dtype:
    """``promote_types(float32, every leaf's dtype)``: the dtype of sums over all leaves of ``tree``
    (float32 for an empty tree or ``None``)."""
    dtype = jnp.dtype(_F32)
    for x in jax.tree.leaves(tree):
        dtype = jnp.promote_types(dtype, jnp.result_type(x))
    return dtype


def global_pairs(fs: list, rs: list) -> tuple[list, LeafStats]:
    """Each leaf's pair sums and their totals over all leaves: the 2x2 Gramian of the Jacobian
    rows ``[g_f, g_r]`` is ``[[ff, fr], [fr, rr]]`` of the totals (sums of per-leaf partial sums,
    so a sharded leaf reduces where it lives)."""
    pairs = [pair_stats(f, r) for f, r in zip(fs, rs)]
    return pairs, _total([LeafStats(*p, 0.0, 0.0) for p in pairs])


def combine_global(fs: list, rs: list, pairs: list, cf: chex.Array, cr: chex.Array) -> tuple[list, list]:
    """``u = cf*g_f + cr*g_r`` leaf by leaf (in each leaf's accumulation dtype, stored in its own
    dtype) for two scalar coefficients, and the leaves' diagnostic sums."""
    us = [(as_weight(cf, f) * widen(f) + as_weight(cr, f) * widen(r)).astype(f.dtype) for f, r in zip(fs, rs)]
    return us, [with_update(p, u, r) for p, u, r in zip(pairs, us, rs)]


def check_number(combiner: str, name: str, value: Any, low: float, high: float = float("inf"),
                  low_open: bool = False) -> None:
    """A setting given as a plain number must lie in ``[low, high]`` (``(low, high]`` with
    ``low_open``); arrays pass unchecked (``optax.inject_hyperparams`` injects them traced)."""
    if isinstance(value, bool) or (isinstance(value, numbers.Number) and not isinstance(value, numbers.Real)):
        raise TypeError(f"{combiner}: {name} must be a real number or a scalar array, got {value!r}")
    if isinstance(value, numbers.Real):
        ok = (value > low if low_open else value >= low) and value <= high and value == value
        if not ok:
            bounds = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{combiner}: {name} must lie in {bounds}, got {value!r}")


# ----------------------------------------------------------------------------- combiners

RETURNS_DOC = """Returns:
      An ``optax.GradientTransformation`` whose ``update`` takes ``TwoTaskGrads`` and returns
      one tree shaped like the params (each leaf in its own dtype); its state is a
      ``CombinerState`` with the diagnostics of the last update."""

DIAGNOSTICS_ARG = """diagnostics: compute the state's diagnostics (sums over every leaf). With
        False they are NaN and, under jit, XLA drops the sums that the update itself
        does not need."""


def weighted_sum(alpha: float = 1.0, gamma: float = 1.0, diagnostics: bool = True) -> optax.GradientTransformation:
    """Loss summation, the naive baseline: ``u = gamma*g_f + alpha*g_r`` per coordinate.

    Args:
      alpha: weight of the retain gradient (>= 0).
      gamma: weight of the forget gradient (>= 0).
      {diagnostics}

    {returns}

    Example:
      >>> import jax.numpy as jnp, jax_unlearn as ju
      >>> tx = ju.weighted_sum(alpha=1.0, gamma=0.5)
      >>> g = ju.TwoTaskGrads(forget={{"w": jnp.array([2.0, -2.0])}}, retain={{"w": jnp.array([1.0, 1.0])}})
      >>> u, _ = tx.update(g, tx.init({{"w": jnp.zeros(2)}}))
      >>> u["w"].tolist()
      [2.0, 0.0]
    """

    def combine(fs, rs, a, g, stacks):
        del stacks  # element-wise: the same for any split into tensors
        us, stats = [], []
        for f, r in zip(fs, rs):
            aw, gw = as_weight(a, f), as_weight(g, f)
            us.append((gw * widen(f) + aw * widen(r)).astype(f.dtype))
            stats.append(with_update(pair_stats(f, r), us[-1], r))
        return us, stats

    return make_combiner("weighted_sum", combine, alpha, gamma, diagnostics, per_tensor=True, elementwise=True)


def pcgrad(
    alpha: float = 1.0, gamma: float = 1.0, scope: str = "module", diagnostics: bool = True,
    stack_axis: str | None = STACK_AXIS,
) -> optax.GradientTransformation:
    """PCGrad for unlearning: project the forget gradient off the retain gradient on conflict.

    With ``d = <g_f, g_r>`` and ``n = |g_r|^2`` (per leaf or over all leaves, in float32 or wider):
    ``g_f' = g_f - min(d, 0)/(n + 1e-10) * g_r`` and ``u = gamma*g_f' + alpha*g_r``, computed
    as ``u = gamma*g_f + beta*g_r`` with ``beta = alpha - gamma*min(d, 0)/(n + 1e-10)``.
    Then ``<u, g_r> = alpha*n + gamma*min(d, 0)*1e-10/(n + 1e-10)``: non-negative up to that
    1e-10 term, which matters only when ``|g_r|^2`` is itself near 1e-10.

    Args:
      alpha: weight of the retain gradient (>= 0).
      gamma: weight of the forget gradient (>= 0).
      scope: ``"module"`` projects each parameter tensor on its own (one leaf, or one slice of
        a stacked leaf, see ``stack_axis``); ``"global"`` uses dot products and norms over all
        parameters at once.
      {diagnostics}
      stack_axis: the logical axis name that stacks separate tensors along a leaf's leading
        axes (``"layers"``: the stacked layers of a ``scan_layers=True`` model, found in the
        NNX variable metadata of the gradients, or of the ``params`` given to ``update``).
        With ``scope="module"`` each slice ``leaf[i]`` is projected as its own tensor, so a
        scanned model gets the per-tensor PCGrad of the same model unscanned (the paper's).
        Leaves without NNX metadata are one tensor each; ``None`` makes every leaf one tensor.

    {returns}

    Example:
      >>> import jax.numpy as jnp, jax_unlearn as ju
      >>> tx = ju.pcgrad()
      >>> g = ju.TwoTaskGrads(forget={{"w": jnp.array([-1.0, 1.0])}}, retain={{"w": jnp.array([1.0, 0.0])}})
      >>> u, _ = tx.update(g, tx.init({{"w": jnp.zeros(2)}}))
      >>> u["w"].tolist()
      [1.0, 1.0]
    """
    check_choice("scope", scope, ("module", "global"))
    if stack_axis is not None and not (isinstance(stack_axis, str) and stack_axis):
        raise TypeError(f"pcgrad: stack_axis must be a logical axis name or None, got {stack_axis!r}")

    def combine(fs, rs, a, g, stacks):
        if scope == "global":
            stacks = [0] * len(fs)  # one projection for everything: slicing changes nothing
        pairs = [pair_stats(f, r, k) for f, r, k in zip(fs, rs, stacks)]
        if scope == "global":
            tot = _total([LeafStats(*p, 0.0, 0.0) for p in pairs])
            shared = as_weight(a, tot.fr) - as_weight(g, tot.fr) * jnp.minimum(tot.fr, 0.0) / (tot.rr + PCGRAD_EPS)
            betas = [shared.astype(p[2].dtype) for p in pairs]
        else:  # one beta per tensor: [] per leaf, or [layers] per stacked leaf
            betas = [as_weight(a, f) - as_weight(g, f) * jnp.minimum(p[2], 0.0) / (p[4] + PCGRAD_EPS)
                     for f, p in zip(fs, pairs)]
        us = [(as_weight(g, f) * widen(f) + _per_tensor(b, f) * widen(r)).astype(f.dtype)
              for f, r, b in zip(fs, rs, betas)]
        return us, [with_update(p, u, r, k) for p, u, r, k in zip(pairs, us, rs, stacks)]

    def chunk_apply(f, r, pair, a, g):
        """A slice of an unstacked leaf's update, given the whole leaf's pair sums (as ``combine``)."""
        beta = as_weight(a, f) - as_weight(g, f) * jnp.minimum(pair[2], 0.0) / (pair[4] + PCGRAD_EPS)
        u = (as_weight(g, f) * widen(f) + beta * widen(r)).astype(f.dtype)
        return u, leaf_stats(f, r, u)

    module = scope == "module"
    return make_combiner(f"pcgrad(scope={scope!r})", combine, alpha, gamma, diagnostics,
                         stack_axis if module else None, per_tensor=module,
                         chunk_sums=pair_stats if module else None, chunk_apply=chunk_apply if module else None)


def sago(
    alpha: float = 1.0, gamma: float = 1.0, agree: str = "forget", diagnostics: bool = True
) -> optax.GradientTransformation:
    """SAGO: sign-aligned gradient combination, element-wise.

    Conflict ``c_i = sign(g_f,i)*sign(g_r,i) < 0`` (a zero never conflicts). Then
    ``u_i = alpha*g_r,i`` where ``c_i``, else ``gamma*g_f,i`` (``agree="forget"``) or
    ``gamma*g_f,i + alpha*g_r,i`` (``agree="sum"``, the reference's "prefer retain").
    Every coordinate satisfies ``u_i * g_r,i >= 0``, so ``cos(u, g_r) > 0`` when ``g_r != 0``
    and ``alpha > 0``.

    Args:
      alpha: weight of the retain gradient (>= 0).
      gamma: weight of the forget gradient (>= 0).
      agree: what to take where the signs agree: ``"forget"`` or ``"sum"``.
      {diagnostics}

    {returns}

    Example:
      >>> import jax.numpy as jnp, jax_unlearn as ju
      >>> tx = ju.sago(alpha=1.0, gamma=2.0)
      >>> g = ju.TwoTaskGrads(forget={{"w": jnp.array([-1.0, 1.0, 3.0])}},
      ...                     retain={{"w": jnp.array([0.5, 0.5, 0.0])}})
      >>> u, _ = tx.update(g, tx.init({{"w": jnp.zeros(3)}}))
      >>> u["w"].tolist()
      [0.5, 2.0, 6.0]
    """
    check_choice("agree", agree, ("forget", "sum"))

    def combine(fs, rs, a, g, stacks):
        del stacks  # element-wise: the same for any split into tensors
        us = []
        for f, r in zip(fs, rs):
            fw, rw, aw, gw = widen(f), widen(r), as_weight(a, f), as_weight(g, f)
            keep = gw * fw + aw * rw if agree == "sum" else gw * fw
            us.append(jnp.where(_conflict(fw, rw), aw * rw, keep).astype(f.dtype))
        return us, [leaf_stats(f, r, u) for f, r, u in zip(fs, rs, us)]

    return make_combiner(f"sago(agree={agree!r})", combine, alpha, gamma, diagnostics, per_tensor=True,
                         elementwise=True)


for _fn in (weighted_sum, pcgrad, sago):
    if _fn.__doc__:  # absent under python -OO
        _fn.__doc__ = _fn.__doc__.format(diagnostics=DIAGNOSTICS_ARG, returns=RETURNS_DOC)

COMBINERS = Registry("combiner")
for _fn in (weighted_sum, pcgrad, sago):
    COMBINERS.register(_fn.__name__, _fn)


# ----------------------------------------------------------------------------- reports


def per_leaf_diagnostics(grads: TwoTaskGrads, updates: Any, stack_axis: str | None = STACK_AXIS) -> Any:
    """The diagnostics of ``CombinerState`` for each parameter tensor separately.

    Args:
      grads: the ``TwoTaskGrads`` given to a combiner.
      updates: the tree it returned.
      stack_axis: as in `pcgrad`: a leaf stacked along ``"layers"`` (``scan_layers=True``)
        reports each layer's slice as its own tensor.

    Returns:
      A tree shaped like the params whose leaves are ``CombinerState`` records, with scalar
      fields, or fields shaped like the stacked axes (``[layers]``) for a stacked leaf.
    """
    f, r, treedef = _split(grads, "per_leaf_diagnostics")
    u = treedef.flatten_up_to(updates)
    stacks = _stacks(grads, None, len(f), stack_axis) if stack_axis is not None else [0] * len(f)
    return jax.tree.unflatten(treedef, [_diagnostics(leaf_stats(*x, k)) for *x, k in zip(f, r, u, stacks)])


def global_diagnostics(grads: TwoTaskGrads, updates: Any) -> CombinerState:
    """The global diagnostics of any update ``u`` against the two gradients."""
    f, r, treedef = _split(grads, "global_diagnostics")
    u = treedef.flatten_up_to(updates)
    return _diagnostics(_total([leaf_stats(*x) for x in zip(f, r, u)]))
