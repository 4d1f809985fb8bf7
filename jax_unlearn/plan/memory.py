"""The run's step, compiled ahead of time on abstract arrays for a target, and its per-device bytes.

`abstract_run` builds what `jax_unlearn.train.build_run` builds - the same factories
(`jax_unlearn.config.build_tx`, ``build_objective``, ``step_config``), LoRA adapters
(`jax_unlearn.train.with_adapters`), `jax_unlearn.step.abstract_state` sharded by
`jax_unlearn.sharding.train_state_shardings` and `jax_unlearn.step.make_two_grad_step` - with
``jax.ShapeDtypeStruct`` leaves carrying their shardings on a mesh of the target's devices:
nothing is allocated. `compile_step` lowers and compiles it; `step_memory` splits the
executable's ``memory_analysis()`` per device::

    peak = arguments + outputs - aliased (donated state) + temporaries
    temporaries = the two gradients [sharded like the parameters] + activations and the rest
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_unlearn import objectives as obj
from jax_unlearn import sharding as sh
from jax_unlearn import step as st
from jax_unlearn.config import ConfigError, RunConfig, build_objective, build_tx, step_config
from jax_unlearn.models import CausalLM, ModelConfig
from jax_unlearn.run import model_options
from jax_unlearn.train import with_adapters

TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
CUDNN_HINT = ("model.attention_impl=cudnn: cuDNN attention does not lower here ({err}); it compiles only for "
              "an NVIDIA target (--target gpu:...; this one is {platform}), and the GPU compiler needs the cuDNN "
              "library on this machine, no GPU: pip install nvidia-cudnn-cu12 (or set model.attention_impl=xla)")
# XLA:CPU's loop-invariant code motion hoists float32 copies of every layer's bfloat16 weights out
# of the layer scan, a cost of the CPU backend alone (docs/benchmarks.md): off for cpu targets
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s ``ShapeDtypeStruct`` leaves (with shardings)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def sequence_length(cfg: RunConfig) -> int:
    """Tokens per row of the run's batches: ``data.max_length`` (+1: ``chunk_bos`` re-encodes
    every chunk with a masked BOS)."""
    return cfg.data.max_length + (1 if cfg.data.chunk_bos else 0)


def run_mesh(cfg: RunConfig, devices: list) -> jax.sharding.Mesh:
    """The run's mesh over ``devices``; `ConfigError` when they or the batch do not divide it
    (the checks of `jax_unlearn.train.check_mesh`, on the target's devices)."""
    try:
        mesh = sh.make_mesh(cfg.mesh, devices)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the mesh's data x fsdp = {shards} "
                          f"batch shards of {len(devices)} devices (set batch_size or mesh.*)")
    return mesh


def batch_shards(cfg: RunConfig, n_devices: int) -> int:
    """How many devices split the batch rows (``data`` x ``fsdp``) on ``n_devices``."""
    data, fsdp, _ = cfg.mesh.resolve(n_devices)
    return data * fsdp


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """The run's jitted step and its abstract arguments (sharded ``ShapeDtypeStruct``s)."""

    step: Callable
    state: st.TrainState
    forget: dict
    retain: dict
    mesh: jax.sharding.Mesh
    model_params: int  # parameters of the whole model (adapters included)


def abstract_run(cfg: RunConfig, model_cfg: ModelConfig, devices: list, step_options: dict | None = None) -> AbstractRun:
    """The run's step as `jax_unlearn.train.build_run` makes it, on abstract arrays (see the module doc);
    ``step_options``: `jax_unlearn.step.StepConfig` fields no run config key sets (e.g. ``fuse_combine``)."""
    tcfg = cfg.train_config()
    mesh = run_mesh(tcfg, devices)
    options = model_options(cfg)
    model = nnx.eval_shape(lambda: with_adapters(CausalLM(model_cfg, options, rngs=nnx.Rngs(0)), cfg.lora)[0])
    train_filter = None if cfg.lora.rank is None else nnx.LoRAParam
    tx = build_tx(tcfg, max(tcfg.max_steps or 1000, 1))  # the schedule's length does not change the state
    objective = build_objective(tcfg.objective, model_cfg.hidden_size)
    try:
        defs, state = st.abstract_state(model, tx, objective, train=train_filter)
    except ValueError as err:
        raise ConfigError(f"'objective.trainable': {err}") from None
    shardings = sh.train_state_shardings(state, mesh, tx)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    rows = sh.batch_sharding(mesh)
    step_cfg = dataclasses.replace(step_config(tcfg, options), **(step_options or {}))
    step = st.make_two_grad_step(defs, objective, tx, step_cfg, shardings, rows)
    tokens = {k: jax.ShapeDtypeStruct((tcfg.batch_size, sequence_length(cfg)), jnp.int32, sharding=rows)
              for k in TOKEN_COLUMNS}
    forget = dict(tokens)
    if tcfg.objective.reference == "precompute":  # build_run's precomputed reference log-probs, one per row
        forget[obj.REF_LOGP] = jax.ShapeDtypeStruct((tcfg.batch_size,), jnp.float32, sharding=rows)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return AbstractRun(step, state, forget, dict(tokens), mesh, int(n_params))


