"""Typed run configs for ``jax-unlearn unlearn``: YAML files plus ``key=value`` overrides.

A run config is a `jax_unlearn.config.TrainConfig` (the training sections ``optim``,
``combiner``, ``objective``, ``mesh`` and the loop's top-level keys) plus three more sections:

- ``model``: the Hugging Face folder to start from and how to run it (`ModelSection`);
- ``data``: the forget and retain files and how to tokenise them (`DataSection`);
- ``eval``: optional evaluation files, run on the exported model (`EvalSection`).

>>> cfg = load_config(None, ["output_dir=runs/x", "model.path=/ckpt/zephyr", "data.forget=bio.jsonl",
...                         "data.retain=wiki.jsonl", "optim.lr=5e-6", "combiner.name=pcgrad"])
>>> cfg.optim.lr, cfg.combiner.name, cfg.train_config().batch_size
(5e-06, 'pcgrad', 8)

The YAML is merged into an omegaconf structured config of these dataclasses, then each
override in order. An unknown key, a section given a value (or the reverse), a value of the
wrong type, a value outside a ``Literal`` or a missing required value (``???`` in a file)
raises `ConfigError` naming the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, OmegaConf
from omegaconf import errors as oc_errors

from jax_unlearn.config import ConfigError, TrainConfig

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
__all__ = ["ConfigError", "DataSection", "EvalSection", "ModelSection", "RunConfig", "check_model_fit",
           "load_config", "to_yaml"]


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The starting model: a local Hugging Face folder and `load_hf` options."""

    path: str = MISSING
    tokenizer: str | None = None  # a Hugging Face tokenizer folder; default: ``path``
    dtype: Dtype = "float32"
    compute_dtype: Dtype | None = None
    attention_impl: Literal["xla", "cudnn"] | None = None
    scan_layers: bool = False
    remat_policy: str | None = None

    def options(self) -> dict[str, Any]:
        """The ``**model_options`` of `jax_unlearn.models.load_hf`."""
        return dict(compute_dtype=self.compute_dtype, attention_impl=self.attention_impl,
                    scan_layers=self.scan_layers, remat_policy=self.remat_policy)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Forget and retain files (``.jsonl``/``.json`` text or QA records, ``.txt``), see `data.load_set`;
    ``chunk_bos``: packed chunks get the reference's masked BOS (`data.TokenizeOptions`)."""

    forget: str = MISSING
    retain: str = MISSING
    max_length: int = 512
    mode: Literal["auto", "pack", "truncate"] = "auto"
    forget_format: Literal["auto", "text", "qa"] = "auto"
    retain_format: Literal["auto", "text", "qa"] = "auto"
    chunk_bos: bool = False


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Evaluation of the exported model after the run and, with ``every``, during it (every
    ``every`` steps and at step 0: rows ``eval/<metric>`` in ``metrics.jsonl``, which
    ``select.metric`` and ``stop_when.metric`` name; see `jax_unlearn.eval.suite`). All optional."""

    mc: list[str] = dataclasses.field(default_factory=list)  # multiple-choice files
    qa: list[str] = dataclasses.field(default_factory=list)  # QA probe files (ROUGE-L recall)
    mia_forget: str | None = None  # texts the model was asked to forget ...
    mia_holdout: str | None = None  # ... and texts it never saw: MIA AUROC between them
    perplexity: list[str] = dataclasses.field(default_factory=list)  # text files (perplexity)
    every: int | None = None  # evaluate during the run every this many steps
    num_fewshot: int = 0
    subject: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 32

    def enabled(self) -> bool:
        return bool(self.mc or self.qa or self.mia_forget or self.mia_holdout or self.perplexity)

    def metric_names(self) -> tuple[str, ...]:
        """The metric names an evaluation of these files gives (`jax_unlearn.eval.suite`)."""
        from jax_unlearn.eval.suite import metric_names

        return metric_names(self.mc, self.qa, self.mia_forget is not None, self.perplexity)

    def suite(self) -> Any:
        """The `jax_unlearn.eval.suite.EvalSuite` of this section (reads and checks the files)."""
        from jax_unlearn.eval.suite import EvalSuite

        return EvalSuite(tuple(self.mc), tuple(self.qa), self.mia_forget, self.mia_holdout, tuple(self.perplexity),
                         self.num_fewshot, self.subject, self.batch_size, self.max_new_tokens)


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainConfig):
    """One ``jax-unlearn unlearn`` run: the `TrainConfig` keys plus ``model``, ``data`` and ``eval``."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` that `train.unlearn` takes."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


