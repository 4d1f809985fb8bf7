"""LoRA adapters on `CausalLM` projections: add, merge, strip, and PEFT-format export/import.

A targeted projection with weight ``W [out, in]`` (Hugging Face layout, flattened over heads)
computes, as peft's LoRA does (no rsLoRA, no DoRA),

    ``y = x W^T + scaling * (dropout(x) @ A) @ B``,   ``A [in, r]``, ``B [r, out]``,
    ``scaling = alpha / r``,

in the model's compute dtype. ``A`` starts kaiming-uniform like peft's (``U(-1/sqrt(in),
1/sqrt(in))``) and ``B`` at zero, so a fresh adapter leaves the model's function unchanged.
Targets are the Hugging Face module names ``q_proj k_proj v_proj o_proj gate_proj up_proj
down_proj`` (peft's default for LLaMA/Mistral: ``q_proj v_proj``); every layer gets one.

``A`` and ``B`` are `nnx.LoRAParam` variables (a subclass of `nnx.Param`) of an `nnx.LoRA`
stored as ``<name>_lora`` beside the projection, e.g. ``layers[3].self_attn.q_proj_lora.lora_a``
(with ``scan_layers`` one stacked module, ``[layers, in, r]``). So

* ``nnx.state(model, nnx.LoRAParam)`` is exactly the adapters, and ``graphdef, lora, rest =
  nnx.split(model, nnx.LoRAParam, ...)`` lets a step differentiate (and an optimizer hold
  state for) the adapters alone while the base weights stay frozen;
* `without_lora` gives the adapter-free base model sharing the same weight arrays (no second
  copy; equivalently, call the model with every ``lora_b`` zeroed) - the NPO/KL reference;
* `merge_lora` folds ``scaling * (A B)^T`` into the weights: a plain `CausalLM` (what
  `save_hf` writes); `save_peft` / `load_peft` (``load_hf(..., peft=path)``) write and read
  peft's ``adapter_config.json`` + ``adapter_model.safetensors``.

Every adapter parameter carries logical axes (``out_sharding`` metadata): the rank axis is
``lora_rank`` (replicated by `partitioning.DEFAULT_RULES`), the other axis takes the name of the
base weight's matching axis (``embed``, ``mlp``, or ``heads``/``kv_heads`` for the flattened
``heads * head_dim`` axis, split like the base whenever the head count divides the mesh axis).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import safetensors_io as st_io
from .config import ModelConfig
from .llama import CausalLM
from .partitioning import ShardingSpec, host_value, logical_axes, sharding_fn
from .safetensors_io import CheckpointError

#: target name -> (parent module in a decoder layer, logical axis of ``in``, of ``out``)
TARGETS: dict[str, tuple[str, str, str]] = {
    "q_proj": ("self_attn", "embed", "heads"),
    "k_proj": ("self_attn", "embed", "kv_heads"),
    "v_proj": ("self_attn", "embed", "kv_heads"),
    "o_proj": ("self_attn", "heads", "embed"),
    "gate_proj": ("mlp", "embed", "mlp"),
    "up_proj": ("mlp", "embed", "mlp"),
    "down_proj": ("mlp", "mlp", "embed"),
}
DEFAULT_TARGETS = ("q_proj", "v_proj")
RANK_AXIS = "lora_rank"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# safetensors metadata key of the base model's architecture, written by `save_peft`
BASE_CONFIG_KEY = "jax_unlearn.base_config"
# adapter_config.json options this implementation does not reproduce (must be unset/false/empty)
_UNSUPPORTED = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "modules_to_save", "layer_replication", "fan_in_fan_out", "lora_bias",
                "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens")
# fields of ModelConfig that change what a base model computes (token ids / context length do not)
_ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window")


# ----------------------------------------------------------------------------- configuration
def _normalise_targets(targets: str | Sequence[str], source: str = "targets") -> tuple[str, ...]:
    """Known target names in canonical (`TARGETS`) order; ``"all-linear"`` means all of them."""
    if isinstance(targets, str):
        targets = tuple(TARGETS) if targets == "all-linear" else (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"{source} is empty; name at least one of {', '.join(TARGETS)}")
    if "lm_head" in targets:
        raise ValueError(
            f"{source}: 'lm_head' is not supported as a LoRA target (the output head is read "
            "directly by chunked losses and may be tied to the input embedding); supported "
            f"targets: {', '.join(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"{source}: unknown target module(s) {', '.join(map(repr, unknown))}; "
                         f"supported: {', '.join(TARGETS)} (or 'all-linear')")
    return tuple(t for t in TARGETS if t in targets)


@dataclasses.dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Adapters of a model: ``rank`` r, ``alpha`` (``scaling = alpha / r``), ``targets``, ``dropout``."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.number))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be a probability in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "targets", _normalise_targets(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def features(config: ModelConfig, target: str) -> tuple[int, int]:
    """``(in, out)`` sizes of projection ``target`` (heads flattened, as in the HF checkpoint)."""
    D, F = config.hidden_size, config.intermediate_size
    NH, KH = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (D, NH), "k_proj": (D, KH), "v_proj": (D, KH), "o_proj": (NH, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[target]


# ----------------------------------------------------------------------------- the adapter module
# peft initialises A with kaiming_uniform_(a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in), variance 1/(3 fan_in)
_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRAAdapter(nnx.LoRA):
    """``x [..., in] -> scaling * (dropout(x) @ lora_a) @ lora_b  [..., out]`` in ``dtype``.

    Dropout (``dropout > 0``) acts on the adapter's input only, through an `nnx.Dropout` whose
    RNG stream lives in the module; it is off (deterministic) until ``model.train()`` and off
    again after ``model.eval()``, so inference, generation and export never drop.
    """

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, axes: tuple[str, str], *,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        in_axis, out_axis = axes
        super().__init__(
            in_features, config.rank, out_features, dtype=dtype, param_dtype=param_dtype,
            a_initializer=_A_INIT, rngs=rngs,
            a_metadata={"out_sharding": (in_axis, RANK_AXIS), "eager_sharding": False},
            b_metadata={"out_sharding": (RANK_AXIS, out_axis), "eager_sharding": False})
        self.alpha = config.alpha
        self.scaling = config.scaling
        self.dropout = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs) if config.dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return super().__call__(x) * self.scaling


def _layer_entries(model: CausalLM) -> list[tuple[int | None, nnx.Module]]:
    """``[(layer index, layer)]``; with ``scan_layers`` one ``(None, stacked layer)``."""
    return [(None, model.layers)] if model.options.scan_layers else list(enumerate(model.layers))


def _adapted(model: CausalLM) -> Iterator[tuple[int | None, str, nnx.Module, LoRAAdapter]]:
    """``(layer index or None if stacked, target, parent module, adapter)`` for every adapter."""
    for i, layer in _layer_entries(model):
        for target, (parent_name, _, _) in TARGETS.items():
            parent = getattr(layer, parent_name)
            adapter = getattr(parent, f"{target}_lora", None)
            if adapter is not None:
                yield i, target, parent, adapter


def lora_config(model: CausalLM) -> LoRAConfig | None:
    """The `LoRAConfig` of ``model``'s adapters, or ``None`` when it has none."""
    found = list(_adapted(model))
    if not found:
        return None
    targets = tuple(dict.fromkeys(t for _, t, _, _ in found))
    settings = {(a.lora_a.shape[-1], a.alpha, a.dropout.rate if a.dropout is not None else 0.0)
                for *_, a in found}
    if len(settings) != 1 or len(found) != len(_layer_entries(model)) * len(targets):
        raise ValueError("the model's LoRA adapters differ between projections or layers "
                         f"((rank, alpha, dropout) seen: {sorted(settings)}); add_lora makes uniform ones")
    rank, alpha, dropout = settings.pop()
    return LoRAConfig(rank, alpha, targets, dropout)


