"""The embedded benchmark's configuration: ``configs/demo.yaml`` and ``jax-unlearn sweep`` files.

`BenchConfig` holds the world (`jax_unlearn.bench.world.WorldConfig`), the tiny model's size
(`ModelSize`), its pretraining (`PretrainConfig`), the grid of unlearning runs (`GridSection`)
and the objectives and combiners compared (names from the library's registries, or labels of
``variants``: a registered combiner with other settings, e.g. its forget gradient reused every
k steps or weights that change during the run).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jax_unlearn.bench.checks import require_positive
from jax_unlearn.bench.world import ATTRIBUTES, WorldConfig, make_world
from jax_unlearn.combiners import COMBINERS
from jax_unlearn.config import LoraConfig
from jax_unlearn.objectives import OBJECTIVES

#: registered objectives the benchmark cannot run, and why
UNSUPPORTED = {"rmu": "RMU steers one layer of a 32-layer model and trains three others; the benchmark's "
                      "4-layer model has no such setup (run RMU with 'jax-unlearn unlearn')"}


def bench_objectives() -> tuple[str, ...]:
    """The registered objectives the benchmark runs."""
    return tuple(n for n in OBJECTIVES.names() if n not in UNSUPPORTED)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The tiny LLaMA (defaults: 4 layers, d=64, ~0.27M parameters with the 205-token vocabulary)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256

    def __post_init__(self):
        require_positive({f"model.{n}": getattr(self, n) for n in ("hidden", "layers", "heads", "kv_heads",
                                                                   "intermediate")})
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"model.hidden={self.hidden} must divide by model.heads={self.heads}, "
                             f"and model.heads by model.kv_heads={self.kv_heads}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """AdamW with linear warmup and cosine decay over ``max_steps``; stops early at the first
    evaluation (every ``eval_every`` steps) where forget, retain, held-out and general
    accuracy are all >= ``target``."""

    max_steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-3
    warmup: int = 200
    weight_decay: float = 0.0
    eval_every: int = 500
    target: float = 0.98
    seed: int = 0

    def __post_init__(self):
        require_positive({f"pretrain.{n}": getattr(self, n) for n in ("max_steps", "batch_size", "eval_every")})
        if not 0 <= self.warmup < self.max_steps:
            raise ValueError(f"pretrain.warmup={self.warmup} must lie in [0, pretrain.max_steps={self.max_steps})")
        require_positive({"pretrain.lr": self.lr}, "> 0")


@dataclasses.dataclass(frozen=True)
class GridSection:
    """The hyperparameter swept and the trajectory of each value.

    With ``param: lr`` the value ``v`` runs ``steps * max(values) / v`` steps (a lower rate
    gets proportionally more steps); any other param runs ``steps`` steps at the top-level
    ``lr``. Each trajectory is evaluated every ``ceil(steps / evals)`` steps and at its end
    (at most ``evals`` times, plus its start).
    """

    param: Literal["lr", "alpha", "gamma", "beta", "delta"] = "lr"
    values: list[float] = dataclasses.field(default_factory=lambda: [4e-3, 2e-3, 1e-3])
    steps: int = 40
    evals: int = 8


@dataclasses.dataclass(frozen=True)
class RobustnessSection:
    """The robustness attacks run on each objective x combiner's selected runs and on the gold
    model (`jax_unlearn.bench.attacks`): relearning ``relearn_steps`` AdamW steps of
    ``relearn_batch_size`` rows at ``relearn_lr`` (data order ``seed``), weight-only
    quantization ``quantize`` (``int<bits>`` per channel, ``int<bits>_g<size>`` per group), and
    paraphrased questions. ``enabled: false`` skips them all."""

    enabled: bool = True
    relearn_steps: int = 10
    relearn_lr: float = 3e-3
    relearn_batch_size: int = 16
    quantize: list[str] = dataclasses.field(default_factory=lambda: ["int8", "int4", "int4_g128"])
    seed: int = 0

    def __post_init__(self):
        from jax_unlearn.eval.robustness import RelearnConfig, parse_scheme

        try:
            RelearnConfig(steps=self.relearn_steps, lr=self.relearn_lr, batch_size=self.relearn_batch_size,
                          seed=self.seed)
        except ValueError as err:
            raise ValueError(f"robustness.{err}".replace("relearn ", "relearn_", 1)) from None
        for s in self.quantize:
            try:
                parse_scheme(s)
            except ValueError as err:
                raise ValueError(f"robustness.quantize: {err}") from None


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """``jax-unlearn demo`` / ``sweep`` (``configs/demo.yaml`` holds these defaults)."""

    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    model: ModelSize = dataclasses.field(default_factory=ModelSize)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    grid: GridSection = dataclasses.field(default_factory=GridSection)
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["grad_diff", "simnpo"])
    combiners: list[str] = dataclasses.field(default_factory=lambda: ["weighted_sum", "pcgrad", "sago"])
    worlds: list[int] = dataclasses.field(default_factory=lambda: [0])  # world seeds (replicates)
    lr: float = 1e-3  # used when grid.param is not lr
    alpha: float = 1.0  # retain weight of every combiner
    gamma: float = 1.0  # forget weight of every combiner
    beta: float = 1.0  # SimNPO / NPO beta
    delta: float = 2.0  # SimNPO delta
    batch_size: int = 32
    forget_threshold: float = 0.10  # the "fixed" criterion's bar on forget accuracy
    gold_tolerance: float = 0.02  # the "gold" criterion: forget accuracy <= the gold model's + this
    seed: int = 0  # data order
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # rank set: LoRA adapters train alone
    robustness: RobustnessSection = dataclasses.field(default_factory=RobustnessSection)
    tofu: bool = True  # TOFU's truth ratio, forget quality, model utility of the selected runs (bench/tofu_world.py)
    # label -> {combiner: a registered name, forget_every: k, and any combiner.* key}: usable in 'combiners'
    variants: dict[str, Any] = dataclasses.field(default_factory=dict)

    def combiner_order(self) -> list[str]:
        """Registered combiners, then the variants' labels: the order of the paired differences."""
        return list(COMBINERS.names()) + list(self.variants)  # labels never repeat a registered name (check)

    def variant(self, label: str) -> tuple[dict[str, Any], int]:
        """``(CombinerConfig keys, forget_every)`` of a combiner label (a registered name: ``{"name": label}``, 1)."""
        if label not in self.variants:
            return {"name": label}, 1
        v = dict(self.variants[label])
        forget_every = v.pop("forget_every", 1)
        return {"name": v.pop("combiner"), **v}, forget_every

    def _check_variants(self) -> None:
        from jax_unlearn.config import CombinerConfig, ConfigError, TrainConfig, build_combiner, check_ranges

        keys = {f.name for f in dataclasses.fields(CombinerConfig)} - {"name", "alpha", "gamma"}
        for label, v in self.variants.items():
            where = f"'variants.{label}'"
            if label in COMBINERS.names():
                raise ValueError(f"{where}: a variant label must not be a registered combiner's name")
            if not isinstance(v, dict) or v.get("combiner") not in COMBINERS.names():
                raise ValueError(f"{where} needs 'combiner': one of {', '.join(COMBINERS.names())}")
            bad = sorted(set(v) - keys - {"combiner", "forget_every"})
            if bad:
                raise ValueError(f"{where} has {bad[0]!r}; allowed keys: combiner, forget_every, {', '.join(sorted(keys))} "
                                 "(alpha and gamma are the benchmark's own keys)")
            comb, forget_every = self.variant(label)
            try:
                cfg = TrainConfig(output_dir="", combiner=CombinerConfig(**comb, alpha=self.alpha, gamma=self.gamma),
                                  forget_every=forget_every)
                check_ranges(cfg)
                build_combiner(cfg.combiner)  # the factory's own checks (settings it does not take, ranges)
            except (ConfigError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: {err}") from None

    def check(self) -> None:
        """Raises ValueError naming the key when a value cannot run."""
        self._check_variants()
        for key, allowed in (("objectives", bench_objectives()), ("combiners", tuple(self.combiner_order()))):
            values = getattr(self, key)
            if not values:
                raise ValueError(f"'{key}' is empty; choose from {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad and bad[0] in UNSUPPORTED:
                raise ValueError(f"'{key}' has {bad[0]!r}, which the benchmark does not run: {UNSUPPORTED[bad[0]]}")
            if bad:
                raise ValueError(f"'{key}' has {bad[0]!r}; allowed values: {', '.join(allowed)}")
        if not self.worlds:
            raise ValueError("'worlds' is empty; give at least one world seed, e.g. worlds=[0]")
        if len(set(self.worlds)) != len(self.worlds) or min(self.worlds) < 0:
            raise ValueError(f"'worlds' must be distinct non-negative seeds, got {list(self.worlds)}")
        require_positive({"'lr'": self.lr, "'beta'": self.beta}, "> 0")
        if not self.grid.values:
            raise ValueError("'grid.values' is empty; give the values of grid.param to sweep, e.g. [4e-3, 2e-3]")
        if self.grid.param in ("lr", "beta") and any(v <= 0 for v in self.grid.values):
            raise ValueError(f"'grid.values' for grid.param={self.grid.param} must be positive, "
                             f"got {list(self.grid.values)}")
        if self.grid.param in ("alpha", "gamma") and any(v < 0 for v in self.grid.values):
            raise ValueError(f"'grid.values' for grid.param={self.grid.param} must be non-negative, "
                             f"got {list(self.grid.values)}")
        require_positive({"'grid.steps'": self.grid.steps, "'grid.evals'": self.grid.evals,
                          "'batch_size'": self.batch_size})
        if not 0.0 <= self.forget_threshold <= 1.0:
            raise ValueError(f"'forget_threshold' must lie in [0, 1], got {self.forget_threshold}")
        if not 0.0 <= self.gold_tolerance <= 1.0:
            raise ValueError(f"'gold_tolerance' must lie in [0, 1], got {self.gold_tolerance}")
        from jax_unlearn.config import ConfigError, TrainConfig, check_ranges

        try:  # the lora section's ranges and targets, as in a run config
            check_ranges(TrainConfig(output_dir="", lora=self.lora))
        except ConfigError as err:
            raise ValueError(str(err)) from None
        rows = 3 * len(ATTRIBUTES)  # texts per person
        for split in ("forget", "retain"):
            n = getattr(self.world, split)
            if self.batch_size > n * rows:
                raise ValueError(f"'batch_size'={self.batch_size} exceeds the {n * rows} {split} rows "
                                 f"of world.{split}={n} people")
        if self.robustness.enabled:
            seen = self.world.forget // 2  # the relearning attack's half of the forget people
            if seen < 1:
                raise ValueError(f"the robustness attacks split the forget people in two halves: world.forget="
                                 f"{self.world.forget} needs to be >= 2 (or set robustness.enabled=false)")
            if self.robustness.relearn_batch_size > seen * rows:
                raise ValueError(f"'robustness.relearn_batch_size'={self.robustness.relearn_batch_size} exceeds the "
                                 f"{seen * rows} rows of the relearning half ({seen} forget people)")
        heldout = make_world(self.world).persons("heldout")
        if not any(p.neighbour for p in heldout) or all(p.neighbour for p in heldout):
            raise ValueError(f"world {self.world.seed} needs held-out people both sharing and not sharing a name "
                             "with a forget person; change world.first_names, world.last_names or world.forget")

    def schedule(self, value: float) -> tuple[float, int, int]:
        """``(lr, steps, eval_every)`` of the trajectory at grid value ``value``."""
        if self.grid.param == "lr":
            lr, steps = value, int(round(self.grid.steps * max(self.grid.values) / value))
        else:
            lr, steps = self.lr, self.grid.steps
        return lr, steps, max(1, -(-steps // self.grid.evals))



    def run_configs(self, objective: str, combiner: str, value: float):
        """``(ObjectiveConfig, CombinerConfig, hyperparameters)`` of one run at grid value ``value``:
        ``alpha``/``gamma`` go to the combiner (a variant label: its combiner and settings),
        ``beta``/``delta`` to the objectives that take them."""
        import inspect

        from jax_unlearn.config import CombinerConfig, ObjectiveConfig

        p = {k: getattr(self, k) for k in ("alpha", "gamma", "beta", "delta")}
        if self.grid.param != "lr":
            p[self.grid.param] = value
        takes = inspect.signature(OBJECTIVES.get(objective)).parameters
        obj = ObjectiveConfig(name=objective, **{k: p[k] for k in ("beta", "delta") if k in takes})
        comb = CombinerConfig(**self.variant(combiner)[0], alpha=p["alpha"], gamma=p["gamma"])
        return obj, comb, p
