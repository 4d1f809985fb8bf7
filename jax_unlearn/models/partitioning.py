"""Logical axis names -> mesh shardings for model parameters.

Every parameter of `CausalLM` carries logical axis names (``out_sharding`` metadata, e.g.
``("vocab", "embed")`` for ``embed_tokens``). A *rules* mapping sends each logical name to
mesh axes (a name, a tuple of names, or ``None`` for replicated). `DEFAULT_RULES` targets a
mesh with axes ``data``/``fsdp``/``tensor``: fully-sharded data parallel over ``embed`` (split
over ``fsdp`` and ``data`` together, so each of ``data x fsdp`` devices holds ``1/(data*fsdp)``
of every weight and of its optimizer state), tensor parallel over heads, MLP width and
vocabulary. `HSDP_RULES` keeps weights whole across ``data`` (replicas of an ``fsdp``-sharded
model, e.g. one per slice when ``data`` crosses a slow network). LoRA adapters (`lora.add_lora`) name their
rank axis ``lora_rank`` (replicated) and their other axis like the base weight's matching axis.

Activations are constrained too (`constrain`, called by the model at the embedding output, around
every decoder layer, on the attention heads, the MLP width and the logits), by logical names of
their own: ``act_batch`` (rows, over ``data`` x ``fsdp``), ``act_seq`` and ``act_embed``
(replicated: with FSDP every device keeps its own batch rows whole and the compiler gathers
*weights*, never activations), ``act_heads``/``act_kv_heads``/``act_mlp``/``act_vocab`` (over
``tensor``, Megatron-style). The constraints apply only while a mesh is set
(``jax.sharding.use_abstract_mesh``, as `jax_unlearn.step` does for a sharded step) and are a
no-op otherwise. A dimension that a mesh axis does not divide (2 key/value heads on
``tensor=4``, a micro-batch of 2 rows on ``fsdp=8``) is replicated over that axis
(`logical_to_spec`), never split unevenly.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    "vocab": "tensor",
    "embed": ("fsdp", "data"),  # ZeRO-3 over every data-parallel device (`HSDP_RULES`: over fsdp only)
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "lora_rank": None,  # LoRA adapters' rank axis: small, replicated
    # activations (`constrain`)
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "act_vocab_split": ("data", "fsdp", "tensor"),  # output projection split over every device (`split_vocab`)
}

#: hybrid sharding: weights split over ``fsdp`` only and replicated over ``data``
HSDP_RULES: dict[str, MeshAxes] = {**DEFAULT_RULES, "embed": "fsdp"}

#: logical axes of the activations the model constrains
HIDDEN = ("act_batch", "act_seq", "act_embed")  # [b, t, D] residual stream
HEADS = ("act_batch", "act_seq", "act_heads", None)  # [b, t, N, H] queries, attention output
KV_HEADS = ("act_batch", "act_seq", "act_kv_heads", None)  # [b, t, K, H] keys, values
MLP = ("act_batch", "act_seq", "act_mlp")  # [b, t, F]
LOGITS = ("act_batch", "act_seq", "act_vocab")  # [b, t, vocab]
ALL_ROWS = (None, None, "act_embed")  # [b, t, D] every row on every device (`split_vocab`)
SPLIT_LOGITS = (None, None, "act_vocab_split")  # [b, t, vocab] all rows, vocabulary split
SPLIT_HEAD = ("act_vocab_split", None)  # [vocab, D] output projection split by vocabulary

#: ``shardings`` argument of `load_hf`: a mesh (with `DEFAULT_RULES`), ``(mesh, rules)``, or a
#: callable ``(path, shape, logical_axes) -> jax.sharding.Sharding`` where ``path`` is the
#: dotted parameter path (``"layers.3.self_attn.q_proj"``) and ``shape`` the full shape.
ShardingSpec = Mesh | tuple[Mesh, Rules] | Callable[[str, tuple[int, ...], tuple], jax.sharding.Sharding]


def logical_to_spec(logical_axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array.

    Mesh axes missing from ``mesh``, already used by an earlier dimension, or whose size does not
    divide the dimension are dropped (that dimension is then replicated over them); of several
    axes for one dimension, those of size 1 are dropped too.
    """
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = [a for a in axes if a in mesh.shape and a not in used]
        if len(keep) > 1:  # ("fsdp", "data") on a mesh with data=1 is just "fsdp"
            keep = [a for a in keep if mesh.shape[a] > 1] or keep[:1]
        while keep and dim % math.prod(mesh.shape[a] for a in keep):
            keep.pop()
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*spec)


