"""Checks of a config that build nothing: value ranges, keys a factory does not take, the
run file's cross-section rules (`check_run_config`) and its fit to a model (`check_model_fit`).
Each raises `ConfigError` naming the key and what it allows. Checks that need the data or the
devices (batch size against the data set, the mesh) are `jax_unlearn.train.check_run`'s."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

from jax_unlearn.combiners import COMBINERS
from jax_unlearn.objectives import OBJECTIVES

from .factories import objective_settings, section_settings, step_config
from .schema import ConfigError, RunConfig, TrainConfig


def check(cfg: TrainConfig) -> None:
    """Raises `ConfigError` (a ValueError) naming the key when a numeric key is out of its range
    (`check_ranges`), the combiner or objective section sets a key its factory does not take,
    or the step settings are invalid (checks that build nothing)."""
    check_ranges(cfg)
    st = cfg.stop_when
    if st.metric is not None and (st.below is None) == (st.above is None):
        raise ConfigError(f"'stop_when' with metric {st.metric!r} needs one of 'stop_when.below' or "
                          "'stop_when.above'")
    if st.metric is None and (st.below is not None or st.above is not None):
        raise ConfigError("'stop_when.below' / 'stop_when.above' need 'stop_when.metric' (an evaluation metric)")
    try:
        COMBINERS.arguments(cfg.combiner.name, *section_settings(cfg.combiner), "combiner")
        OBJECTIVES.arguments(cfg.objective.name, *objective_settings(cfg.objective), "objective")
        step_config(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (key, test, what the key allows) for every numeric key of a TrainConfig
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("batch_size", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("micro_batches", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("epochs", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("max_steps", lambda v: v is None or _integer(v) and v > 0, "an integer > 0 or null"),
    ("seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("save_every", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("keep", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("log_every", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("optim.lr", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("optim.warmup_ratio", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.warmup_steps", lambda v: v is None or _integer(v) and v >= 0, "an integer >= 0 or null"),
    ("optim.weight_decay", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("optim.clip_norm", lambda v: v is None or _number(v) and v > 0, "a finite number > 0 or null (no clipping)"),
    ("optim.b1", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.b2", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("optim.skip_nonfinite", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: stop at a non-finite step)"),
    ("combiner.alpha", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.gamma", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.alpha_end", lambda v: v is None or _number(v) and v >= 0, "a finite number >= 0 or null (unchanged)"),
    ("combiner.gamma_end", lambda v: v is None or _number(v) and v >= 0, "a finite number >= 0 or null (unchanged)"),
    ("combiner.adapt_power", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.adapt_ema", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("combiner.adapt_floor", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("forget_every", lambda v: _integer(v) and v > 0, "an integer > 0 (1: a forget gradient at every step)"),
    ("combiner.c", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.norm_eps", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.reg_eps", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.max_norm", lambda v: _number(v) and v >= 0, "a finite number >= 0 (0: no cap)"),
    ("combiner.update_weights_every", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("combiner.beta", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("combiner.eps", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.rank_rtol", lambda v: v is None or _number(v) and v >= 0, "a finite number >= 0 or null"),
    ("combiner.moving_avg", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("combiner.cos_clip", lambda v: v is None or _number(v) and -1 <= v <= 0, "a number in [-1, 0] or null"),
    ("objective.beta", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("objective.delta", _number, "a finite number"),
    ("objective.beta1", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("objective.beta2", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("objective.ignore_first", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("objective.layer", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("objective.steering", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("objective.seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("objective.logit_chunk", lambda v: v is None or _integer(v) and v > 0, "an integer > 0 or null"),
    ("lora.rank", lambda v: v is None or _integer(v) and v > 0, "an integer > 0 or null (no adapters)"),
    ("lora.alpha", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("lora.dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("lora.seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
)


def _get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: TrainConfig) -> None:
    """Raises `ConfigError` naming the first numeric key outside its range (learning rate > 0,
    ``0 <= warmup_ratio < 1``, positive sizes, ...; see ``_RANGES``). Ranges that depend on
    the model or the data (sequence length, batch size against the data set, RMU's layer,
    warmup steps against the run's length) are checked where those are known."""
    for key, ok, expected in _RANGES:
        value = _get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"'{key}' is {value!r}; expected {expected}")
    from jax_unlearn.models.lora import TARGETS

    targets = list(cfg.lora.targets)
    if not targets or targets != ["all-linear"] and any(t not in TARGETS for t in targets):
        raise ConfigError(f"'lora.targets' is {targets!r}; expected a list of projection names from "
                          f"{', '.join(TARGETS)}, or ['all-linear']")
    if cfg.combiner.alpha == 0 and cfg.combiner.gamma == 0:
        raise ConfigError("'combiner.alpha' and 'combiner.gamma' are both 0: every update would be zero")
    if cfg.batch_size % cfg.micro_batches:
        raise ConfigError(f"'batch_size'={cfg.batch_size} is not divisible by 'micro_batches'={cfg.micro_batches}")
    c = cfg.combiner
    if c.weight_schedule != "constant" and c.adapt != "none":
        raise ConfigError("'combiner.weight_schedule' and 'combiner.adapt' both change the combiner's weights; "
                          "set one of them")
    if c.adapt != "none" and not c.diagnostics:
        raise ConfigError("'combiner.adapt: conflict' reads the combiner's conflict fraction: "
                          "'combiner.diagnostics' must be true")
    if cfg.forget_every > 1 and cfg.mode == "naive":
        raise ConfigError(f"'forget_every'={cfg.forget_every} reuses the forget gradient of the two-gradient step; "
                          "'mode: naive' takes one gradient of the summed loss (use mode: combined)")