# ----------------------------------------------------------------------------- schema helpers


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _strip_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return functools.reduce(operator.or_, rest), True
    return tp, False


def describe(tp) -> str:
    """What a field accepts, in words: ``one of 'a', 'b'``, ``an integer or null``, ..."""
    inner, optional = _strip_optional(tp)
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(v) for v in typing.get_args(inner))
    elif _is_section(inner):
        text = "a section with keys " + ", ".join(f.name for f in dataclasses.fields(inner))
    elif typing.get_origin(inner) in (list, Sequence):
        text = "a list of " + describe(typing.get_args(inner)[0]).removeprefix("a ").removeprefix("an ") + "s"
    else:
        text = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(
            inner, str(inner))
    return text + (" or null" if optional else "")


def _field_type(path: str, schema: type):
    """Type of the field at dotted ``path`` in ``schema`` (None when unknown)."""
    tp: Any = schema
    for part in path.split("."):
        tp, _ = _strip_optional(tp)
        if not _is_section(tp):
            return None
        hints = _hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _check_keys(tree: Any, cls, prefix: str, source: str) -> None:
    """Unknown keys and section/value mix-ups, with the allowed keys in the message."""
    hints = _hints(cls)
    where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{name}'; allowed keys at {where}: {', '.join(hints)}")
        tp, _ = _strip_optional(hints[key])
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' is a section, got {value!r}; set its keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(tp))}) as '{name}.KEY=VALUE'")
            _check_keys(value, tp, name + ".", source)
        elif isinstance(value, dict):
            raise ConfigError(f"{source}: '{name}' takes a value ({describe(hints[key])}), not a section")


def _check_literals(obj: Any, prefix: str = "") -> None:
    """omegaconf checks Literal fields already; this keeps the guarantee whatever its version does."""
    for f in dataclasses.fields(obj):
        tp = _hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        inner, optional = _strip_optional(tp)
        if dataclasses.is_dataclass(value):
            _check_literals(value, f"{prefix}{f.name}.")
        elif typing.get_origin(inner) is Literal and not (optional and value is None):
            if value not in typing.get_args(inner):
                raise ConfigError(f"'{prefix}{f.name}' is {value!r}; expected {describe(tp)}")


# ----------------------------------------------------------------------------- loading