# ----------------------------------------------------------------------------- add / merge / strip
def add_lora(model: CausalLM, rank: int, alpha: float, targets: str | Sequence[str] = DEFAULT_TARGETS,
             dropout: float = 0.0, seed: int = 0, *, param_dtype: Any = jnp.float32,
             shardings: ShardingSpec | None = None) -> CausalLM:
    """A copy of ``model`` with a LoRA adapter on each ``targets`` projection of every layer.

    The copy shares ``model``'s weight arrays (nothing is copied; ``model`` itself is unchanged).
    ``A`` is drawn from ``seed``, the layer index and the target name alone, so scanned and
    unscanned models get the same adapters; ``B`` is zero, so the copy computes exactly what
    ``model`` does until ``B`` changes.

    Args:
      model: a `CausalLM` without adapters (scanned or not, sharded or not).
      rank: LoRA rank ``r > 0``.
      alpha: scale numerator: the update is ``alpha / r * (x @ A) @ B``.
      targets: Hugging Face projection names (see `TARGETS`) or ``"all-linear"``.
      dropout: probability of zeroing an adapter input element in train mode
        (``model.train()``); ``model.eval()`` (the default) disables it.
      seed: seed of ``A`` and of the dropout masks.
      param_dtype: dtype of ``A`` and ``B`` (float32, like peft's adapters on a bf16 model);
        the product is computed in the model's compute dtype.
      shardings: where to place the adapters, as `load_hf`'s ``shardings`` (a mesh,
        ``(mesh, rules)`` or a callable); ``None`` leaves them on the default device.

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``, ``dropout`` outside ``[0, 1)``, an unknown
        or unsupported (``lm_head``) target, or a model that already has adapters.
    """
    cfg = LoRAConfig(rank, alpha, targets, dropout)
    if lora_config(model) is not None:
        raise ValueError("the model already has LoRA adapters; merge_lora(model) or "
                         "without_lora(model) gives one without")
    config, opts = model.config, model.options
    root = jax.random.key(seed)

    def build(i):
        layer_key = jax.random.fold_in(root, i)
        out = {}
        for k, (target, (_, in_axis, out_axis)) in enumerate(TARGETS.items()):
            if target in cfg.targets:
                fin, fout = features(config, target)
                out[target] = LoRAAdapter(fin, fout, cfg, (in_axis, out_axis), dtype=opts.dtype,
                                          param_dtype=param_dtype,
                                          rngs=nnx.Rngs(jax.random.fold_in(layer_key, k)))
        return out

    new = nnx.clone(model)
    if opts.scan_layers:
        make = nnx.vmap(build, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        pairs = [(new.layers, make(jnp.arange(config.num_hidden_layers)))]
    else:
        pairs = [(layer, build(i)) for i, layer in enumerate(new.layers)]
    for layer, adapters in pairs:
        for target, adapter in adapters.items():
            setattr(getattr(layer, TARGETS[target][0]), f"{target}_lora", adapter)
    place = sharding_fn(shardings)
    if place is not None:
        for path, var in nnx.to_flat_state(nnx.state(new, nnx.LoRAParam)):
            shape = tuple(var.shape)
            var.set_value(jax.device_put(var[...], place(".".join(map(str, path)), shape,
                                                         logical_axes(var, len(shape)))))
    return new


def _merged_weight(w: jax.Array, adapter: LoRAAdapter) -> jax.Array:
    """``W + scaling * (A B)^T`` in float32, reshaped to ``W``'s layout and cast to its dtype."""
    a = adapter.lora_a[...].astype(jnp.float32)  # [(layers,) in, r]
    b = adapter.lora_b[...].astype(jnp.float32)  # [(layers,) r, out]
    delta = adapter.scaling * jnp.einsum("...ir,...ro->...oi", a, b, precision=jax.lax.Precision.HIGHEST)
    out = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
    if not isinstance(w, jax.core.Tracer):
        out = jax.device_put(out, w.sharding)  # keep the base weight's placement
    return out


def merge_lora(model: CausalLM) -> CausalLM:
    """A plain `CausalLM` with every adapter folded into its weight: ``W += scaling * (A B)^T``.

    The sum is taken in float32 and cast to the weight's dtype; untouched weights are shared with
    ``model`` (which is unchanged). A model without adapters comes back as an equal copy.
    """
    new = nnx.clone(model)
    for _, target, parent, adapter in list(_adapted(new)):
        w = getattr(parent, target)
        setattr(parent, target, w.replace(_merged_weight(w[...], adapter)))
        setattr(parent, f"{target}_lora", None)
    return new


def without_lora(model: CausalLM) -> CausalLM:
    """The base model: a `CausalLM` with the adapters removed, sharing ``model``'s weight arrays.

    This is the frozen reference of NPO / KL objectives when only adapters train (no second copy
    of the base weights); it computes what ``model`` computes with every ``lora_b`` set to zero.
    """
    new = nnx.clone(model)
    for _, target, parent, _ in list(_adapted(new)):
        setattr(parent, f"{target}_lora", None)
    return new


# ----------------------------------------------------------------------------- PEFT format
def _module_name(layer: int, target: str) -> str:
    return f"{PEFT_PREFIX}model.layers.{layer}.{TARGETS[target][0]}.{target}"


def peft_tensor_shapes(config: ModelConfig, lora: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a peft adapter for ``config`` with its shape: ``lora_A [r, in]``, ``lora_B [out, r]``."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_hidden_layers):
        for target in lora.targets:
            fin, fout = features(config, target)
            out[f"{_module_name(i, target)}.lora_A.weight"] = (lora.rank, fin)
            out[f"{_module_name(i, target)}.lora_B.weight"] = (fout, lora.rank)
    return out


def _architecture(config: ModelConfig) -> dict[str, Any]:
    d = {k: getattr(config, k) for k in _ARCHITECTURE}
    d["rope_scaling"] = config.rope_scaling.to_hf_dict() if config.rope_scaling is not None else None
    return json.loads(json.dumps(d))


def save_peft(model: CausalLM, path: str | Path, *, base_model_name_or_path: str | None = None,
              overwrite: bool = False) -> Path | None:
    """Write ``model``'s adapters as a peft LoRA folder (``PeftModel.from_pretrained(base, path)``).

    Writes ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
    ``target_modules``, ``lora_dropout``, ``task_type: CAUSAL_LM``, ...) and
    ``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.{self_attn|mlp}.
    {target}.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` in the adapters' dtype; its
    metadata records the base architecture, which `load_peft` checks. Written atomically. Across
    several processes every process calls it (the adapters are gathered to the hosts) and process
    0 writes; the others return None.

    Raises:
      ValueError: the model has no adapters.
      FileExistsError: ``path`` is a non-empty folder (or a file) and ``overwrite`` is False.
    """
    cfg = lora_config(model)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters to save (add_lora or load_hf(..., peft=) adds them)")
    st_io.require_safetensors()
    L = model.config.num_hidden_layers
    tensors: dict[str, np.ndarray] = {}
    for i, target, _, adapter in _adapted(model):  # every process takes part in each gather
        a = host_value(adapter.lora_a[...])  # [(layers,) in, r]
        b = host_value(adapter.lora_b[...])  # [(layers,) r, out]
        for j in (range(L) if i is None else [i]):
            name = _module_name(j, target)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray((a[j] if i is None else a).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray((b[j] if i is None else b).T)
    if jax.process_index() != 0:
        return None

    def fill(tmp: Path) -> None:
        st_io.save_file(tensors, str(tmp / WEIGHTS_FILE),
                        metadata={"format": "pt", BASE_CONFIG_KEY: json.dumps(_architecture(model.config))})
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None,
        }
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    return st_io.write_folder(path, fill, overwrite=overwrite, what="adapter")


def read_peft_config(path: str | Path, base: ModelConfig) -> LoRAConfig:
    """Validate a peft LoRA folder against base model ``base`` without reading any tensor data.

    Checks ``adapter_config.json`` (``peft_type`` LORA, causal-LM task, ``r > 0``, known
    ``target_modules``, no option this model does not reproduce: DoRA, rsLoRA, per-module
    ranks, partial layers, biases, ``modules_to_save``), the base architecture recorded by
    `save_peft` (when present) and every tensor's name and shape from the safetensors header.

    Raises:
      FileNotFoundError: no such folder, or no ``adapter_config.json`` / adapter weights.
      CheckpointError: a pickle-only adapter, a bad or unsupported config field, or an adapter
        made for another base model (layer count, shapes, targets, architecture); the message
        names the file, field or tensor.
    """
    folder = Path(path)
    cfg_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE} (not a peft adapter folder)")
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise CheckpointError(f"{folder} holds only a pickle adapter (adapter_model.bin); it is refused "
                                  f"because unpickling can run arbitrary code. Save it as {WEIGHTS_FILE}.")
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    with open(cfg_file) as f:
        d = json.load(f)
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: field 'peft_type' is {d.get('peft_type')!r}; only 'LORA' is supported")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{cfg_file}: field 'task_type' is {d.get('task_type')!r}; expected 'CAUSAL_LM'")
    unsupported = [k for k in _UNSUPPORTED if d.get(k)]
    if d.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise CheckpointError(f"{cfg_file}: unsupported option(s) " + ", ".join(
            f"{k}={d[k]!r}" for k in unsupported) + "; only plain LoRA (no DoRA, rsLoRA, biases, per-module "
            "ranks, partial layers or modules_to_save) is supported")
    targets = d.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise CheckpointError(f"{cfg_file}: field 'target_modules' is the pattern {targets!r}; only a list of "
                              f"module names ({', '.join(TARGETS)}) or 'all-linear' is supported")
    if targets is None:
        raise CheckpointError(f"{cfg_file}: field 'target_modules' is missing")
    if not isinstance(targets, str):  # peft matches by suffix and saves "all-linear" as full names
        targets = list(dict.fromkeys(str(t).rsplit(".", 1)[-1] for t in targets))
    rank = d.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise CheckpointError(f"{cfg_file}: field 'r' must be a positive integer, got {rank!r}")
    try:
        cfg = LoRAConfig(rank, d.get("lora_alpha", 8), _normalise_targets(targets, "field 'target_modules'"),
                         float(d.get("lora_dropout") or 0.0))
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None

    st_io.require_safetensors()
    with st_io.safe_open(weights, framework="numpy") as f:
        meta = f.metadata() or {}
        found = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    if BASE_CONFIG_KEY in meta:
        recorded, have = json.loads(meta[BASE_CONFIG_KEY]), _architecture(base)
        diff = [k for k in _ARCHITECTURE if recorded.get(k) != have[k]]
        if diff:
            raise CheckpointError(f"{weights}: the adapter was made for a different base model: " + ", ".join(
                f"{k} {recorded.get(k)!r} (base model: {have[k]!r})" for k in diff))
    pattern = re.compile(re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_[AB]\.weight$")
    for name in found:
        m = pattern.match(name)
        if m and int(m.group(1)) >= base.num_hidden_layers:
            raise CheckpointError(f"{weights}: tensor {name} adapts layer {m.group(1)}, but the base model has "
                                  f"{base.num_hidden_layers} layers (num_hidden_layers)")
        if m and m.group(3) in TARGETS and m.group(3) not in cfg.targets:
            raise CheckpointError(f"{weights}: tensor {name} adapts {m.group(3)}, which {CONFIG_FILE} "
                                  f"field 'target_modules' {list(cfg.targets)} does not list")
    try:
        st_io.check_tensors(peft_tensor_shapes(base, cfg), found, {n: weights for n in found}, folder)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} (the adapter does not fit the base model: hidden_size={base.hidden_size}, intermediate_size="
            f"{base.intermediate_size}, heads={base.num_attention_heads}, kv_heads={base.num_key_value_heads}, "
            f"head_dim={base.head_dim}, layers={base.num_hidden_layers})") from None
    return cfg