def sharding_fn(spec: ShardingSpec | None) -> Callable[[str, tuple[int, ...], tuple], Any] | None:
    """Normalise a `ShardingSpec` to ``(path, shape, logical_axes) -> Sharding`` (``None`` stays ``None``)."""
    if spec is None:
        return None
    if isinstance(spec, Mesh):
        mesh, rules = spec, DEFAULT_RULES
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], Mesh):
        mesh, rules = spec
    elif callable(spec):
        return spec
    else:
        raise TypeError(
            "shardings must be None, a jax.sharding.Mesh, a (Mesh, rules) pair or a callable "
            f"(path, shape, logical_axes) -> Sharding; got {type(spec).__name__}"
        )
    mesh = auto_axes(mesh)
    return lambda path, shape, axes: NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and axis names with ``AxisType.Auto`` axes.

    The model leaves sharding decisions to the compiler's propagation (GSPMD/Shardy); with
    ``Explicit`` axes (``jax.make_mesh``'s default) ops such as the embedding gather would need
    explicit output shardings, so parameters are placed on the Auto-typed twin of the mesh.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def logical_axes(var: nnx.Variable, ndim: int) -> tuple:
    axes = var.get_metadata().get("out_sharding") or ()
    return tuple(axes) + (None,) * (ndim - len(axes))


def model_shardings(model_or_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A State of ``NamedSharding`` (same structure as ``nnx.state(model)``) from the logical axes."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    mesh = auto_axes(mesh)

    def one(v):
        shape = tuple(v.shape)
        return v.replace(NamedSharding(mesh, logical_to_spec(logical_axes(v, len(shape)), shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVATION_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules: Rules) -> Iterator[None]:
    """Use ``rules`` instead of `DEFAULT_RULES` for the activation constraints traced inside
    (e.g. the step's first call, which traces it)."""
    token = _ACTIVATION_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """``x`` with a sharding constraint from its logical ``axes`` (one name or None per
    dimension) on the current mesh; ``x`` unchanged when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = _ACTIVATION_RULES.get() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def gathered(w: jax.Array, axes: tuple) -> jax.Array:
    """A weight as a matmul uses it: sharded by its logical ``axes`` without the batch mesh
    axes (those of ``act_batch``, i.e. ``data``/``fsdp``), so FSDP all-gathers the weight
    (and reduce-scatters its gradient) while every device keeps its own batch rows; the
    model-parallel axes (``tensor``) stay. ``w`` unchanged when no mesh is set.

    Without it the compiler may instead move the activations to the weight's sharding (an
    embed-sharded ``[b, t, D]`` copy of the whole batch), which costs far more.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return w
    rules = _ACTIVATION_RULES.get() or DEFAULT_RULES
    batch = rules.get("act_batch")
    batch = {batch} if isinstance(batch, str) else set(batch or ())
    spec = []
    for entry in logical_to_spec(axes, w.shape, mesh, rules):
        keep = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in batch)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return jax.lax.with_sharding_constraint(w, PartitionSpec(*spec))


def split_vocab(tokens: int, vocab: int) -> bool:
    """Whether the vocabulary-sized weights (embedding table, output projection) should stay
    split and the tokens' activations move to them, rather than the weights be gathered: when
    a mesh splits the batch and the batch has fewer tokens than the vocabulary, so that
    ``tokens x D`` activations are smaller than a ``vocab x D`` table (and its full-size
    gradient). Then the embedding lookup runs on every device's slice of the table for all
    tokens, and the logits ``[b, t, vocab/n]`` of all rows are computed against each device's
    rows of the output projection (log-softmax statistics are reduced over devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    rules = _ACTIVATION_RULES.get() or DEFAULT_RULES
    batch = rules.get("act_batch")
    batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
    return math.prod(mesh.shape.get(a, 1) for a in batch) > 1 and tokens < vocab


def weight_axes(var: nnx.Variable, ndim: int) -> tuple:
    """The logical axes of the last ``ndim`` dimensions of a parameter (a layer's slice of a
    layer-stacked parameter drops the leading ``layers`` name)."""
    axes = tuple(var.get_metadata().get("out_sharding") or ())
    return ((None,) * ndim + axes)[-ndim:]


def host_value(x: jax.Array) -> np.ndarray:
    """The whole value of ``x`` in this host's memory. An array spread over the devices of several
    processes is gathered tensor by tensor (``process_allgather``, a collective: every process must
    call this for the same arrays in the same order); nothing ever gathers onto one device."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