def _check_attacks(ev) -> None:
    """The eval section's robustness keys (`jax_unlearn.eval.robustness`)."""
    from jax_unlearn.eval.robustness import parse_scheme

    for key in ("relearn_steps", "relearn_batch_size", "relearn_max_length"):
        if getattr(ev, key) < 1:
            raise ConfigError(f"'eval.{key}' is {getattr(ev, key)!r}; expected an integer >= 1")
    if not ev.relearn_lr > 0:
        raise ConfigError(f"'eval.relearn_lr' is {ev.relearn_lr!r}; expected a number > 0")
    for scheme in ev.quantize:
        try:
            parse_scheme(scheme)
        except ValueError as err:
            raise ConfigError(f"'eval.quantize': {err}") from None
    attacks = ev.relearn or ev.relearn_benign or ev.quantize or ev.paraphrase_mc or ev.paraphrase_qa
    if attacks and not (ev.mc or ev.qa or ev.mia_forget or ev.perplexity or ev.paraphrase_mc or ev.paraphrase_qa):
        raise ConfigError("the robustness attacks ('eval.relearn', 'eval.quantize', ...) re-run the eval section's "
                          "metrics: name 'eval.mc', 'eval.qa', 'eval.perplexity' or 'eval.mia_forget' files too")


def check_run_config(cfg: RunConfig) -> None:
    """The checks of a run file (`check` and the ``model``, ``data``, ``eval`` sections' rules)
    that `load_config` makes once the file is read, so that nothing fails only at run time."""
    from jax_unlearn.models import ModelOptions

    try:
        ModelOptions(**cfg.model.options())
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    check(cfg)  # ConfigError naming the key: numeric ranges, factory arguments, step settings
    for key, value, least in (("data.max_length", cfg.data.max_length, 2), ("eval.batch_size", cfg.eval.batch_size, 1),
                              ("eval.num_fewshot", cfg.eval.num_fewshot, 0),
                              ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1)):
        if value < least:
            raise ConfigError(f"'{key}' is {value!r}; expected an integer >= {least}")
    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
        value = getattr(cfg.mesh, key.split(".")[1])
        if value == 0 or value < -1:
            raise ConfigError(f"'{key}' is {value!r}; expected an integer > 0, or -1 for all remaining devices")
    if cfg.data.template is not None:
        data_template(cfg)
    if (cfg.eval.mia_forget is None) != (cfg.eval.mia_holdout is None):
        raise ConfigError("'eval.mia_forget' and 'eval.mia_holdout' go together: set both or neither")
    if cfg.eval.every is not None and cfg.eval.every < 1:
        raise ConfigError(f"'eval.every' is {cfg.eval.every!r}; expected an integer >= 1 or null")
    if cfg.eval.every is not None and not cfg.eval.enabled():
        raise ConfigError("'eval.every' is set but the eval section names no file to evaluate")
    _check_attacks(cfg.eval)
    if cfg.eval.num_fewshot and not cfg.eval.mc:
        raise ConfigError(f"'eval.num_fewshot' is {cfg.eval.num_fewshot}, but 'eval.mc' names no multiple-choice file "
                          "to put the examples before")
    if cfg.eval.num_fewshot and cfg.eval.fewshot is None:
        raise ConfigError(f"'eval.num_fewshot' is {cfg.eval.num_fewshot} but 'eval.fewshot' is not set: name a "
                          "multiple-choice file of solved examples (e.g. the dev split)")
    for key, metric in (("select.metric", cfg.select.metric), ("stop_when.metric", cfg.stop_when.metric)):
        if metric is None:
            continue
        if cfg.eval.every is None:
            raise ConfigError(f"'{key}' ({metric!r}) needs evaluations during the run: set 'eval.every'")
        names = cfg.eval.metric_names()
        if metric not in names:
            raise ConfigError(f"'{key}' is {metric!r}, which the eval section does not produce; it gives "
                              f"{', '.join(names) or 'nothing (add eval.mc, eval.qa, eval.mia_* or eval.perplexity)'}")


