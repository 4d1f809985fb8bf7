"""`plan_run`: a run config, a target and a model shape -> the per-device `Plan` of the run's step.

The config is loaded as ``jax-unlearn unlearn`` loads it (`load_plan_config`: YAML plus
``key=value`` overrides, all its checks); what ``plan`` does not read (the data files, and the
model folder when a named shape replaces it) may stay unset. Nothing is allocated or written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from omegaconf import OmegaConf

from jax_unlearn.config import ConfigError, RunConfig, check_model_fit, load_config, parse_override
from jax_unlearn.models import ModelConfig, check_hf
from jax_unlearn.train import check_trainable

from . import cost as cst
from . import memory as mem
from .search import largest_fitting
from .shapes import shape_config
from .targets import TargetSpec, target_devices

UNREAD = "<not read by plan>"  # the value of the keys plan does not read when the config leaves them unset


UNREAD_KEYS = ("output_dir", "data.forget", "data.retain", "model.path")


def load_plan_config(path: str | None, overrides: Sequence[str] = (), shape: str | None = None) -> RunConfig:
    """`jax_unlearn.config.load_config` with ``output_dir``, ``data.forget``, ``data.retain`` and
    ``model.path`` set to `UNREAD` where the file and the overrides leave them unset (``???``):
    plan writes nothing, reads no data, and ``model.path`` only without a named ``shape``
    (`model_of` then says it is unset).
    Raises `ConfigError` as ``unlearn`` does for everything else."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        if "required value(s) not set" not in str(err):
            raise
    fill = [f"{k}={UNREAD}" for k in unset_keys(path, overrides, UNREAD_KEYS)]
    return load_config(path, fill + list(overrides))


def unset_keys(path: str | None, overrides: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Which of the dotted ``section.key`` names the YAML file and the overrides leave unset or ``???``."""
    conf = OmegaConf.create({} if path is None else OmegaConf.to_container(OmegaConf.load(path)))
    for item in overrides:
        conf = OmegaConf.merge(conf, parse_override(item))
    out = []
    for key in keys:
        *sections, name = key.split(".")
        node = conf
        for section in sections:
            node = node.get(section) if node is not None else None
        if node is None or name not in node or OmegaConf.is_missing(node, name):
            out.append(key)
    return out


@dataclasses.dataclass(frozen=True)
class Besides:
    """Something the run holds besides the step's arguments: where, per-device bytes (0: none
    on the devices), and why."""

    what: str
    where: str
    device_bytes: int
    note: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """The per-device plan of a run's step on a target (see `plan_run`)."""

    target: TargetSpec
    model: str
    devices: int
    mesh: tuple[int, ...]
    model_params: int
    trainable_params: int
    batch_size: int
    seq: int
    micro_batches: int
    memory: mem.StepMemory
    cost: cst.StepCost
    compile_s: float
    besides: tuple[Besides, ...]
    combiner: tuple[cst.CombinerTraffic, ...] = ()
    naive_peak: int | None = None  # the one-backward step's peak at the same shape (micro_batches=1)
    largest_batch: int | None = None  # per-device rows that fit (None: not searched; 0: none)
    probes: tuple[tuple[int, int], ...] = ()  # the search's (rows per batch shard, peak bytes) compiled
    notes: tuple[str, ...] = ()  # how the compiler was asked to compile, when not by default

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.target.chip.memory


def model_of(cfg: RunConfig, shape: str | ModelConfig | None) -> tuple[ModelConfig, str]:
    """``(ModelConfig, description)``: the named shape (or a `ModelConfig` given as is), else the
    config's model folder (its ``config.json`` and tensor headers; no weight read), checked
    against the run as ``unlearn`` does."""
    if isinstance(shape, ModelConfig):
        model_cfg, what = shape, f"{shape.model_type} d={shape.hidden_size} L={shape.num_hidden_layers}"
    elif shape is not None:
        model_cfg, what = shape_config(shape), f"shape {shape}"
    else:
        if cfg.model.path == UNREAD:
            raise ConfigError("model.path is not set: pass model.path=DIR (a Hugging Face folder) or --shape")
        model_cfg, what = check_hf(cfg.model.path), cfg.model.path
    check_model_fit(cfg, model_cfg)
    return model_cfg, what


