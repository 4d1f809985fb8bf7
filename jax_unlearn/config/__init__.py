"""One home for configuration: the run schema, its YAML loading and overrides, its checks, and
the factories that turn it into objects.

- `schema`: typed frozen dataclasses. `TrainConfig` (what the training loop needs: the loop's
  keys and the sections ``mesh``, ``optim``, ``combiner``, ``objective``, ``select``,
  ``stop_when``, ``lora``) and `RunConfig`, the schema of a ``jax-unlearn unlearn`` file: a
  `TrainConfig` plus ``model``, ``data`` and ``eval``.
- `loading`: `load_config` (YAML + ``key=value`` overrides, any schema), `parse_override`, `to_yaml`.
- `checks`: `check` / `check_ranges` (a `TrainConfig`), `check_run_config` (a run file's
  cross-section rules), `check_model_fit` (the run against a model's ``config.json``).
- `factories`: `build_objective`, `build_combiner`, `build_schedule`, `build_optimizer`,
  `build_tx`, `step_config`, `set_hyperparams`, `moments_in`.

The model's own architecture (a Hugging Face ``config.json``) is `jax_unlearn.models.ModelConfig`
and the embedded benchmark's schema `jax_unlearn.bench.config.BenchConfig` (read by `load_config`
too); neither is a run's configuration.

>>> from jax_unlearn import config
>>> cfg = config.TrainConfig(output_dir="runs/x", combiner=config.CombinerConfig(name="pcgrad", scope="global"))
>>> tx = config.build_tx(cfg, total_steps=100)
>>> config.CombinerConfig(name="adam")
Traceback (most recent call last):
...
ValueError: combiner.name='adam' is not supported; expected one of weighted_sum, pcgrad, sago, ...
"""

from .checks import check, check_model_fit, check_ranges, check_run_config, data_template
from .factories import (
    build_combiner,
    build_objective,
    build_optimizer,
    build_schedule,
    build_tx,
    moments_in,
    set_hyperparams,
    step_config,
)
from .loading import describe, load_config, parse_override, to_yaml
from .schema import (
    DTYPES,
    CombinerConfig,
    ConfigError,
    DataSection,
    EvalSection,
    LoraConfig,
    ModelSection,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    SelectConfig,
    StopConfig,
    TrainConfig,
)

__all__ = [
    "DTYPES", "CombinerConfig", "ConfigError", "DataSection", "EvalSection", "LoraConfig", "ModelSection",
    "ObjectiveConfig", "OptimConfig", "RunConfig", "SelectConfig", "StopConfig", "TrainConfig", "build_combiner",
    "build_objective", "build_optimizer", "build_schedule", "build_tx", "check", "check_model_fit", "check_ranges",
    "check_run_config", "data_template", "describe", "load_config", "moments_in", "parse_override", "set_hyperparams", "step_config",
    "to_yaml",
]
