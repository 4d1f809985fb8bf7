"""Logical axis names -> mesh shardings for model parameters.

Every parameter of `CausalLM` carries logical axis names (``out_sharding`` metadata, e.g.
``("vocab", "embed")`` for ``embed_tokens``). A *rules* mapping sends each logical name to
mesh axes (a name, a tuple of names, or ``None`` for replicated). `DEFAULT_RULES` targets a
mesh with axes ``data``/``fsdp``/``tensor``: fully-sharded data parallel over ``embed``,
tensor parallel over heads, MLP width and vocabulary. LoRA adapters (`lora.add_lora`) name their
rank axis ``lora_rank`` (replicated) and their other axis like the base weight's matching axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "lora_rank": None,  # LoRA adapters' rank axis: small, replicated
}

#: ``shardings`` argument of `load_hf`: a mesh (with `DEFAULT_RULES`), ``(mesh, rules)``, or a
#: callable ``(path, shape, logical_axes) -> jax.sharding.Sharding`` where ``path`` is the
#: dotted parameter path (``"layers.3.self_attn.q_proj"``) and ``shape`` the full shape.
ShardingSpec = Mesh | tuple[Mesh, Rules] | Callable[[str, tuple[int, ...], tuple], jax.sharding.Sharding]


def logical_to_spec(logical_axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array.

    Mesh axes missing from ``mesh``, already used by an earlier dimension, or whose size does not
    divide the dimension are dropped (that dimension is then replicated over them).
    """
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = [a for a in axes if a in mesh.shape and a not in used]
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
