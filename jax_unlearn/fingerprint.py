"""What defines an unlearning run: its fingerprint, a flat mapping of named values.

A run directory records the fingerprint of the run that writes it (``fingerprint.json``,
written by `jax_unlearn.train.unlearn`); a rerun into the same directory resumes only when the
two agree, and otherwise the differing keys are named. The fingerprint holds:

- ``model.config.*``: every field of the starting model's ``config.json`` (`ModelConfig`), and
  ``model.dtype``, ``model.compute_dtype``, ``model.scan_layers`` (the dtype and layout of the
  parameters a checkpoint holds, and the dtype the maths runs in);
- ``model.weights``: a checksum of every parameter of the starting model as loaded
  (`params_checksum`: each array's bits read as unsigned integers, summed plainly and weighted
  by position, modulo 2**32). It is computed where the parameters live, in one pass and
  without gathering them, so it costs about one read of the weights on the accelerator and a
  few bytes to the host; it is exact (any changed bit of a tensor changes its plain sum) and
  does not depend on the sharding;
- ``data.forget.tokens`` / ``data.retain.tokens``: SHA-256 of the token arrays the run trains on
  (ids, mask, labels): a changed file, tokenizer, row length or format shows here;
- the keys that change the updates: ``objective.*`` (but ``logit_chunk``), ``combiner.*`` (but
  ``diagnostics``), ``optim.*``, ``seed``, ``batch_size``, ``micro_batches``,
  ``micro_batch_weighting``, ``mode`` and ``lora.*`` (the adapters' rank, alpha, targets,
  dropout and seed);
- what the caller adds (``jax-unlearn unlearn`` adds each data file's SHA-256 and the ``data``
  section's keys, so a changed key is named as the user wrote it).

Not in it: where things are (``output_dir``, file and folder paths: a run, its model and its
data may move), how long the run is (``max_steps``/``epochs``: a finished run may be
continued, see `jax_unlearn.train`), how often it saves or logs, which evaluated state it
exports and when it stops early (``select``, ``stop_when``), the mesh, the attention kernel and
the remat policy (they do not change the maths).

>>> import numpy as np
>>> from jax_unlearn import config
>>> from jax_unlearn.models import ModelConfig
>>> mc = ModelConfig(model_type="llama", vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
...                  num_attention_heads=1, num_key_value_heads=1)
>>> rows = {"input_ids": np.zeros((2, 3), np.int32)}
>>> a = run_fingerprint(config.TrainConfig(output_dir="a"), mc, None, rows, rows)
>>> b = run_fingerprint(config.TrainConfig(output_dir="b", seed=1, max_steps=9), mc, None, rows, rows)
>>> differences(a, b)
['seed: 0 -> 1']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_unlearn.config import TrainConfig

# TrainConfig keys that do not define the run (dotted; a section name excludes the section)
NOT_DEFINING = frozenset({"output_dir", "epochs", "max_steps", "save_every", "keep", "log_every", "export",
                          "progress", "mesh", "objective.logit_chunk", "combiner.diagnostics", "select",
                          "stop_when"})


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = list(value) if isinstance(value, tuple) else value
    return out


def training_keys(cfg: TrainConfig) -> dict[str, Any]:
    """The keys of ``cfg`` that change the updates (all but `NOT_DEFINING`), flat and dotted."""
    flat = _flatten(cfg, "", {})
    return {k: v for k, v in flat.items() if k not in NOT_DEFINING and k.split(".")[0] not in NOT_DEFINING}


def model_keys(model_config: Any, options: Any = None) -> dict[str, Any]:
    """``model.config.*`` (a `ModelConfig`) and the dtypes and layout of `ModelOptions` ``options``."""
    out = _flatten(model_config, "model.config.", {})
    dtype = None if options is None else options.param_dtype
    compute = None if options is None else options.compute_dtype
    out["model.dtype"] = jnp.dtype(dtype if dtype is not None else jnp.float32).name
    out["model.compute_dtype"] = None if compute is None else jnp.dtype(compute).name
    out["model.scan_layers"] = bool(getattr(options, "scan_layers", False))
    return out


def array_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of a `jax_unlearn.data.Dataset` (every array's name, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for key in sorted(data):
        a = np.ascontiguousarray(np.asarray(data[key]))
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 (narrower dtypes widened; 8-byte ones give a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize)
    if narrow is not None:
        return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _bit_sums(leaves: list[jax.Array]) -> jax.Array:
    """``[n_leaves, 2]`` uint32: per leaf ``sum(u)`` and ``sum(u * (2*i + 1))`` over its bits ``u``
    at flat position ``i`` (integer sums wrap modulo 2**32, so the order of summation, hence the
    sharding, does not matter)."""
    out = []
    for x in leaves:
        u = _as_uint32(x)
        index = jnp.zeros(u.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(u.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
            stride *= u.shape[axis]
        out.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def params_checksum(model: nnx.Module) -> str:
    """A checksum of every parameter of ``model`` (names, shapes, dtypes and `_bit_sums`), as
    ``"bits:<sha256>"``; computed on the devices holding the parameters."""
    flat = [(".".join(map(str, path)), var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    leaves = [x for _, x in flat]
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    out = None
    if isinstance(sharding, jax.sharding.NamedSharding):  # a replicated result every process can read
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    sums = np.asarray(jax.device_get(jax.jit(_bit_sums, out_shardings=out)(leaves)))
    h = hashlib.sha256()
    for (name, x), (plain, weighted) in zip(flat, sums):
        h.update(f"{name}:{jnp.dtype(x.dtype).name}:{tuple(x.shape)}:{int(plain)}:{int(weighted)};".encode())
    return "bits:" + h.hexdigest()


def _jsonable(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping as it reads back from JSON (tuples -> lists), so a fresh and a recorded
    fingerprint compare equal."""
    return json.loads(json.dumps(dict(mapping), default=str))


