"""Device mesh (``data``, ``fsdp``, ``tensor``), partition rules and multi-host start.

Parameters are placed by their logical axis names (``jax_unlearn.models.partitioning``): with
`DEFAULT_RULES`, ``embed`` is sharded over ``fsdp`` and heads, MLP width and vocabulary over
``tensor``. Optimizer state follows its parameters; batches ``[batch, seq]`` are split over
``data`` and ``fsdp`` together. Combiners run element-wise or reduce to scalars, so gradients
are combined where they live and nothing is gathered onto one device.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_unlearn.models.partitioning import DEFAULT_RULES, Rules, model_shardings

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
    """``[batch, seq]`` split over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


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


def maybe_initialize_distributed() -> bool:
    """Start multi-host JAX when the usual variables are set; returns whether it did.

    ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    start it explicitly (CPU hosts use gloo collectives); on a Cloud TPU slice
    (``TPU_WORKER_HOSTNAMES`` with several hosts) ``jax.distributed.initialize()`` finds
    them by itself. Call before any other JAX call.
    """
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
    if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()
        return True
    return False
