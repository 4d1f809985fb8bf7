"""Device mesh (``data``, ``fsdp``, ``tensor``), partition rules and multi-host start.

Parameters are placed by their logical axis names (``jax_unlearn.models.partitioning``): with
`DEFAULT_RULES`, ``embed`` is sharded over ``fsdp`` and ``data`` (`HSDP_RULES`: ``fsdp`` only) and
heads, MLP width and vocabulary over ``tensor``. Optimizer state follows its parameters; batches ``[batch, seq]`` are split over
``data`` and ``fsdp`` together. Combiners run element-wise or reduce to scalars, so gradients
are combined where they live and nothing is gathered onto one device.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_unlearn.models.partitioning import DEFAULT_RULES, HSDP_RULES, Rules, model_shardings  # noqa: F401

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1 to take all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name} must be a positive integer or -1, got {s}")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"{n_devices} devices cannot be split into mesh data={self.data} "
                                 f"fsdp={self.fsdp} tensor={self.tensor}")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                             f"devices, but {n_devices} are available")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: list | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays (``[batch, seq]`` token columns, ``[batch]`` per-row columns such as
    ``ref_logp``) split by rows over ``data`` x ``fsdp``, other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every parameter of an ``nnx.State`` from its logical axes."""
    return model_shardings(state, mesh, rules)


def optimizer_shardings(tx: Any, opt_state: Any, param_sharding: Any, mesh: Mesh) -> Any:
    """Shardings for ``tx``'s state: every copy of the parameter tree inside it (Adam's ``mu``
    and ``nu``, an accumulator, ...) is sharded like the parameters, found by
    ``optax.tree_utils.tree_map_params``; everything else (step counts, hyperparameters,
    combiner diagnostics) is replicated."""
    import optax

    return optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, opt_state, param_sharding, transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def train_state_shardings(state: Any, mesh: Mesh, tx: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """Shardings for a ``jax_unlearn.step.TrainState`` whose optimizer state ``tx`` made:
    parameters, frozen variables and the reference model by their logical axes, optimizer
    state like its parameters (`optimizer_shardings`), the step counter replicated."""
    params = param_shardings(state.params, mesh, rules)
    return state._replace(
        step=replicated(mesh),
        params=params,
        opt_state=optimizer_shardings(tx, state.opt_state, params, mesh),
        frozen=param_shardings(state.frozen, mesh, rules),
        ref=None if state.ref is None else param_shardings(state.ref, mesh, rules),
    )


# ----------------------------------------------------------------------------- what a program moves

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVE_KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled (SPMD-partitioned) program: its kind and the per-device
    ``(dtype, shape)`` of each result."""

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(_DTYPE_BYTES.get(d, 4) * math.prod(s) for d, s in self.shapes)


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of ``compiled.as_text()`` (per-device shapes, as partitioned).

    A collective inside a loop body (``lax.scan``) is listed once, however often it runs; an
    asynchronous ``*-start`` counts its results only (not the operands it also returns).
    """
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shapes = tuple((d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(m.group(1)))
        if m.group(3) and m.group(2) in ("all-gather", "collective-permute") and len(shapes) % 2 == 0:
            shapes = shapes[len(shapes) // 2:]  # (operands..., results...)
        out.append(Collective(m.group(2), shapes))
    return out


def _weight_variants(shape: tuple[int, ...], factors: set[int]) -> set[tuple[int, ...]]:
    """``shape`` without its size-1 dimensions, and without any subset of the dimensions that
    a mesh split could reduce to size 1 (e.g. 2 key/value heads over ``tensor=2``)."""
    dims = [d for d in shape if d != 1]
    out = set()
    for keep in itertools.product(*[(True, False) if d in factors else (True,) for d in dims]):
        out.add(tuple(d for d, k in zip(dims, keep) if k))
    return out


def _weight_shaped(shape: tuple[int, ...], weights: set[tuple[int, ...]], factors: set[int]) -> bool:
    """Whether ``shape`` (size-1 dimensions dropped) is a weight shape (one of `_weight_variants`)
    with some dimensions divided by a product of mesh axis sizes, in any order of dimensions."""
    shape = tuple(d for d in shape if d != 1)
    for w in weights:
        if len(w) == len(shape) and any(
                all(p % r == 0 and p // r in factors for r, p in zip(shape, perm))
                for perm in itertools.permutations(w)):
            return True
    return False


def collective_bytes(hlo_text: str, weight_shapes: Any, mesh: Mesh) -> dict[str, int]:
    """Per-device bytes that the collectives of ``compiled.as_text()`` deliver, split into
    ``"weights"`` (results shaped like a weight of ``weight_shapes`` - arrays or a
    pytree of them - or like one layer of a layer-stacked weight, whole or split over mesh
    axes: FSDP gathers, gradient reductions) and
    ``"activations"`` (everything else: activations, losses, norms).

    The split is by shape, so it is exact only when no activation happens to be shaped like
    a weight (a test picks its sizes so); collectives inside loops count once (`collectives`).
    """
    sizes = list(mesh.shape.values())
    factors = {math.prod(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r)}
    shapes = [x.shape for x in jax.tree.leaves(weight_shapes)]
    shapes += [s[1:] for s in shapes if len(s) > 1]  # one layer of a layer-stacked weight
    weights = set().union(*(_weight_variants(s, factors) for s in shapes))
    out = {"weights": 0, "activations": 0}
    for c in collectives(hlo_text):
        for dtype, shape in c.shapes:  # a combined all-reduce may carry gradients and losses at once
            kind = "weights" if _weight_shaped(shape, weights, factors) else "activations"
            out[kind] += Collective(c.kind, ((dtype, shape),)).nbytes
    return out


def maybe_initialize_distributed() -> bool:
    """Start multi-host JAX when the usual variables are set; returns whether it did.

    ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    start it explicitly (CPU hosts use gloo collectives); on a Cloud TPU slice
    (``TPU_WORKER_HOSTNAMES`` with several hosts) ``jax.distributed.initialize()`` finds
    them by itself. Call before any other JAX call; a second call does nothing (and returns True).
    """
    if jax.distributed.is_initialized():
        return True
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    if len(tpu_worker_hostnames()) > 1:
        jax.distributed.initialize()
        return True
    return False


def tpu_worker_hostnames() -> list[str]:
    """The hosts of a Cloud TPU slice from ``TPU_WORKER_HOSTNAMES`` (comma-separated), or ``[]``
    when it does not hold host names: on a machine without TPUs, libtpu's failed start writes a
    sentence there ("WARNING: could not determine TPU worker hostnames or IP addresses, please
    set ..."), which must not start a multi-host run."""
    hosts = [h.strip() for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")]
    return hosts if all(re.fullmatch(r"[A-Za-z0-9._:\-\[\]]+", h) for h in hosts) else []