def load_peft(model: CausalLM, path: str | Path, shardings: ShardingSpec | None = None, *,
              param_dtype: Any = jnp.float32) -> CausalLM:
    """``model`` (without adapters) plus the peft LoRA adapter in folder ``path``.

    Validates the folder first (`read_peft_config`), then reads one tensor at a time into
    ``param_dtype`` adapters, placed by ``shardings`` as in `load_hf`. Shares ``model``'s weights.
    """
    cfg = read_peft_config(path, model.config)
    weights = Path(path) / WEIGHTS_FILE
    new = add_lora(model, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout, param_dtype=param_dtype)
    place = sharding_fn(shardings)
    L = model.config.num_hidden_layers
    for i, target, _, adapter in _adapted(new):
        for key, kind in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            var = getattr(adapter, key)
            shape = tuple(var.shape)
            host = st_io.aligned_empty(shape, jnp.dtype(param_dtype))
            for j in (range(L) if i is None else [i]):
                name = f"{_module_name(j, target)}.{kind}.weight"
                t = np.empty(shape[-2:][::-1], host.dtype)  # HF layout is the transpose of ours
                st_io.read_into(weights, name, t)
                (host[j] if i is None else host)[...] = t.T
            path_str = ".".join(["layers", *([] if i is None else [str(i)]), TARGETS[target][0], f"{target}_lora", key])
            sharding = None if place is None else place(path_str, shape, logical_axes(var, len(shape)))
            var.set_value(st_io.to_device(host, sharding))  # whole array, placement kept
    return new
