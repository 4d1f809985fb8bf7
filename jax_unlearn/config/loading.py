"""YAML files plus ``key=value`` overrides -> a frozen, validated config (omegaconf).

>>> cfg = load_config(None, ["output_dir=runs/x", "model.path=/ckpt/zephyr", "data.forget=bio.jsonl",
...                         "data.retain=wiki.jsonl", "optim.lr=5e-6", "combiner.name=pcgrad"])
>>> cfg.optim.lr, cfg.combiner.name, cfg.train_config().batch_size
(5e-06, 'pcgrad', 8)

The YAML is merged into an omegaconf structured config of a schema's dataclasses (default
`RunConfig`; the benchmark passes its own), then each override in order. An unknown key, a
section given a value (or the reverse), a value of the wrong type, a value outside a
``Literal`` or a missing required value (``???`` in a file) raises `ConfigError` naming the key
and what it allows; a `RunConfig` then goes through `check_run_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from .checks import check_run_config
from .schema import ConfigError, RunConfig


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
        elif isinstance(value, dict) and typing.get_origin(tp) is not dict:  # a mapping field takes one
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


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), schema: type = None,
                tree: dict | None = None) -> Any:
    """Reads ``path`` (YAML; ``None`` starts from the defaults), applies ``overrides`` in order,
    validates and returns a frozen ``schema`` (default `RunConfig`; another frozen dataclass
    may define ``check()`` raising ValueError). Raises `ConfigError` naming the offending key.
    ``tree``: a mapping already read (e.g. the config a results file recorded), used in place of
    the YAML; ``path`` then only names it in errors."""
    schema = RunConfig if schema is None else schema
    layers: list[tuple[str, dict]] = []
    if tree is not None:
        layers.append((str(path or "config"), tree))
    elif path is not None:
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
        check_run_config(cfg)
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


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written beside a run; `load_config` reads it back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