def parse_override(item: str) -> dict:
    """``"optim.lr=1e-5"`` -> ``{"optim": {"lr": 1e-05}}`` (values parsed as YAML)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form KEY=VALUE (e.g. optim.lr=1e-5)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except Exception as err:  # noqa: BLE001 - YAML scanner/parser and omegaconf grammar errors
        problem = " ".join(str(err).split("\n")[0].split()) or type(err).__name__
        raise ConfigError(f"override {item!r}: the value {value!r} of '{key}' is not valid YAML ({problem}); "
                          "quote it for a plain string, e.g. 'optim.lr=[1, 2]' needs its closing bracket") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else f"config {path} is not a file")
    try:
        conf = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - YAML syntax errors come in several types
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if conf is None or not OmegaConf.is_dict(conf):
        raise ConfigError(f"config file {path} must hold a mapping of keys (got {type(conf).__name__})")
    return OmegaConf.to_container(conf)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), schema: type = None) -> Any:
    """Reads ``path`` (YAML; ``None`` starts from the defaults), applies ``overrides`` in order,
    validates and returns a frozen ``schema`` (default `RunConfig`; another frozen dataclass
    may define ``check()`` raising ValueError). Raises `ConfigError` naming the offending key."""
    schema = RunConfig if schema is None else schema
    layers: list[tuple[str, dict]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    for item in overrides:
        layers.append((f"override {item!r}", parse_override(item)))
    merged = OmegaConf.structured(schema)
    for source, tree in layers:
        _check_keys(tree, schema, "", source)
        try:
            merged = OmegaConf.merge(merged, tree)
        except (oc_errors.ValidationError, oc_errors.ConfigKeyError, oc_errors.ConfigTypeError) as err:
            key = getattr(err, "full_key", None) or "?"
            tp = _field_type(key, schema)
            msg = getattr(err, "msg", str(err)).splitlines()[0]
            expected = f"; expected {describe(tp)}" if tp is not None and "expected" not in msg else ""
            raise ConfigError(f"{source}: '{key}': {msg}{expected}") from None
    try:
        missing = sorted(k for k in _missing_keys(merged))
        if missing:
            raise ConfigError(f"{path or 'config'}: required value(s) not set: {', '.join(missing)}; "
                              f"pass them as overrides, e.g. {missing[0]}=...")
        cfg = OmegaConf.to_object(merged)
    except oc_errors.InterpolationResolutionError as err:  # ${...} that names no key or an unset variable
        key = getattr(err, "full_key", None) or "?"
        msg = getattr(err, "msg", str(err)).splitlines()[0]
        raise ConfigError(f"{path or 'config'}: '{key}': cannot resolve its interpolation ({msg}); "
                          "${KEY} must name another key of the config, ${oc.env:NAME} a set environment "
                          "variable") from None
    except oc_errors.OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{path or 'config'}: '{key}': {getattr(err, 'msg', str(err)).splitlines()[0]}") from None
    except ValueError as err:  # a section's own __post_init__ check
        raise ConfigError(f"{path or 'config'}: {err}") from None
    _check_literals(cfg)
    if isinstance(cfg, RunConfig):
        _check_semantics(cfg)
    cfg = _freeze(cfg)
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except ValueError as err:
            raise ConfigError(f"{path or 'config'}: {err}") from None
    return cfg


def _missing_keys(conf, prefix: str = "") -> list[str]:
    out = []
    for key in conf:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(conf, key):
            out.append(name)
        elif OmegaConf.is_dict(conf[key]):
            out.extend(_missing_keys(conf[key], name + "."))
    return out


def _freeze(obj: Any) -> Any:
    """Lists -> tuples, so the frozen config is hashable and cannot be changed in place."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _freeze(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _check_semantics(cfg: RunConfig) -> None:
    """Checks the library would otherwise make only at run time."""
    from jax_unlearn import config
    from jax_unlearn.models import ModelOptions

    try:
        ModelOptions(**cfg.model.options())
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    config.check(cfg)  # ConfigError naming the key: numeric ranges, factory arguments, step settings
    for key, value, least in (("data.max_length", cfg.data.max_length, 2), ("eval.batch_size", cfg.eval.batch_size, 1),
                              ("eval.num_fewshot", cfg.eval.num_fewshot, 0),
                              ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1)):
        if value < least:
            raise ConfigError(f"'{key}' is {value!r}; expected an integer >= {least}")
    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
        value = getattr(cfg.mesh, key.split(".")[1])
        if value == 0 or value < -1:
            raise ConfigError(f"'{key}' is {value!r}; expected an integer > 0, or -1 for all remaining devices")
    if (cfg.eval.mia_forget is None) != (cfg.eval.mia_holdout is None):
        raise ConfigError("'eval.mia_forget' and 'eval.mia_holdout' go together: set both or neither")
    if cfg.eval.every is not None and cfg.eval.every < 1:
        raise ConfigError(f"'eval.every' is {cfg.eval.every!r}; expected an integer >= 1 or null")
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
    from jax_unlearn.objectives import OBJECTIVES

    if "layer" in inspect.signature(OBJECTIVES.get(cfg.objective.name)).parameters:  # RMU's hidden layer
        if cfg.objective.layer >= model_config.num_hidden_layers:
            raise ConfigError(f"'objective.layer' is {cfg.objective.layer}, but the model has "
                              f"num_hidden_layers={model_config.num_hidden_layers} ({where}); "
                              f"expected 0 <= objective.layer < {model_config.num_hidden_layers}")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written beside a run; `load_config` reads it back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