def besides_step(cfg: RunConfig) -> tuple[Besides, ...]:
    """What a run (`jax_unlearn.run.execute`) holds besides the step's arguments and outputs."""
    out = [Besides("the loaded model", "devices", 0,
                   "run.execute donates it into the run's state (train.unlearn(donate_model=True)): its buffers "
                   "are the step's parameters and frozen weights, each weight held once. A Python caller of "
                   "train.unlearn without donate_model holds one more copy of the parameters and frozen weights"),
           Besides("tokenised forget and retain sets", "host", 0,
                   "12 bytes per token (input_ids, attention_mask, labels as int32); each step's two batches "
                   "are the step's arguments (counted above)")]
    if cfg.objective.reference == "precompute":
        out.append(Besides("NPO reference log-probs", "host", 0,
                           "4 bytes per forget row, computed before step 1 by a forward-only program that ends "
                           "before training; each batch's column is a step argument (counted in 'reference')"))
    if cfg.eval.enabled():
        out.append(Besides("evaluation", "devices", 0,
                           "runs between steps on the state's own buffers (no copy); its forward's activations "
                           "belong to its own programs, not to the step's peak"))
    return tuple(out)


def compile_plan(cfg: RunConfig, model_cfg: ModelConfig, devices: list, target: TargetSpec
                 ) -> tuple[mem.AbstractRun, mem.StepMemory, object, float, str | None]:
    """``(abstract run, its StepMemory, the executable, compile seconds, note)`` for one config."""
    run = mem.abstract_run(cfg, model_cfg, devices)
    compiled, seconds, note = mem.compile_step(run, target.platform)
    n_gradients = 1 if cfg.mode == "naive" else 2
    return run, mem.step_memory(run, compiled, n_gradients), compiled, seconds, note


def with_batch(cfg: RunConfig, per_device: int, n_devices: int) -> RunConfig:
    """``cfg`` with ``per_device`` rows per batch shard."""
    return dataclasses.replace(cfg, batch_size=per_device * mem.batch_shards(cfg, n_devices))


def plan_run(cfg: RunConfig, target: TargetSpec, shape: str | ModelConfig | None = None, *, search: bool = False,
             naive: bool = False, combiner: bool = False) -> Plan:
    """Compiles the run's step for ``target`` and returns its per-device `Plan`.

    ``shape``: a named shape (`jax_unlearn.plan.shapes.SHAPES`) or a `ModelConfig`; None reads
    the config's ``model.path``.
    ``search``: also the largest per-device batch that fits the chip (doubling, then bisection:
    a compile per probe); ``naive``: also the one-backward step's peak at the same shape (the
    overhead of two gradients); ``combiner``: the combiner update's bytes accessed against its
    floor, with and without diagnostics. Raises `ConfigError` for an input that cannot work.
    """
    devices = target_devices(target)
    model_cfg, what = model_of(cfg, shape)
    check_trainable(model_cfg, mem.model_options(cfg), cfg.train_config())
    run, memory, compiled, seconds, note = compile_plan(cfg, model_cfg, devices, target)
    seq, n = mem.sequence_length(cfg), len(devices)
    tokens = 2 * cfg.batch_size * seq / n  # forget and retain rows, per chip
    flop_params = run.model_params - (0 if model_cfg.tie_word_embeddings else model_cfg.vocab_size * model_cfg.hidden_size)
    trainable = sum(x.size for x in jax.tree.leaves(run.state.params))
    floor = cst.model_flops(flop_params, tokens, trainable == run.model_params, cfg.model.remat_policy is not None)
    step_cost = cst.step_cost(compiled, target.chip, tokens, floor)
    naive_peak = None
    if naive:
        base = dataclasses.replace(cfg, mode="naive", micro_batches=1)
        naive_peak = compile_plan(base, model_cfg, devices, target)[1].peak
    traffic = ()
    if combiner and cfg.mode != "naive":
        traffic = tuple(cst.combiner_traffic(run, cfg.combiner, d, target.platform) for d in (False, True))
    largest = None
    if search:
        unit = cfg.micro_batches
        rows = cfg.batch_size // mem.batch_shards(cfg, n)
        probes = {rows: memory.peak} if rows % unit == 0 else {}  # the config's own batch: compiled already

        def fits(per_device: int) -> bool:
            if per_device not in probes:
                probes[per_device] = compile_plan(with_batch(cfg, per_device, n), model_cfg, devices, target)[1].peak
            return probes[per_device] <= target.chip.memory

        largest = largest_fitting(fits, unit=unit)
        probes = tuple(probes.items())  # the config's own batch first, then in the order tried
    else:
        probes = ()
    return Plan(target, what, n, tuple(run.mesh.shape.values()), run.model_params, int(trainable), cfg.batch_size,
                seq, cfg.micro_batches, memory, step_cost, round(seconds, 1), besides_step(cfg), traffic,
                naive_peak, largest, probes, () if note is None else (note,))