def run_fingerprint(cfg: TrainConfig, model_config: Any, model_options: Any, forget: Mapping[str, Any],
                    retain: Mapping[str, Any], *, weights: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of a run (see the module docstring), JSON-ready.

    Args:
      cfg: the run's `TrainConfig`.
      model_config, model_options: the starting model's `ModelConfig` and `ModelOptions` (or None).
      forget, retain: the token arrays the run trains on.
      weights: `params_checksum` of the starting model; None leaves ``model.weights`` out (a
        check before the model is loaded).
      extra: more keys (e.g. ``data.forget.file``), added as they are.
    """
    fp = model_keys(model_config, model_options)
    if weights is not None:
        fp["model.weights"] = weights
    fp["data.forget.tokens"] = array_digest(forget)
    fp["data.retain.tokens"] = array_digest(retain)
    fp.update(training_keys(cfg))
    fp.update(extra or {})
    return _jsonable(fp)


def implied() -> dict[str, Any]:
    """The value of each key that has a default, as a run recorded before the key existed ran
    with it: the `TrainConfig` keys (``lora.*``, ``objective.compat``, ``micro_batch_weighting``,
    ...), the ``data`` section's settings, ``model.config.*`` fields with a default and the model
    options. Keys without a default (``model.weights``, the token and file digests) have none."""
    from jax_unlearn.config import DataSection
    from jax_unlearn.models import ModelConfig

    out = training_keys(TrainConfig(output_dir=""))
    out |= {f"data.{f.name}": f.default for f in dataclasses.fields(DataSection)
            if f.name not in ("forget", "retain") and f.default is not dataclasses.MISSING}
    out |= {f"model.config.{f.name}": f.default for f in dataclasses.fields(ModelConfig)
            if f.default is not dataclasses.MISSING}
    out |= {"model.compute_dtype": None, "model.scan_layers": False}
    return _jsonable(out)


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], *, partial: bool = False) -> list[str]:
    """``"key: recorded -> current"`` for every key whose values differ, sorted.

    A key only ``current`` holds (the record was written by an older version) is compared with
    the value that version ran with (`implied`), when the key has a default; a key only the
    record holds is a difference (``-> (not in this run)``), unless ``partial`` says ``current``
    is a subset on purpose (a check before the model is loaded has no ``model.weights``).
    """
    current = _jsonable(current)
    defaults = implied()
    out = []
    for k in sorted(set(recorded) | set(current)):
        if k in recorded and k in current:
            if recorded[k] != current[k]:
                out.append(f"{k}: {recorded[k]!r} -> {current[k]!r}")
        elif k in current:
            if k in defaults and defaults[k] != current[k]:
                out.append(f"{k}: not recorded (the recording version ran with {defaults[k]!r}) -> {current[k]!r}")
        elif not partial:
            out.append(f"{k}: {recorded[k]!r} -> (not in this run)")
    return out