def compile_lowered(lowered: Any, platform: str, cpu_licm: bool = False) -> tuple[Any, str | None]:
    """``(executable, note)``: on ``cpu`` without XLA:CPU's loop-invariant code motion unless
    ``cpu_licm``. On ``gpu``, when XLA's Triton GEMM emitter finds no tile for a matmul (it does
    for row counts such as 2 x 513 tokens, its tiles chosen without a GPU to autotune on), the
    step is compiled again with ``xla_gpu_enable_triton_gemm=False`` (cuBLAS matmuls), and the
    note says so."""
    if platform == "cpu":
        return lowered.compile(None if cpu_licm else CPU_COMPILER_OPTIONS), None
    try:
        return lowered.compile(), None
    except Exception as err:  # noqa: BLE001 - jax raises JaxRuntimeError; only this case is retried
        if platform != "gpu" or "tile sizes" not in str(err):
            raise
    return lowered.compile({"xla_gpu_enable_triton_gemm": False}), \
        "XLA's Triton GEMM found no tiles for a matmul: compiled with xla_gpu_enable_triton_gemm=False (cuBLAS)"


def compile_step(run: AbstractRun, platform: str, cpu_licm: bool = False) -> tuple[Any, float, str | None]:
    """``(compiled executable, seconds to lower and compile, a note or None)`` (`compile_lowered`).
    Raises `ConfigError` when ``model.attention_impl=cudnn`` cannot be lowered (no cuDNN library
    here, or a target other than an NVIDIA GPU)."""
    t0 = time.perf_counter()
    try:
        lowered = run.step.lower(run.state, run.forget, run.retain)
    except RuntimeError as err:
        if "cudnn" not in str(err).lower():
            raise
        raise ConfigError(CUDNN_HINT.format(platform=platform, err=str(err).splitlines()[0][:200])) from None
    compiled, note = compile_lowered(lowered, platform, cpu_licm)
    return compiled, time.perf_counter() - t0, note


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled step.

    ``params``, ``frozen``, ``optimizer``, ``reference``, ``batches`` are the step's arguments
    (the donated state and the two batches, computed from their shardings); ``gradients`` the
    nominal size of the gradients the step takes (two trees sharded like ``params``, one in
    naive mode), counted inside ``temp``; ``arguments``, ``outputs``, ``alias``, ``temp`` the
    compiler's ``memory_analysis()``."""

    params: int
    frozen: int
    optimizer: int
    reference: int
    batches: int
    gradients: int
    arguments: int
    outputs: int
    alias: int
    temp: int

    @property
    def activations(self) -> int:
        """Temporaries besides the gradients: activations, gathered weights, the update."""
        return max(self.temp - self.gradients, 0)

    @property
    def peak(self) -> int:
        """arguments + outputs - aliased + temporaries (the donated state is updated in place)."""
        return self.arguments + self.outputs - self.alias + self.temp


def step_memory(run: AbstractRun, compiled: Any, n_gradients: int = 2) -> StepMemory:
    """`StepMemory` of ``compiled`` (the step of ``run``)."""
    m = compiled.memory_analysis()
    s = run.state
    params = device_bytes(s.params)
    ref_logp = device_bytes({k: v for k, v in run.forget.items() if k == obj.REF_LOGP})
    return StepMemory(params=params, frozen=device_bytes(s.frozen), optimizer=device_bytes(s.opt_state),
                      reference=device_bytes(s.ref) + ref_logp,
                      batches=device_bytes((run.forget, run.retain)) - ref_logp, gradients=n_gradients * params,
                      arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                      alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes))