def check_model_fit(cfg: RunConfig, model_config: Any) -> None:
    """Raises `ConfigError` naming the key when the run does not fit the model's
    ``config.json`` (a `jax_unlearn.models.ModelConfig`): rows longer than its positions,
    an RMU layer it does not have."""
    where = f"{cfg.model.path}/config.json"
    if cfg.data.max_length > model_config.max_position_embeddings:
        raise ConfigError(f"'data.max_length' is {cfg.data.max_length}, more than the model's "
                          f"max_position_embeddings={model_config.max_position_embeddings} ({where}); "
                          f"use data.max_length <= {model_config.max_position_embeddings}")

    if "layer" in inspect.signature(OBJECTIVES.get(cfg.objective.name)).parameters:  # RMU's hidden layer
        if cfg.objective.layer >= model_config.num_hidden_layers:
            raise ConfigError(f"'objective.layer' is {cfg.objective.layer}, but the model has "
                              f"num_hidden_layers={model_config.num_hidden_layers} ({where}); "
                              f"expected 0 <= objective.layer < {model_config.num_hidden_layers}")


def data_template(cfg: RunConfig):
    """``data.template`` as an open-unlearning `PromptTemplate` (None when unset); `ConfigError`
    naming the key for an unknown field or a value of the wrong type."""
    if cfg.data.template is None:
        return None
    from jax_unlearn.eval.ou_scoring import PromptTemplate

    fields = {f.name: f.type for f in dataclasses.fields(PromptTemplate)}
    for key, value in cfg.data.template.items():
        if key not in fields:
            raise ConfigError(f"'data.template.{key}' is not a template field; expected some of {sorted(fields)}")
        want = bool if key == "apply_chat_template" else str
        if not (isinstance(value, want) or (value is None and "None" in str(fields[key]))):
            raise ConfigError(f"'data.template.{key}' is {value!r}; expected a {want.__name__}")
    return PromptTemplate.from_dict(dict(cfg.data.template))
