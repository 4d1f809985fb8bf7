"""What the compiler says a step costs: an ESTIMATE of time, never a measurement.

`step_cost` reads the executable's ``cost_analysis()`` (per device: the SPMD-partitioned
program's FLOPs and bytes accessed) and turns it into a roofline time at the chip's published
peaks (`jax_unlearn.plan.targets.CHIPS`)::

    t = max(flops / peak_flops, bytes_accessed / hbm_bandwidth)      # seconds per step
    tokens/s per chip = 2 * batch * seq / devices / t                # forget and retain rows

It ignores collectives, latency and overlap. XLA's cost analysis counts a loop body once, not
once per iteration: with ``model.scan_layers`` the layers' FLOPs and bytes are counted for one
layer (checked: Llama-3.2-1B scanned on v5p x4, 2.06 TFLOP per chip counted against
6 * N * T / chips = 15.2). The roofline therefore takes ``max(compiler's FLOPs, model_flops)``,
the textbook count of a dense transformer step (`model_flops`), and the bytes as counted (a lower
bound with a scan).

`combiner_traffic` compiles the combiner's ``update`` alone on the target (the two gradients
and its state sharded like the parameters) and reports its bytes accessed against the floor
of a per-element combiner: read two gradients, write one update (3 x the parameters' bytes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jax_unlearn import sharding as sh
from jax_unlearn.combiners import TwoTaskGrads
from jax_unlearn.config import CombinerConfig, build_combiner

from .memory import AbstractRun, device_bytes
from .targets import Chip


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Per-device FLOPs and bytes accessed of one step (the compiler's count), and the roofline
    ESTIMATE at the chip's peaks (None when the chip has no published peak)."""

    flops: float
    bytes_accessed: float
    seconds: float | None
    tokens_per_s_per_chip: float | None
    bound: str | None  # "compute" or "memory": which roofline term is larger
    flops_from: str = "compiler"  # "compiler" (its count) or "textbook" (`model_flops`, the larger)
    counted: bool = True  # whether the executable reported a cost analysis at all (XLA:GPU's does not)


def cost_numbers(compiled: Any) -> dict[str, float]:
    """``{"flops", "bytes accessed", ...}`` of ``compiled.cost_analysis()`` (a dict, or a list
    of one dict in some JAX versions)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def roofline(flops: float, bytes_accessed: float, chip: Chip, tokens_per_chip: float) -> StepCost:
    """`StepCost` from per-device counts (pure arithmetic; see the module doc)."""
    if not chip.peak_flops or not chip.hbm_bandwidth or max(flops, bytes_accessed) <= 0:
        return StepCost(flops, bytes_accessed, None, None, None)  # no peak, or the compiler counted nothing
    compute, memory = flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth
    seconds = max(compute, memory)
    return StepCost(flops, bytes_accessed, seconds, tokens_per_chip / seconds, "compute" if compute >= memory else "memory")


def model_flops(flop_params: int, tokens_per_chip: float, all_weights_train: bool, remat: bool) -> float:
    """The textbook FLOPs of one step per chip: forward ``2 N T``, backward ``4 N T`` when every
    weight trains (activation and weight gradients; ``2 N T`` when only adapters or a subset
    train), ``+ 2 N T`` when remat recomputes the forward; ``N`` the weights a token multiplies
    (the embedding lookup excluded), ``T`` the tokens of both tasks. Attention's own FLOPs and a
    reference model's forward are left out: a lower bound."""
    per_token = 2 + (4 if all_weights_train else 2) + (2 if remat else 0)
    return float(per_token * flop_params * tokens_per_chip)


def step_cost(compiled: Any, chip: Chip, tokens_per_chip: float, floor_flops: float = 0.0) -> StepCost:
    """`roofline` of a compiled step, with FLOPs at least ``floor_flops`` (`model_flops`)."""
    c = cost_numbers(compiled)
    counted = float(c.get("flops", 0.0))
    out = roofline(max(counted, floor_flops), float(c.get("bytes accessed", 0.0)), chip, tokens_per_chip)
    return dataclasses.replace(out, flops_from="compiler" if counted >= floor_flops else "textbook", counted=bool(c))


@dataclasses.dataclass(frozen=True)
class CombinerTraffic:
    """Bytes one device's combiner update accesses (the compiler's count) against the floor
    ``3 x`` the parameters' bytes (read g_f and g_r, write the update)."""

    name: str
    diagnostics: bool
    bytes_accessed: float | None  # None: the executable reports no cost analysis (XLA:GPU)
    floor: int

    @property
    def ratio(self) -> float | None:
        return None if self.bytes_accessed is None or not self.floor else self.bytes_accessed / self.floor


def combiner_traffic(run: AbstractRun, cfg: CombinerConfig, diagnostics: bool, platform: str) -> CombinerTraffic:
    """Compiles ``cfg``'s combiner update alone (with or without diagnostics) on ``run``'s mesh."""
    from .memory import compile_lowered

    combiner = build_combiner(dataclasses.replace(cfg, diagnostics=diagnostics))
    params = run.state.params
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    c_state = jax.eval_shape(combiner.init, params)
    c_shard = sh.optimizer_shardings(combiner, c_state, p_shard, run.mesh)
    attach = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    c_state = jax.tree.map(attach, c_state, c_shard)

    def update(g_f, g_r, state, p):
        return combiner.update(TwoTaskGrads(g_f, g_r), state, p)

    fn = jax.jit(update, in_shardings=(p_shard, p_shard, c_shard, p_shard), out_shardings=(p_shard, c_shard))
    compiled, _ = compile_lowered(fn.lower(params, params, c_state, params), platform)
    counted = cost_numbers(compiled)
    accessed = float(counted["bytes accessed"]) if "bytes accessed" in counted else None
    return CombinerTraffic(cfg.name, diagnostics, accessed, 3 * device_bytes(params))
